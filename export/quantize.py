"""CPU-serving conversions of the exported fp32 graphs for onnxruntime.

`int8_cpu_from_onnx` is dynamic int8 quantisation (weights per output channel, activations
uint8 per tensor at run time) with a recipe per tower: 7-bit int8 weights (`reduce_range`) for
the image tower, uint8 weights for the text tower. On x86 CPUs without VNNI
(AVX2 only, e.g. AMD Zen 2/3), onnxruntime multiplies uint8 activations by int8 weights with
VPMADDUBSW, which adds two uint8 x int8 products into a saturating int16: with full 8-bit
weights (255 * 127 * 2 > 32767) sums of large pairs clip. 7-bit weights (|w| <= 64) keep every
pair below 2**15, so nothing clips. Measured on ViT-B-32 (random weights, 2 Zen 3 cores, demo
images, benchmarks/bench_engines.py): min cosine to fp32 0.98 with 8-bit weights, 0.9996 with
7-bit weights, at the same speed. On VNNI machines the 7-bit weights only cost resolution.
uint8 weights go through another AVX2 kernel (u8 x u8), measured without that loss and with twice
the resolution of 7-bit weights, but it ran ~20% slower than 7-bit on the image tower.

The plain fp32 graphs are not rewritten here: onnxruntime's offline transformer fusions
(`onnxruntime.transformers.optimizer`) fuse only BiasGelu in these graphs, which the session's
own optimiser already does at load time (same speed measured), and MatMul is ~89% of the
fp32 image tower's time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fklip.errors import ConfigError

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Recipe:
    """How the weights of the quantised MatMul/Gemm nodes are stored (activations are always
    uint8, per tensor, quantised at run time; weights are per output channel)."""

    weight_type: str  # "int8" (symmetric) | "uint8" (asymmetric, with a zero point)
    weight_bits: int  # 7: reduce_range
    kernel_on_avx2: str  # what onnxruntime multiplies with on x86 without VNNI

    def as_dict(self) -> dict:
        return {"weight_type": self.weight_type, "weight_bits": self.weight_bits,
                "per_channel": True, "reduce_range": self.weight_bits == 7,
                "activations": "uint8, per tensor, dynamic", "kernel_on_avx2": self.kernel_on_avx2}


RECIPES = {
    "int8-7bit": Int8Recipe("int8", 7, "u8s8 VPMADDUBSW, no int16 saturation with 7-bit weights"),
    "int8-8bit": Int8Recipe("int8", 8, "u8s8 VPMADDUBSW, int16 saturation without VNNI (onnxruntime's default)"),
    "uint8": Int8Recipe("uint8", 8, "u8u8, no saturation measured, slower than u8s8"),
}
# The fastest recipe per tower whose embeddings kept min cosine >= 0.999 to fp32 (ViT-B-32,
# random weights, demo images and captions): the image tower loses ~0.0004 with 7-bit weights;
# the text tower loses ~0.002 with them (its error is spread over every MatMul, not one layer)
# and ~0.0008 with uint8 weights, which have twice the resolution.
TOWER_RECIPES = {"image": "int8-7bit", "text": "uint8"}


def int8_cpu_from_onnx(src: Path, dst: Path, recipe: str = "int8-7bit",
                       nodes_to_exclude: tuple[str, ...] = ()) -> dict:
    """Quantise the fp32 graph `src` into `dst` (written to a temporary name, then renamed).

    `recipe` names an entry of RECIPES; `nodes_to_exclude` stay fp32. Returns what the manifest
    should record: {"quantize_s", "recipe", "ops", "nodes_excluded", **Int8Recipe.as_dict()}.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if recipe not in RECIPES:
        raise ConfigError(f"int8 recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    spec = RECIPES[recipe]
    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[spec.weight_type]
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    started = time.perf_counter()
    logging.disable(logging.WARNING)  # it advises pre-processing on the root logger, every call
    try:
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=list(QUANTIZED_OPS),
                         weight_type=weight_type, per_channel=True, reduce_range=spec.weight_bits == 7,
                         nodes_to_exclude=list(nodes_to_exclude))
        os.replace(tmp, dst)
    finally:
        logging.disable(logging.NOTSET)
        tmp.unlink(missing_ok=True)
    took = time.perf_counter() - started
    logger.info("quantised %s to %s (%s) in %.1f s", Path(src).name, dst.name, recipe, took)
    return {"quantize_s": round(took, 3), "recipe": recipe, "ops": list(QUANTIZED_OPS),
            "nodes_excluded": list(nodes_to_exclude), **spec.as_dict()}
