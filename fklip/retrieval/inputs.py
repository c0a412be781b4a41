"""A search's inputs, shared by both top-k paths: the `Gallery` type, reading gallery rows chunk by
chunk (`gallery_rows`: a memmap is never loaded whole) and checking every argument and feature row
before any work (`check_inputs`)."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

from fklip.errors import ConfigError, preview, raise_collected
from fklip.retrieval.codec import LOW32

Gallery = Union[Tensor, np.ndarray]  # an np.memmap is an np.ndarray

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# "auto": the fused Triton kernel (fklip.retrieval.fused) for fp16/bf16 on CUDA where it applies.
METHODS = ("auto", "torch", "fused")


def gallery_rows(gallery: Gallery, start: int, stop: int, device: torch.device,
                 dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Rows [start, stop) as `dtype` (None: their own) on `device`; a memmap is only read for
    these rows."""
    if isinstance(gallery, Tensor):
        rows = gallery[start:stop]
    else:
        # Copy: this reads a memmap's rows, and torch cannot wrap a read-only array safely.
        rows = torch.from_numpy(np.array(gallery[start:stop]))
    return rows.to(device=device, dtype=dtype or rows.dtype)  # (stop - start, D)


def _bad_rows(x: Gallery, chunk: int, device: torch.device) -> list[int]:
    """Row numbers holding NaN or inf, read chunk by chunk so a memmap is never loaded whole."""
    bad: list[int] = []
    for start in range(0, x.shape[0], chunk):
        rows = gallery_rows(x, start, start + chunk, device)  # (c, D)
        # A row sum is non-finite whenever the row holds NaN or inf, and summing is far cheaper
        # than a full isfinite mask; a finite row whose sum overflows is cleared by the exact test.
        suspect = torch.nonzero(~torch.isfinite(rows.sum(dim=1))).flatten()
        if suspect.numel():
            exact = ~torch.isfinite(rows[suspect]).all(dim=1)
            bad += (suspect[exact] + start).tolist()
    return bad


def check_inputs(queries: Tensor, gallery: Gallery, k: int, query_chunk: int,
                 gallery_chunk: int, method: str = "torch") -> None:
    """Collect every problem with the arguments, then raise once."""
    flags = [f"{name} must be an int >= 1, got {value!r}"
             for name, value in (("k", k), ("query_chunk", query_chunk),
                                 ("gallery_chunk", gallery_chunk))
             if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1]
    if method not in METHODS:
        flags.append(f"method must be one of {', '.join(METHODS)}, got {method!r}")
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
    if not problems and gallery.shape[0] > LOW32:
        problems.append(f"gallery has {gallery.shape[0]} rows; at most {LOW32} are supported")
    raise_collected(problems, "top-k: bad inputs")

    for name, x, chunk in (("queries", queries, query_chunk), ("gallery", gallery, gallery_chunk)):
        bad = _bad_rows(x, chunk, queries.device)
        if bad:
            problems.append(f"{name}: {len(bad)} of {x.shape[0]} rows contain NaN or inf "
                            f"(rows {preview(bad)}); re-extract those features")
    raise_collected(problems, "top-k: non-finite features")
