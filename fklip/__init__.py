"""fklip: train, export and run FashionKLIP image-text retrieval models.

Importing fklip is cheap: torch, open_clip, onnx and onnxruntime load only inside the functions
that need them.
"""

__version__ = "0.1.0"
