"""The registry of backends and what builds a runner (the interface is fklip.runner.Runner):

    with build_runner(EncodeConfig("onnx", engine_dir=out)) as runner:
        image_emb = runner.encode_images(pixels)  # (B, D) float32, L2-normalised
        text_emb = runner.encode_texts(tokenizer_for(runner)(texts))  # (B, D) float32, L2-normalised
"""

from __future__ import annotations

import importlib

from fklip.config import EncodeConfig
from fklip.errors import ConfigError
from fklip.runner import Runner

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


def build_runner(cfg: EncodeConfig) -> Runner:
    """The runner for `cfg.engine` (enter it with `with` to load the model or engine)."""
    return runner_class(cfg.engine)(cfg)
