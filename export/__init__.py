"""ONNX and TensorRT export of fklip checkpoints (`fklip export`). Filled in by issue 5."""
