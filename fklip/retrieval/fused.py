"""Exact top-k with the fused Triton kernel (fklip.retrieval.kernel): `fklip.retrieval`'s search
for CUDA tensors, with the torch path (fklip.retrieval.chunked: matmul into a buffer, then
`_top_keys`) as fallback and oracle.

The gallery is read once, chunk by chunk, in its own dtype (fp16 features stay fp16: half the
memory traffic of the torch path's float32 copy). Each chunk is searched by every query tile
(and, both ways, searches the queries); the kernel's per-split entries become the same int64
keys as the torch path's (fklip.retrieval.codec) and are merged the same way, so results are
those of `topk_reference` on the same float32 scores. triton is imported only when the kernel
runs: fklip.retrieval.kernel, the only module that imports it, is imported inside the functions
that use it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fklip.errors import ConfigError
from fklip.retrieval.codec import NO_KEY, decode, keys_from, merge
from fklip.retrieval.inputs import gallery_rows

logger = logging.getLogger(__name__)


def _max_norm(x, chunk: int, device: torch.device) -> float:
    """The largest row L2 norm of a tensor or array, read chunk by chunk in float64."""
    return max(float(torch.linalg.vector_norm(gallery_rows(x, s, s + chunk, device, torch.float64),
                                              dim=1).max()) for s in range(0, x.shape[0], chunk))


def why_not_fused(queries: Tensor, gallery, k: int, gallery_chunk: int) -> str | None:
    """Why the fused kernel cannot serve this search, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it comes with PyTorch's CUDA wheels on Linux)"
    from fklip.retrieval.kernel import MAX_K, interpreted  # imports triton

    if queries.device.type != "cuda" and not interpreted():
        return (f"the queries are on {queries.device}: the kernel needs CUDA (or Triton's "
                "interpreter: TRITON_INTERPRET=1 before triton is imported)")
    if k > MAX_K:
        return f"k = {k} is larger than the kernel's limit of {MAX_K}"
    if _fp16(queries) and _fp16(gallery):
        return None  # |q . g| <= D * 65504**2: no fp16 features' float32 score can overflow
    # Below this bound no partial dot product can overflow (|q . g| <= |q| |g|), so every score is
    # finite and the kernel never meets the NaN (inf - inf) that the torch path reports.
    bound = _max_norm(queries, gallery_chunk, queries.device) * _max_norm(gallery, gallery_chunk,
                                                                          queries.device)
    if not bound < 1e38:
        return f"scores could overflow float32 (the largest row norms multiply to {bound:.3g})"
    return None


def _fp16(x) -> bool:
    return x.dtype in (torch.float16, np.dtype(np.float16))


def _half(x) -> bool:
    """fp16/bf16 features: what "auto" hands the fused kernel (float32 keeps cuBLAS's float32
    GEMM; the kernel's IEEE float32 products are untuned)."""
    return x.dtype in (torch.float16, torch.bfloat16, np.dtype(np.float16))


def resolve_method(queries: Tensor, gallery, k: int, gallery_chunk: int, method: str = "auto") -> str:
    """The path a search with `method` takes on these inputs: "fused" or "torch". "auto" picks
    the kernel for fp16/bf16 CUDA features where it applies; "fused" where it cannot run raises
    ConfigError."""
    if method == "torch" or (method == "auto" and not (queries.device.type == "cuda"
                                                       and _half(queries) and _half(gallery))):
        return "torch"
    why_not = why_not_fused(queries, gallery, k, gallery_chunk)
    if why_not is None:
        return "fused"
    if method == "fused":
        raise ConfigError(f"top-k: method 'fused' cannot run: {why_not}")
    logger.debug("top-k: torch path, not the fused kernel: %s", why_not)
    return "torch"


def _keys_of(values: Tensor, index: Tensor, offset: int) -> Tensor:
    """`kernel.fused_topk`'s output as fklip.retrieval.codec keys (q, S*k); a split's missing
    entries (index -1) get the smallest key, below every real one."""
    keys = keys_from(values, index + offset)
    return keys.masked_fill_(index < 0, NO_KEY)


def search_fused(queries: Tensor, gallery, k: int, query_chunk: int, gallery_chunk: int,
                 progress: bool, both_ways: bool):
    """`fklip.retrieval.chunked._search` with the fused kernel: same arguments (already checked)
    and results."""
    from fklip.retrieval.kernel import MAX_ELEMENTS, fused_topk  # imports triton

    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    rows_max = MAX_ELEMENTS // max(1, queries.shape[1])  # the kernel's int32 offsets
    query_chunk, gallery_chunk = min(query_chunk, rows_max), min(gallery_chunk, rows_max)
    k_row, k_col = min(k, n_gallery), min(k, n_query)
    best: dict[int, Tensor] = {}  # query tile start -> (q, <= k) keys of its best gallery rows
    best_col: list[Tensor] = []  # per gallery chunk: (c, <= k) keys of its best queries
    starts: Iterable[int] = range(0, n_gallery, gallery_chunk)
    if progress:
        starts = tqdm(starts, desc="fused top-k both ways" if both_ways else "fused top-k",
                      unit="gallery chunk")
    for c0 in starts:
        chunk = gallery_rows(gallery, c0, c0 + gallery_chunk, queries.device, dtype=None)  # (c, D)
        col = None  # (c, <= k) keys of this chunk's best queries so far
        for q0 in range(0, n_query, query_chunk):
            query = queries[q0:q0 + query_chunk]  # (q, D)
            values, index = fused_topk(query, chunk, min(k_row, chunk.shape[0]))
            best[q0] = merge(best.get(q0), _keys_of(values, index, c0), k_row)
            if both_ways:
                values, index = fused_topk(chunk, query, min(k_col, query.shape[0]))
                col = merge(col, _keys_of(values, index, q0), k_col)
        if both_ways:
            best_col.append(col)
    ab = decode(torch.cat([best[q0] for q0 in sorted(best)]))
    return ab, (decode(torch.cat(best_col)) if both_ways else None)
