"""The fused Triton top-k (fklip.retrieval.kernel, fklip.retrieval.fused) against `topk_reference`
and the torch path, on one device: the CPU under Triton's interpreter, or CUDA.

Not collected by name (no test_ prefix): the interpreter must be chosen before triton is first
imported, so `tests/test_fused_topk.py::test_kernel_under_interpreter` runs this file in a fresh
process with TRITON_INTERPRET=1, and benchmarks/gpu.sh runs it on a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fklip.errors import ConfigError
from fklip.retrieval import topk_both_ways, topk_chunked, topk_reference
from tests.test_retrieval import assert_same, grid_features

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError(f"{__file__}: run it with TRITON_INTERPRET=1 (the CPU, interpreted) or "
                            "on a CUDA GPU; tests/test_fused_topk.py runs it under the interpreter")


def _ranked(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's unsorted per-split entries ranked by the tie rule (score desc, index asc)."""
    by_index = torch.argsort(index.masked_fill(index < 0, 2**62), dim=1, stable=True)
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    order = torch.sort(-values, dim=1, stable=True).indices[:, :k]
    return values.gather(1, order), index.gather(1, order)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,splits", [(1, 1), (5, 3), (10, 2), (32, 4)])
def test_kernel_matches_reference(device, dtype, k, splits):
    # 45 queries: not a multiple of the 32-row block; dim 40: not a multiple of the 32-wide slice;
    # 301 rows: the last score block and split are partial. Grid features: exact scores, many ties.
    from fklip.retrieval.kernel import KernelConfig, fused_topk

    queries = grid_features(45, 40, levels=4, seed=1).to(device, dtype)
    rows = grid_features(301, 40, levels=4, seed=2).to(device, dtype)
    cfg = KernelConfig(block_m=32, block_n=64, block_d=32) if device == "cpu" else None
    values, index = fused_topk(queries, rows, k, splits=splits, config=cfg)
    assert values.shape == index.shape and values.shape[0] == 45
    assert_same(_ranked(values.cpu(), index.cpu(), k), topk_reference(queries.cpu(), rows.cpu(), k))


@pytest.mark.parametrize("device", [DEVICE])
def test_kernel_short_split_ties_and_negative_zero(device):
    from fklip.retrieval.kernel import KernelConfig, fused_topk

    cfg = KernelConfig(block_m=32, block_n=64, block_d=32) if device == "cpu" else None
    # 70 rows in splits of 64: the second split has 6 rows, fewer than k = 10: -1 entries.
    queries, rows = grid_features(9, 8, seed=3).to(device), grid_features(70, 8, seed=4).to(device)
    values, index = fused_topk(queries, rows, 10, splits=2, config=cfg)
    assert bool((index == -1).any()) and bool(torch.isinf(values[index == -1]).all())
    assert_same(_ranked(values.cpu(), index.cpu(), 10), topk_reference(queries.cpu(), rows.cpu(), 10))
    # Every score equal: the lowest indices win. Scores of -0.0 are reported as +0.0.
    same = torch.ones(200, 8, device=device)
    values, index = fused_topk(torch.ones(3, 8, device=device), same, 7, config=cfg)
    assert sorted(_ranked(values.cpu(), index.cpu(), 7)[1][0].tolist()) == list(range(7))
    zero = torch.zeros(5, 8, device=device)
    zero[:, 0] = -1.0
    values, _ = fused_topk(torch.tensor([[0.0] + [1.0] * 7], device=device), zero, 3, config=cfg)
    assert values.cpu().view(torch.int32).eq(0).all()  # +0.0 bits, never -0.0


@pytest.mark.parametrize("device", [DEVICE])
def test_kernel_rising_scores(device):
    # Gallery rows in increasing score order: every block displaces the whole running top-k,
    # the slow case of the insertion loop.
    from fklip.retrieval.kernel import KernelConfig, fused_topk

    cfg = KernelConfig(block_m=32, block_n=64, block_d=32) if device == "cpu" else None
    query = torch.ones(2, 4, device=device)
    rows = (torch.arange(400, device=device, dtype=torch.float32) / 64)[:, None].expand(400, 4)
    values, index = fused_topk(query, rows.contiguous(), 16, splits=1, config=cfg)
    assert _ranked(values.cpu(), index.cpu(), 16)[1][0].tolist() == list(range(399, 383, -1))


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k,query_chunk,gallery_chunk", [(1, 7, 50), (10, 64, 1000), (25, 16, 129)])
def test_topk_chunked_fused_equals_torch_and_reference(device, dtype, k, query_chunk, gallery_chunk):
    queries = grid_features(37, 24, seed=5).to(device, dtype)
    gallery = grid_features(333, 24, seed=6).to(device, dtype)
    kwargs = {"query_chunk": query_chunk, "gallery_chunk": gallery_chunk}
    fused = topk_chunked(queries, gallery, k, method="fused", **kwargs)
    want = topk_reference(queries, gallery, k)
    assert_same((fused[0].cpu(), fused[1].cpu()), (want[0].cpu(), want[1].cpu()))
    torch_path = topk_chunked(queries, gallery, k, method="torch", **kwargs)
    assert_same((fused[0].cpu(), fused[1].cpu()), (torch_path[0].cpu(), torch_path[1].cpu()))


@pytest.mark.parametrize("device", [DEVICE])
def test_topk_both_ways_fused_and_memmap_gallery(device, tmp_path):
    queries = grid_features(41, 16, seed=7).to(device, torch.float16)
    gallery = grid_features(150, 16, seed=8).half()
    path = tmp_path / "gallery.npy"
    np.save(path, gallery.numpy())
    memmap = np.load(path, mmap_mode="r")  # (150, 16) float16, read chunk by chunk
    (ab, ba) = topk_both_ways(queries, memmap, 12, query_chunk=20, gallery_chunk=64, method="fused")
    want_ab = topk_reference(queries.cpu(), gallery, 12)
    want_ba = topk_reference(gallery, queries.cpu(), 12)
    assert_same((ab[0].cpu(), ab[1].cpu()), want_ab)
    assert_same((ba[0].cpu(), ba[1].cpu()), want_ba)


@pytest.mark.parametrize("device", [DEVICE])
def test_fused_refuses_scores_that_could_overflow(device):
    queries = torch.full((3, 4), 1e19, device=device)  # |q| |g| = 4e38: a dot product may overflow
    with pytest.raises(ConfigError, match="overflow"):
        topk_chunked(queries, queries, 2, method="fused")
    with pytest.raises(ConfigError, match="k = 33 is larger than the kernel's limit of 32"):
        topk_chunked(queries / 1e19, queries / 1e19, 33, method="fused")
    if device == "cuda":  # "auto" falls back to the torch path, which reports what it finds
        assert topk_chunked(queries / 1e10, queries / 1e10, 2)[0].shape == (3, 2)


@pytest.mark.parametrize("device", [DEVICE])
def test_fp16_features_skip_the_norm_pass(device, monkeypatch):
    """fp16 scores are bounded by D * 65504**2, so the overflow check reads no norms for them;
    bf16 (and float32) features still get the row-norm bound."""
    from fklip.retrieval import fused

    read = []
    monkeypatch.setattr(fused, "_max_norm", lambda x, chunk, dev: read.append(x.dtype) or 1.0)
    half = grid_features(6, 8).to(device, torch.float16)
    assert fused.why_not_fused(half, half.cpu().numpy(), 3, 64) is None and read == []
    assert fused.why_not_fused(half.bfloat16(), half.bfloat16(), 3, 64) is None
    assert read == [torch.bfloat16, torch.bfloat16]
