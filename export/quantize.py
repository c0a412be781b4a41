"""`--int8`: onnxruntime dynamic quantisation of the fp32 graphs, for CPU serving.

Weights of the matrix products become int8 (per output channel); activations are quantised
per batch at run time. The patch-embedding convolution, LayerNorm, softmax and the final
normalisation stay fp32. Its accuracy is measured like any other export (parity against the
fp32 PyTorch model) and recorded in the manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")


def int8_from_onnx(src: Path, dst: Path) -> dict:
    """Quantise `src` into `dst`; returns {"quantize_s", "ops", "weight_type", "per_channel"}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    logging.disable(logging.WARNING)  # it advises pre-processing on the root logger, every call
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(QUANTIZED_OPS),
                         weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    took = time.perf_counter() - started
    logger.info("quantised %s to %s in %.1f s", src.name, dst.name, took)
    return {"quantize_s": round(took, 3), "ops": list(QUANTIZED_OPS), "weight_type": "int8",
            "per_channel": True}
