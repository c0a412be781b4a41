"""One precision vocabulary for every command, and which of its values each one takes.

    fp32      float32 weights and activations (the original's)
    amp       float32 weights under autocast: fp16 on CUDA, bf16 on the CPU (fklip.runner.autocast)
    amp_bf16  float32 weights under bf16 autocast (training)
    bf16      bfloat16 weights
    fp16      float16 weights (CUDA)
    int8      onnxruntime's dynamic-int8 graphs of an fp32 export (CPU serving)

Plain strings, so that configs, manifests and JSON records hold them as they are; the tuples below
say which ones a command accepts, and `check_precision` is the one check, naming the flag.
"""

from __future__ import annotations

from typing import Literal

from fklip.errors import ConfigError

Precision = Literal["fp32", "amp", "amp_bf16", "bf16", "fp16", "int8"]

ENCODE = ("fp32", "amp", "bf16", "fp16")  # extract, eval, the torch runner
FUSED = ("fp32", "fp16", "bf16")  # the torch runner's fused towers: weights in one dtype
TRAIN = ("amp", "amp_bf16", "fp32", "bf16", "fp16")
KNOWLEDGE = ("fp32", "amp")  # the knowledge refresh's encoding
EXPORT = ("fp32", "fp16", "bf16")  # written into the ONNX graphs
BENCH = ("fp32", "amp", "fp16", "bf16", "int8")


def check_precision(precision: str, allowed: tuple[str, ...], flag: str = "--precision", what: str = "") -> str:
    """`precision` if it is one of `allowed`; else ConfigError naming the flag and the choices."""
    if precision not in allowed:
        where = f" ({what})" if what else ""
        raise ConfigError(f"{flag}: expected one of {', '.join(allowed)}{where}, got {precision!r}")
    return precision
