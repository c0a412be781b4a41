"""Exact chunked top-k on torch: one implementation shared by training and evaluation (spec 4.2).

The original ranks every (id, score) pair with Python's stable sort on descending score, so equal
scores keep gallery (feature-file) order: the lower index wins. `topk_chunked` reproduces that rule
exactly without sorting whole rows and without ever holding a (Q, N) matrix:

* scores are float32 (fp16/bf16 inputs are upcast before the matmul, on every device), computed
  one tile of at most SCORE_TILE (and query_chunk x gallery_chunk) into one reused buffer;
* each tile row's columns are split into groups of s; one pass takes the group maxima, `torch.topk`
  on the maxima picks the k groups holding the row's best scores, and `torch.topk` over those
  k * s candidates finds the k best *values*. Only when a tie straddles the cut (more scores equal
  to the k-th value than places left), or the k-th value equals an unpicked group's max, is the
  row re-ranked over the whole tile;
* candidates are packed into unique int64 keys (fklip.retrieval.codec: order-preserving score
  bits << 32 | inverted index), so merging the running top-k with a tile is one `torch.topk` with
  a single correct answer;
* `topk_both_ways` selects along the rows and along the columns of the same tile, so the two
  directions of a retrieval evaluation cost one matmul instead of two;
* for fp16/bf16 features on CUDA (method "auto", or "fused" for any), fklip.retrieval.fused runs the
  matmul and the selection in one Triton kernel instead (no score tile in memory; fp16 read as
  fp16) and merges the same keys; this torch path is its fallback and oracle.

Given the same float32 scores, the result is identical to `topk_reference` (full matrix + stable
sort) for any chunk sizes. The scores themselves are BLAS float32 dot products, whose last bit may
depend on the matmul shape (MKL, cuBLAS); they are bit-identical across chunkings whenever the
dot products are exact, e.g. for features on a coarse dyadic grid, which is what the tests use.
-0.0 and +0.0 are one score, reported as +0.0.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from fklip.errors import DataError
from fklip.retrieval.codec import NO_KEY, decode, keys_from, merge
from fklip.retrieval.fused import resolve_method, search_fused
from fklip.retrieval.inputs import Gallery, check_inputs, gallery_rows

logger = logging.getLogger(__name__)

# Largest score tile (query rows, gallery rows): 256 MiB of float32. Big tiles amortise the per-row
# cost of the selection over more scores; tuned on 2 CPU cores (benchmarks/RESULTS.md). `tile_sizes`
# cuts the inputs into equal tiles no larger than this.
SCORE_TILE = (4096, 16384)


# ---- top-k ----

def _check_scores(values: Tensor) -> None:
    """`values` are selected scores; torch.topk and amax rank NaN first, so any NaN shows here."""
    if torch.isnan(values).any():  # finite inputs can still overflow to inf - inf
        raise DataError("top-k: a score is NaN (float32 overflow in a dot product); "
                        "normalise the features")


def _chunk_top_keys(scores: Tensor, m: int, offset: int) -> Tensor:
    """Keys of the m best entries of each row of `scores` (q, g) under the tie rule: (q, m)."""
    # One extra place tells whether a tie straddles the cut: more than m scores reach the m-th
    # value exactly when the (m+1)-th value equals it.
    extra = int(m < scores.shape[1])
    values, idx = torch.topk(scores, m + extra, dim=1)  # (q, m + extra); ties in any order
    _check_scores(values)
    keys = keys_from(values[:, :m], idx[:, :m] + offset)  # (q, m)
    if extra:
        # topk's choice among the scores equal to the m-th value is arbitrary; where it could not
        # take them all, re-rank the row over the whole chunk with exact keys.
        _redo_tied(keys, scores, values, values[:, m] == values[:, m - 1], offset)
    return keys


def _redo_tied(keys: Tensor, scores: Tensor, values: Tensor, tied: Tensor, offset: int) -> None:
    """Replace `keys` (q, m) in the rows where `tied` (q,) with `_exact_row_keys` over the whole
    row of `scores` (q, g); `values` (q, >= m) are the best values found. A tile whose rows all
    tie is used as it is, not copied."""
    rows = torch.nonzero(tied).flatten()
    if not rows.numel():
        return
    m = keys.shape[1]
    sub = scores if rows.numel() == scores.shape[0] else scores[rows]
    keys[rows] = _exact_row_keys(sub, m, offset, values[rows, :m], keys[rows])


def _exact_row_keys(scores: Tensor, m: int, offset: int, values: Tensor, keys: Tensor) -> Tensor:
    """The exact path for rows (r, g) whose m-th best value is tied beyond the cut: every entry
    above it, then the entries equal to it in index order (the tie rule), as keys (r, m) in any
    order. `values` (r, m) are the m best values found, so `values[:, -1]` is the row's m-th
    value and every entry above it is among them; `keys` are their keys.

    The entries equal to the m-th value come from an int32 rank per entry (its position where
    the score reaches the m-th value) and a topk over the ranks; only m entries get keys, not the
    whole row. On features where every row ties (4,096 x 32,528, 256 images each repeated), int64
    keys for every entry made `topk_chunked` take 3.05 s; this takes 0.73 s (no ties: 0.32 s).
    """
    kth = values[:, -1:]  # (r, 1)
    index = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int32)
    rank = torch.where(scores >= kth, index, torch.iinfo(torch.int32).max)  # (r, g)
    pos = torch.topk(rank, m, dim=1, largest=False).indices  # the m first entries >= kth: (r, m)
    found = scores.gather(1, pos)
    # ties from the scan, entries above from the keys given: each entry once, at least m in all
    ties = torch.where(found == kth, keys_from(found, pos + offset), NO_KEY)
    above = torch.where(values > kth, keys, NO_KEY)
    return torch.topk(torch.cat([above, ties], dim=1), m, dim=1).values


def _group_size(n: int, m: int) -> int:
    """Entries per group for `_top_keys`: the power of two nearest sqrt(n / m), which balances the
    topk over group maxima (n / s per row) against the topk over candidates (m * s per row)."""
    return 1 << max(0, round(math.log2(math.sqrt(n / m))))


def _top_keys(scores: Tensor, m: int, offset: int) -> Tensor:
    """The same key set as `_chunk_top_keys(scores, m, offset)` (either in any order: `merge`
    sorts), selected mostly from group maxima.

    `scores` (q, g) may be a transposed view. The g columns are split into G groups of s
    (group r = columns r, r + G, r + 2G, ...; the last g - G*s columns are always candidates).
    One pass takes each group's max (q, G); the m groups with the largest maxima hold every entry
    that beats the (m+1)-th largest group max `t`, so when the m-th best candidate is above `t`
    the row's top m lies among the m*s candidates. Rows where it equals `t` (an exact tie with an
    unread entry) or where a tie straddles the cut are re-ranked over the whole row.
    """
    n_rows, n_cols = scores.shape
    s = _group_size(n_cols, m)
    n_groups = n_cols // s
    if s < 4 or n_groups <= m:  # groups would not cut the work
        return _chunk_top_keys(scores, m, offset)
    device = scores.device
    body = scores[:, :n_groups * s].view(n_rows, s, n_groups)  # (q, s, G), group r = body[:, :, r]
    if body.stride(0) == 1:  # a transposed tile: reduce whole rows of memory, transpose the maxima
        group_max = torch.amax(body.permute(1, 2, 0), dim=0).T.contiguous()  # (q, G)
    else:
        group_max = torch.amax(body, dim=1)  # (q, G); NaN propagates
    top_max, top_group = torch.topk(group_max, m + 1, dim=1)  # (q, m + 1)
    members = torch.arange(0, n_groups * s, n_groups, device=device)  # (s,) column offsets
    cols = (top_group[:, :m, None] + members).flatten(1)  # (q, m * s)
    if n_groups * s < n_cols:
        tail = torch.arange(n_groups * s, n_cols, device=device).expand(n_rows, -1)
        cols = torch.cat([cols, tail], dim=1)  # (q, m * s + tail)
    values, pos = torch.topk(scores.gather(1, cols), m + 1, dim=1)  # (q, m + 1)
    _check_scores(values)
    keys = keys_from(values[:, :m], cols.gather(1, pos[:, :m]) + offset)  # (q, m)
    tied = (values[:, m] == values[:, m - 1]) | (values[:, m - 1] <= top_max[:, m])
    _redo_tied(keys, scores, values, tied, offset)
    return keys


def _even_tile(n: int, cap: int) -> int:
    """Rows per tile that cut n rows into the fewest tiles of at most `cap` rows, all of about one
    size: on 2 CPU cores, 20,000 rows as 16,384 + 3,616 run the matmul ~10% slower than 2 x 10,000."""
    return -(-n // -(-n // cap))


def tile_sizes(n_query: int, n_gallery: int, query_chunk: int = 4096,
               gallery_chunk: int = 65536) -> tuple[int, int]:
    """The score tile (query rows, gallery rows) `topk_chunked` and `topk_both_ways` use for these
    sizes: at most SCORE_TILE and query_chunk x gallery_chunk, cut evenly (the gallery figure is
    for its first gallery_chunk rows; a shorter last chunk gets tiles no larger)."""
    return (_even_tile(n_query, min(query_chunk, SCORE_TILE[0])),
            _even_tile(min(n_gallery, gallery_chunk), min(gallery_chunk, SCORE_TILE[1])))


def _scores_into(buffer: Tensor, query: Tensor, rows: Tensor) -> Tensor:
    """query @ rows.T (q, g) float32, written into the front of `buffer`."""
    scores = buffer[:query.shape[0] * rows.shape[0]].view(query.shape[0], rows.shape[0])
    return torch.mm(query, rows.T, out=scores)


@torch.no_grad()
def topk_chunked(queries: Tensor, gallery: Gallery, k: int, *, query_chunk: int = 4096,
                 gallery_chunk: int = 65536, progress: bool = False,
                 method: str = "auto") -> tuple[Tensor, Tensor]:
    """The k highest inner products of each query with the gallery, best first; equal scores keep
    gallery order. Memory is one float32 score tile of at most query_chunk x gallery_chunk, capped
    at SCORE_TILE (plus, for rows whose ties straddle the cut, int64 keys for those rows), never
    Q x N. On CUDA the matmul is float32; if TF32 matmuls are enabled globally, scores are
    TF32-rounded.

    queries: (Q, D) float32/float16/bfloat16 tensor, on any device.
    gallery: (N, D) tensor or numpy array / np.memmap, read gallery_chunk rows at a time and
        moved to the queries' device.
    Returns values (Q, min(k, N)) float32 and indices (Q, min(k, N)) int64 on the queries' device.
    method: "torch" (the path above), "fused" (fklip.retrieval.fused: the matmul and the selection in
        one Triton kernel, fp16/bf16 features read as they are; k <= 32), or "auto": fused for
        fp16/bf16 CUDA queries and gallery when it applies, torch otherwise. Both give the same results from the same
        float32 scores.
    Raises ConfigError for bad k, chunk sizes or method (or "fused" where it cannot run),
    DataError for bad shapes, dtypes, empty inputs or rows with NaN/inf.
    """
    return _search(queries, gallery, k, query_chunk, gallery_chunk, progress, False, method)[0]


@torch.no_grad()
def topk_both_ways(queries: Tensor, gallery: Gallery, k: int, *, query_chunk: int = 4096,
                   gallery_chunk: int = 65536, progress: bool = False, method: str = "auto"
                   ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Top-k in both directions from one matmul per score tile, e.g. text->image and image->text:
    ((values (Q, min(k, N)), indices) of each query's best gallery rows, (values (N, min(k, Q)),
    indices) of each gallery row's best queries), i.e. `topk_chunked(queries, gallery, k)` and
    `topk_chunked(gallery, queries, k)` computed from the same float32 scores, each with the tie
    rule of its own direction. They equal those two calls whenever gallery @ queries.T is bitwise
    the transpose of queries @ gallery.T: always for exact dot products (the tests' grid
    features); for random features it held with MKL on CPU (benchmarks/bench_retrieval.py checks).

    Arguments, dtypes, devices, memory and errors as `topk_chunked`, plus (N, min(k, Q)) int64
    running keys for the gallery side. The fused method runs its kernel once per direction.
    """
    ab, ba = _search(queries, gallery, k, query_chunk, gallery_chunk, progress, True, method)
    assert ba is not None  # both_ways=True always returns the second direction
    return ab, ba


def _search(queries: Tensor, gallery: Gallery, k: int, query_chunk: int, gallery_chunk: int,
            progress: bool, both_ways: bool, method: str
            ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """The loop behind `topk_chunked` and `topk_both_ways`: for each query tile, each gallery
    tile's scores are selected along rows and, when `both_ways`, along columns too."""
    check_inputs(queries, gallery, k, query_chunk, gallery_chunk, method)
    if resolve_method(queries, gallery, k, gallery_chunk, method) == "fused":
        try:
            return search_fused(queries, gallery, k, query_chunk, gallery_chunk, progress, both_ways)
        except Exception as e:  # a compile, resource or launch failure of the kernel itself
            if method == "fused":
                raise
            logger.warning("top-k: the fused kernel failed (%s: %s); searching on the torch path",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    k_row, k_col = min(k, n_gallery), min(k, n_query)
    device = queries.device
    values = torch.empty((n_query, k_row), dtype=torch.float32, device=device)  # (Q, k)
    indices = torch.empty((n_query, k_row), dtype=torch.int64, device=device)  # (Q, k)
    tile_q, tile_g = tile_sizes(n_query, n_gallery, query_chunk, gallery_chunk)
    # One buffer for every score tile, so no tile pays fresh page faults.
    buffer = torch.empty(tile_q * tile_g, dtype=torch.float32, device=device)
    best_col: dict[int, Tensor] = {}  # gallery tile start -> (g, <= k) keys of its best queries

    starts: Iterable[int] = range(0, n_query, tile_q)
    if progress:
        starts = tqdm(starts, desc="top-k both ways" if both_ways else "top-k", unit="query tile")
    for q0 in starts:
        query = queries[q0:q0 + tile_q].to(torch.float32)  # (q, D); no copy when already float32
        best = None  # (q, <= k) keys of the best hits so far
        for c0 in range(0, n_gallery, gallery_chunk):
            chunk = gallery_rows(gallery, c0, c0 + gallery_chunk, device)  # (c, D)
            tile = _even_tile(chunk.shape[0], tile_g)
            for g0 in range(0, chunk.shape[0], tile):
                scores = _scores_into(buffer, query, chunk[g0:g0 + tile])  # (q, g)
                keys = _top_keys(scores, min(k_row, scores.shape[1]), c0 + g0)  # (q, <= k)
                best = merge(best, keys, k_row)
                if both_ways:  # the same scores, column by column: (g, <= k) keys of query rows
                    keys = _top_keys(scores.T, min(k_col, scores.shape[0]), q0)
                    best_col[c0 + g0] = merge(best_col.get(c0 + g0), keys, k_col)
        values[q0:q0 + tile_q], indices[q0:q0 + tile_q] = decode(best)
    if not both_ways:
        return (values, indices), None
    return (values, indices), decode(torch.cat([best_col[g0] for g0 in sorted(best_col)]))


@torch.no_grad()
def topk_reference(queries: Tensor, gallery: Gallery, k: int) -> tuple[Tensor, Tensor]:
    """Slow oracle for `topk_chunked`: the full (Q, N) float32 score matrix and a stable sort on
    -score, as the original's Python sort. Same return format; -0.0 is reported as +0.0."""
    rows = gallery_rows(gallery, 0, gallery.shape[0], queries.device)  # (N, D)
    scores = queries.to(torch.float32) @ rows.T + 0.0  # (Q, N)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]  # (Q, min(k, N))
    return scores.gather(1, order), order
