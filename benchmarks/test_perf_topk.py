"""Exact top-k, measured and checked against the full-matrix oracle `topk_reference`.

Features are multiples of 1/8 in [-0.5, 0.5] (64 dims), so every dot product is exact in float32
(and fp16 on CUDA) whatever the tiling, and ties are frequent: the tie rule is checked too. Chunk
sizes are not multiples of the sizes, so the last query and gallery tiles are short.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import DEVICES, needs_cuda
from engines.measure import plain_topk
from fklip.retrieval import topk_chunked, topk_reference

N_QUERIES, N_GALLERY, DIM, K = 3000, 5000, 64, 10
ROUNDS = 5


@pytest.fixture(scope="module", params=DEVICES)
def grid(request):
    """(queries, gallery) on the device (fp16 on CUDA, as the issue's figures), and the oracle's
    (values, indices)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if request.param == "cuda" else torch.float32
    queries = (torch.randint(-4, 5, (N_QUERIES, DIM), generator=gen) / 8).to(request.param, dtype)
    gallery = (torch.randint(-4, 5, (N_GALLERY, DIM), generator=gen) / 8).to(request.param, dtype)
    return queries, gallery, topk_reference(queries, gallery, K)


def test_topk_chunked_is_exact(benchmark, grid):
    queries, gallery, (ref_values, ref_indices) = grid
    benchmark.extra_info.update(queries=N_QUERIES, gallery=N_GALLERY, dim=DIM, k=K)
    values, indices = benchmark.pedantic(topk_chunked, args=(queries, gallery, K),
                                         kwargs={"query_chunk": 1024, "gallery_chunk": 1536},
                                         rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_plain_torch_topk_values(benchmark, grid):
    """The baseline: `torch.mm` + `torch.topk` per chunk. Same values; among ties, any indices."""
    queries, gallery, (ref_values, _) = grid
    benchmark.extra_info.update(queries=N_QUERIES, gallery=N_GALLERY, dim=DIM, k=K)
    values, indices = benchmark.pedantic(plain_topk, args=(queries, gallery, K), rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(values.float() + 0.0, ref_values)
    scores = (queries.float()[:, None, :] * gallery.float()[indices]).sum(-1)  # (Q, K) each index's own score
    assert torch.equal(scores + 0.0, ref_values)


@needs_cuda
def test_fused_topk_is_exact_on_cuda(benchmark):
    """The fused Triton kernel (matmul and running top-k in one pass) on the GPU, fp16 grid features
    against the oracle: the same values and indices, tie rule included."""
    gen = torch.Generator().manual_seed(1)
    queries = (torch.randint(-4, 5, (N_QUERIES, 512), generator=gen) / 8).to("cuda", torch.float16)
    gallery = (torch.randint(-4, 5, (4 * N_GALLERY, 512), generator=gen) / 8).to("cuda", torch.float16)
    ref_values, ref_indices = topk_reference(queries, gallery, K)
    benchmark.extra_info.update(queries=N_QUERIES, gallery=4 * N_GALLERY, dim=512, k=K, method="fused")
    values, indices = benchmark.pedantic(topk_chunked, args=(queries, gallery, K), kwargs={"method": "fused"},
                                         rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
