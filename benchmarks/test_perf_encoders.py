"""Encoders, measured and checked: each case times one path over the conftest's demo inputs and
asserts its embeddings against the slow oracle, open_clip eager fp32 over all 77 positions.

On the CPU fp32 paths must match it to cosine 0.99999; on CUDA the fast paths run fp16 (0.999).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from benchmarks.conftest import DEVICES, MODELS, ROUNDS, SIZES, needs_cuda
from engines.base import build_runner
from engines.measure import encode_all, min_cosine, open_clip_backend
from fklip.config import EncodeConfig

MIN_COSINE = {"cpu": 0.99999, "cuda": 0.999}
PRECISION = {"cpu": "fp32", "cuda": "fp16"}  # what the torch engine runs in each case


def _onnx_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


ONNX_DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.skipif(
    not _onnx_cuda(), reason="no GPU for onnxruntime: no CUDAExecutionProvider (pip install \"fklip[gpu]\")")])]


def measured(benchmark, name: str, encode, x: np.ndarray) -> np.ndarray:
    """`encode` over all of `x` in the model's batch size, timed; its (N, D) embeddings."""
    benchmark.extra_info.update(model=name, items=len(x), batch=SIZES[name][2])
    return benchmark.pedantic(encode_all, args=(encode, x, SIZES[name][2]), rounds=ROUNDS[name], warmup_rounds=1)


def texts_of(setup, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, oracle embeddings) of the demo captions or the short concept prompts."""
    return (setup.ids, setup.text_ref) if kind == "captions" else (setup.prompt_ids, setup.prompt_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_open_clip_images(benchmark, setups, name, device):
    """The baseline as users run it: eager fp32 on the CPU, fp16 autocast on CUDA."""
    s = setups(name)
    model = s.model if device == "cpu" else copy.deepcopy(s.model).to(device)
    got = measured(benchmark, name, open_clip_backend(model, device, autocast=device != "cpu").encode_images,
                   s.pixels)
    assert min_cosine(got, s.image_ref) >= MIN_COSINE[device]


def torch_config(s, device: str, fused: bool) -> EncodeConfig:
    """The torch engine: open_clip's modules, or fklip's fused towers (with CUDA graphs on CUDA)."""
    return EncodeConfig("torch", checkpoint=s.checkpoint, device=device, precision=PRECISION[device], fused=fused,
                        cuda_graphs=fused and device == "cuda")


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_torch_runner_images(benchmark, setups, name, device, fused):
    s = setups(name)
    cfg = torch_config(s, device, fused)
    with build_runner(cfg) as runner:
        got = measured(benchmark, name, runner.encode_images, s.pixels)
    assert min_cosine(got, s.image_ref) >= MIN_COSINE[device]


@pytest.mark.parametrize("tower", ["images", "texts"])
@pytest.mark.parametrize("device", ONNX_DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_onnx_runner(benchmark, setups, name, device, tower):
    """The fp32 export through onnxruntime: images, and captions cut after their last end token."""
    s = setups(name)
    x, ref = (s.pixels, s.image_ref) if tower == "images" else (s.ids, s.text_ref)
    with build_runner(EncodeConfig("onnx", engine_dir=s.export_dir, device=device)) as runner:
        got = measured(benchmark, name, getattr(runner, f"encode_{tower}"), x)
    assert min_cosine(got, ref) >= MIN_COSINE["cpu"]  # an fp32 export on either device


@pytest.mark.parametrize("texts", ["captions", "prompts"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_open_clip_texts_full(benchmark, setups, name, device, texts):
    """The baseline: every text over all 77 positions."""
    s = setups(name)
    ids, ref = texts_of(s, texts)
    model = s.model if device == "cpu" else copy.deepcopy(s.model).to(device)
    got = measured(benchmark, name, open_clip_backend(model, device, autocast=device != "cpu").encode_texts, ids)
    assert min_cosine(got, ref) >= MIN_COSINE[device]


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
@pytest.mark.parametrize("texts", ["captions", "prompts"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
def test_torch_runner_texts_trimmed(benchmark, setups, name, device, texts, fused):
    """Each batch cut after its last end token: the same features as all 77 positions (the text
    tower is causal and pools at the end token), for a fraction of the work on short texts."""
    s = setups(name)
    ids, ref = texts_of(s, texts)
    with build_runner(torch_config(s, device, fused)) as runner:
        got = measured(benchmark, name, runner.encode_texts, ids)
    assert min_cosine(got, ref) >= MIN_COSINE[device]
    if device == "cpu":
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)

