"""Fixtures of the pytest-benchmark suites (benchmarks/test_*.py; the bench_*.py scripts are not
collected): per architecture, one model with random weights, its checkpoint, one ONNX export and
demo inputs, built once per session (a ViT-B-32 export takes about 15 s on 2 cores); and the
slow oracle every case is checked against, open_clip eager fp32 over the full context.

Every case is bounded with `benchmark.pedantic(..., rounds=ROUNDS[model], warmup_rounds=1)`, so
the suites run on 2 CPU cores in CI in well under 5 minutes. CUDA cases skip without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

NO_GPU = "no GPU: torch.cuda.is_available() is False"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
MODELS = ["fklip-tiny", pytest.param("ViT-B-32", marks=pytest.mark.slow)]
# images, captions and the batch they run in: ViT-B-32 encodes ~17 images/s on 2 cores
SIZES = {"fklip-tiny": (64, 64, 64), "ViT-B-32": (8, 16, 16)}
ROUNDS = {"fklip-tiny": 5, "ViT-B-32": 2}
PROMPTS = ["a photo of t-shirt", "a photo of short sleeve t-shirt", "a photo of striped dress",
           "a photo of bag", "a photo of wool coat", "a photo of sunglasses"]


@dataclass
class Setup:
    """One architecture's model, files, inputs and oracle embeddings."""

    name: str
    model: torch.nn.Module  # open_clip, fp32, eval, on the CPU
    checkpoint: Path
    export_dir: Path
    pixels: np.ndarray  # (N, 3, S, S) float32, CLIP-normalised demo garments
    ids: np.ndarray  # (M, context) int64 ids of demo captions
    prompt_ids: np.ndarray  # (P, context) int64 ids of concept prompts
    image_ref: np.ndarray  # (N, D) open_clip eager fp32, normalised
    text_ref: np.ndarray  # (M, D)
    prompt_ref: np.ndarray  # (P, D)


@pytest.fixture(scope="session")
def setups(tmp_path_factory):
    """name -> Setup, each built on first use and kept for the session."""
    from engines.measure import build_inputs, open_clip_backend
    from export.pipeline import run_export
    from fklip.config import ExportConfig
    from fklip.model import ModelSpec, build_model, build_tokenizer, save_checkpoint

    cache: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            spec = ModelSpec.from_name(name)
            torch.manual_seed(0)
            model = build_model(spec)
            save_checkpoint(folder / "model.pt", model, spec)
            run_export(ExportConfig(checkpoint=folder / "model.pt", out=folder / "export"))
            n_images, n_texts, _ = SIZES[name]
            tokenizer = build_tokenizer(spec)
            pixels, ids, _ = build_inputs(spec.image_size, tokenizer, n_images, n_texts, seed=0)
            prompt_ids = tokenizer(PROMPTS * 4).numpy()
            # the oracle: `fklip bench`'s CPU baseline, open_clip's `encode_image` / `encode_text` (all
            # 77 positions), eager fp32, normalised
            oracle = open_clip_backend(model)
            cache[name] = Setup(name, model, folder / "model.pt", folder / "export", pixels, ids, prompt_ids,
                                oracle.encode_images(pixels), oracle.encode_texts(ids),
                                oracle.encode_texts(prompt_ids))
        return cache[name]

    return get
