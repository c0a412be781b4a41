"""Exact chunked top-k and recall@K: one implementation shared by training and evaluation (spec 4.2).

The original ranks every (id, score) pair with Python's stable sort on descending score, so equal
scores keep gallery (feature-file) order: the lower index wins. `topk_chunked` reproduces that rule
exactly without sorting whole rows and without ever holding a (Q, N) matrix:

* each chunk's scores are float32 (fp16/bf16 inputs are upcast before the matmul, on every device);
* `torch.topk` on the float scores finds each row's k best *values*; only when a row has more
  scores equal to its k-th value than places left (a tie straddling the cut) is that row re-ranked
  over the whole chunk;
* candidates are packed into unique int64 keys (order-preserving score bits << 32 | inverted index),
  so merging the running top-k with a chunk is one `torch.topk` with a single correct answer.

Given the same float32 scores, the result is identical to `topk_reference` (full matrix + stable
sort) for any chunk sizes. The scores themselves are BLAS float32 dot products, whose last bit may
depend on the matmul shape (MKL, cuBLAS); they are bit-identical across chunkings whenever the
dot products are exact, e.g. for features on a coarse dyadic grid, which is what the tests use.
-0.0 and +0.0 are one score, reported as +0.0.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from fklip.errors import ConfigError, DataError, preview, raise_collected

logger = logging.getLogger(__name__)

Gallery = Union[Tensor, np.ndarray]  # an np.memmap is an np.ndarray

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_LOW32 = 0xFFFFFFFF  # the low half of a key holds _LOW32 - index, so a lower index is a larger key
_SHIFT = 1 << 32


class MissingPredictionError(DataError):
    """A gold key has no prediction. `.key` is the key object itself (an int or a str)."""

    def __init__(self, key: object) -> None:
        super().__init__(f"gold key {key!r} has no prediction: it is in the gold file "
                         "but missing from the predictions")
        self.key = key


# ---- top-k ----

def _gallery_rows(gallery: Gallery, start: int, stop: int, device: torch.device) -> Tensor:
    """Rows [start, stop) as float32 on `device`; a memmap is only read for these rows."""
    if isinstance(gallery, Tensor):
        rows = gallery[start:stop]
    else:
        # Copy: this reads a memmap's rows, and torch cannot wrap a read-only array safely.
        rows = torch.from_numpy(np.array(gallery[start:stop]))
    return rows.to(device=device, dtype=torch.float32)  # (stop - start, D)


def _bad_rows(x: Gallery, chunk: int, device: torch.device) -> list[int]:
    """Row numbers holding NaN or inf, read chunk by chunk so a memmap is never loaded whole."""
    bad: list[int] = []
    for start in range(0, x.shape[0], chunk):
        rows = _gallery_rows(x, start, start + chunk, device)  # (c, D)
        # A row sum is non-finite whenever the row holds NaN or inf, and summing is far cheaper
        # than a full isfinite mask; a finite row whose sum overflows is cleared by the exact test.
        suspect = torch.nonzero(~torch.isfinite(rows.sum(dim=1))).flatten()
        if suspect.numel():
            exact = ~torch.isfinite(rows[suspect]).all(dim=1)
            bad += (suspect[exact] + start).tolist()
    return bad


def _check_inputs(queries: Tensor, gallery: Gallery, k: int, query_chunk: int,
                  gallery_chunk: int) -> None:
    """Collect every problem with the arguments, then raise once."""
    flags = [f"{name} must be an int >= 1, got {value!r}"
             for name, value in (("k", k), ("query_chunk", query_chunk),
                                 ("gallery_chunk", gallery_chunk))
             if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1]
    raise_collected(flags, "top-k: bad arguments", ConfigError)

    problems = []
    for name, x in (("queries", queries), ("gallery", gallery)):
        if isinstance(x, Tensor):
            dtype_ok, allowed = x.dtype in _FLOAT_DTYPES, "float32, float16 or bfloat16"
        elif isinstance(x, np.ndarray) and name == "gallery":
            dtype_ok, allowed = x.dtype in _NUMPY_DTYPES, "float32 or float16"
        else:
            kinds = "a torch tensor or a numpy array" if name == "gallery" else "a torch tensor"
            problems.append(f"{name} must be {kinds}, got {type(x).__name__}")
            continue
        if x.ndim != 2:
            problems.append(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
        elif not dtype_ok:
            problems.append(f"{name} must be {allowed}, got {x.dtype}")
        elif x.shape[0] == 0:
            problems.append(f"{name} is empty (0 rows)")
    if not problems and queries.shape[1] != gallery.shape[1]:
        problems.append(f"queries have dim {queries.shape[1]} but gallery rows have dim "
                        f"{gallery.shape[1]}")
    if not problems and gallery.shape[0] > _LOW32:
        problems.append(f"gallery has {gallery.shape[0]} rows; at most {_LOW32} are supported")
    raise_collected(problems, "top-k: bad inputs")

    for name, x, chunk in (("queries", queries, query_chunk), ("gallery", gallery, gallery_chunk)):
        bad = _bad_rows(x, chunk, queries.device)
        if bad:
            problems.append(f"{name}: {len(bad)} of {x.shape[0]} rows contain NaN or inf "
                            f"(rows {preview(bad)}); re-extract those features")
    raise_collected(problems, "top-k: non-finite features")


def _keys_from(values: Tensor, indices: Tensor) -> Tensor:
    """Pack float32 scores and int64 gallery indices into int64 keys ordered like
    (score descending, index ascending): a larger key is a better hit, and no two keys are equal."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    # Negative floats sort backwards as ints: flip their 31 magnitude bits to make the map monotone.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # within int32 range
    return ordered * _SHIFT + (_LOW32 - indices)


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `_keys_from`: (values float32, indices int64)."""
    ordered = torch.div(keys, _SHIFT, rounding_mode="floor")  # floor keeps the low half >= 0
    indices = _LOW32 - (keys - ordered * _SHIFT)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32), indices


def _chunk_top_keys(scores: Tensor, m: int, offset: int) -> Tensor:
    """Keys of the m best entries of each row of `scores` (q, g) under the tie rule: (q, m)."""
    # One extra place tells whether a tie straddles the cut: more than m scores reach the m-th
    # value exactly when the (m+1)-th value equals it.
    extra = int(m < scores.shape[1])
    values, idx = torch.topk(scores, m + extra, dim=1)  # (q, m + extra); ties in any order
    if torch.isnan(values).any():  # finite inputs can still overflow to inf - inf
        raise DataError("top-k: a score is NaN (float32 overflow in a dot product); "
                        "normalise the features")
    keys = _keys_from(values[:, :m], idx[:, :m] + offset)  # (q, m)
    if extra:
        # topk's choice among the scores equal to the m-th value is arbitrary; where it could not
        # take them all, re-rank the row over the whole chunk with exact keys.
        rows = torch.nonzero(values[:, m] == values[:, m - 1]).flatten()
        if rows.numel():
            index = torch.arange(offset, offset + scores.shape[1], device=scores.device)
            keys[rows] = torch.topk(_keys_from(scores[rows], index), m, dim=1).values
    return keys


@torch.no_grad()
def topk_chunked(queries: Tensor, gallery: Gallery, k: int, *, query_chunk: int = 4096,
                 gallery_chunk: int = 65536, progress: bool = False) -> tuple[Tensor, Tensor]:
    """The k highest inner products of each query with the gallery, best first; equal scores keep
    gallery order. Memory is one query_chunk x gallery_chunk float32 score block (plus, for rows
    whose ties straddle the cut, int64 keys for those rows), never Q x N. On CUDA the matmul is
    float32; if TF32 matmuls are enabled globally, scores are TF32-rounded.

    queries: (Q, D) float32/float16/bfloat16 tensor, on any device.
    gallery: (N, D) tensor or numpy array / np.memmap, read gallery_chunk rows at a time and
        moved to the queries' device.
    Returns values (Q, min(k, N)) float32 and indices (Q, min(k, N)) int64 on the queries' device.
    Raises ConfigError for bad k or chunk sizes, DataError for bad shapes, dtypes, empty inputs
    or rows with NaN/inf.
    """
    _check_inputs(queries, gallery, k, query_chunk, gallery_chunk)
    n_query, n_gallery = queries.shape[0], gallery.shape[0]
    k = min(k, n_gallery)
    device = queries.device
    values = torch.empty((n_query, k), dtype=torch.float32, device=device)  # (Q, k)
    indices = torch.empty((n_query, k), dtype=torch.int64, device=device)  # (Q, k)

    starts: Iterable[int] = range(0, n_query, query_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="top-k", unit="query chunk")
    for q0 in starts:
        query = queries[q0:q0 + query_chunk].to(torch.float32)  # (q, D)
        best = None  # (q, <= k) keys of the best hits so far
        for g0 in range(0, n_gallery, gallery_chunk):
            rows = _gallery_rows(gallery, g0, g0 + gallery_chunk, device)  # (g, D)
            scores = query @ rows.T  # (q, g) float32
            keys = _chunk_top_keys(scores, min(k, scores.shape[1]), g0)  # (q, min(k, g))
            if best is not None:
                keys = torch.cat([best, keys], dim=1)  # (q, <= 2k)
            # Keys are unique, so topk has exactly one answer, already sorted best first.
            best = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
        values[q0:q0 + query_chunk], indices[q0:q0 + query_chunk] = _decode(best)
    return values, indices


@torch.no_grad()
def topk_reference(queries: Tensor, gallery: Gallery, k: int) -> tuple[Tensor, Tensor]:
    """Slow oracle for `topk_chunked`: the full (Q, N) float32 score matrix and a stable sort on
    -score, as the original's Python sort. Same return format; -0.0 is reported as +0.0."""
    rows = _gallery_rows(gallery, 0, gallery.shape[0], queries.device)  # (N, D)
    scores = queries.to(torch.float32) @ rows.T + 0.0  # (Q, N)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]  # (Q, min(k, N))
    return scores.gather(1, order), order


# ---- recall (spec 4.2, `compute_score`) ----

def recall_at_ks(predictions: Mapping[str, Sequence[str]], gold: Mapping[str, Sequence[str]],
                 ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Any-hit recall over every gold key: a hit at K when any gold id is among the first K
    predicted ids. Keys and ids are already in their `id_key` string form. Predictions for keys
    absent from the gold are ignored.

    Returns {"total": number of gold keys, "hits": {K: count}, "recall": {K: count * 1.0 / total}}.
    Raises MissingPredictionError for the first gold key without a prediction, DataError for an
    empty gold.
    """
    if not gold:
        raise DataError("recall: the gold is empty; expected at least one key")
    hits = {k: 0 for k in ks}
    for key, gold_ids in gold.items():
        if key not in predictions:
            raise MissingPredictionError(key)
        ranked = predictions[key]
        wanted = set(gold_ids)
        for k in ks:
            hits[k] += not wanted.isdisjoint(ranked[:k])
    total = len(gold)
    return {"total": total, "hits": hits, "recall": {k: h * 1.0 / total for k, h in hits.items()}}


def score_json(hits: Mapping[int, int], total: int) -> dict:
    """The original's success output, with its float order: R = hits * 1.0 / total, mean of the
    three R, then each times 100. `json.dumps` of it matches the original's digits."""
    if total <= 0:
        raise DataError(f"recall: the gold has {total} keys; expected at least one")
    missing = [k for k in (1, 5, 10) if k not in hits]
    if missing:
        raise DataError(f"recall: hits lack K = {preview(missing)}; the score needs K = 1, 5, 10")
    r1, r5, r10 = (hits[k] * 1.0 / total for k in (1, 5, 10))
    mean_recall = (r1 + r5 + r10) / 3
    mean_recall, r1, r5, r10 = (x * 100 for x in (mean_recall, r1, r5, r10))
    return {"success": True, "score": mean_recall,
            "scoreJson": {"score": mean_recall, "mean_recall": mean_recall,
                          "r1": r1, "r5": r5, "r10": r10}}


def failure_json(key: object) -> dict:
    """The original's failure output; `key` (e.g. the missing gold key) keeps its type."""
    return {"errorDetail": key, "errorMsg": key, "score": 0, "scoreJson": {}, "success": False}
