"""The registry of backends and what builds a runner (the interface is fklip.runner.Runner):

    with build_runner(RunnerConfig("onnx", engine_dir=out)) as runner:
        image_emb = runner.encode_images(pixels)  # (B, D) float32, L2-normalised
        text_emb = runner.encode_texts(tokenizer_for(runner)(texts))  # (B, D) float32, L2-normalised
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from fklip.errors import ConfigError
from fklip.runner import Runner


@dataclass(frozen=True)
class RunnerConfig:
    """What `build_runner` needs. torch: a checkpoint; onnx and trt: an export folder."""

    backend: str
    checkpoint: Path | None = None  # torch
    engine_dir: Path | None = None  # onnx, trt: a `fklip export` folder
    model: str | None = None
    truncation: str | None = None
    trust_checkpoint: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False  # torch: torch.compile
    cuda_graphs: bool = False  # torch on CUDA: replay captured graphs per batch shape
    fused: bool = False  # torch: fklip's re-stated towers (SDPA attention), not open_clip's modules
    int8: bool = False  # onnx: the dynamically quantised graphs, when exported
    threads: int | None = None  # onnx: intra-op threads (None: the library's default)


# name -> "module:class"; imported only when that backend is asked for.
BACKENDS = {
    "torch": "engines.torch_runner:TorchRunner",
    "onnx": "engines.onnx_runner:OnnxRunner",
    "trt": "engines.trt_runner:TrtRunner",
}


def runner_class(backend: str):
    if backend not in BACKENDS:
        raise ConfigError(f"--engine: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)


def build_runner(cfg: RunnerConfig) -> Runner:
    """The runner for `cfg.backend` (enter it with `with` to load the model or engine)."""
    return runner_class(cfg.backend)(cfg)
