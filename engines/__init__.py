"""Runtimes behind one interface (torch, onnxruntime, TensorRT). Filled in by issue 5."""
