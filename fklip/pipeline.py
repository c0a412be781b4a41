"""The batched feature pipeline: one code path for every runner.

Batches are prepared in a background thread (images read from the archive, texts tokenised), at
most `AHEAD` batches ahead of the runner, so reading overlaps encoding. When the runner is on a
CUDA device, image batches are read straight into pinned host memory (in READ_THREADS threads),
so the copy to the device is asynchronous; for runners that take device tensors (torch), the
reading thread issues that copy itself on a side stream, so batch i+1 crosses the bus while batch
i computes. uint8 pixels travel as uint8 and the runner normalises them. Results are
written in input order into the caller's array (which may be an np.memmap). Every runner goes
through it: the engines' torch, onnxruntime and TensorRT runners for `fklip eval` and `fklip
extract`, and `fklip.runner.ModelRunner` for training's knowledge refresh and validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from fklip.background import in_background
from fklip.data.archive import ImageArchive
from fklip.errors import ConfigError, DataError, preview
from fklip.runner import Runner, check_tokenizer

logger = logging.getLogger(__name__)

READ_THREADS = 4  # threads copying one pinned batch out of the archive (see _read_batches)


def alloc_features(n: int, dim: int, out: np.ndarray | None) -> np.ndarray:
    """`out` (checked to be (n, dim)), or a new float32 (n, dim) array when it is None."""
    if out is None:
        return np.empty((n, dim), np.float32)
    if out.shape != (n, dim):
        raise ValueError(f"output array has shape {out.shape}, expected {(n, dim)}")
    return out


def check_finite_images(emb: np.ndarray, archive: ImageArchive, ids: Sequence) -> None:
    """Raise DataError naming the archive and the images whose feature rows are not finite.

    `emb` (B, D) holds the features of `ids` (B ids). Unchecked, a NaN image stops the search or
    the feature writer later, naming a row number instead of the archive and the image; one pass
    over the batch's features costs far less than encoding it."""
    finite = np.isfinite(emb).all(axis=1)  # (B,)
    if finite.all():
        return
    bad = [ids[i] for i in np.flatnonzero(~finite)]
    bad_pixels = [i for i in bad if not np.isfinite(archive.read(i)).all()]  # only the few bad rows read again
    what = f"image {bad[0]!r} gives" if len(bad) == 1 else f"{len(bad)} images ({preview(bad)}) give"
    if len(bad_pixels) == len(bad):
        why = "its pixels hold NaN or inf" if len(bad) == 1 else "their pixels hold NaN or inf"
    elif bad_pixels:
        why = f"the pixels of {preview(bad_pixels)} hold NaN or inf; the others' are finite"
    else:  # NaN weights, or an overflow in fp16
        why = (f"{'its pixels are' if len(bad) == 1 else 'their pixels are all'} finite: the model gives "
               "NaN or inf (NaN weights, or an overflow at a low precision)")
    raise DataError(f"{archive.path}: {what} non-finite features ({why})")


def _store(out: np.ndarray, rows: slice | np.ndarray, emb: np.ndarray, n: int) -> None:
    """Write a batch's (n, D) features into `out[rows]`, checking the runner gave one row per input."""
    if emb.shape != (n, out.shape[1]):
        raise RuntimeError(f"the runner returned features of shape {emb.shape} for {n} inputs; "
                           f"expected {(n, out.shape[1])}")
    out[rows] = emb


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size: expected a positive integer, got {batch_size!r}")


def _on_cuda(runner: Runner) -> bool:
    return str(runner.device).startswith("cuda")


def _read_rows(archive: ImageArchive, ids: list, out: np.ndarray, start: int, stop: int) -> None:
    archive.read_batch(ids[start:stop], out=out[start:stop])


def _read_batches(archive: ImageArchive, ids: list, batch_size: int, pin: bool) -> Iterator[tuple[int, object]]:
    """(first row, batch) pairs; a batch is (B, ...) numpy, or a pinned torch tensor when `pin`.

    Pinned batches feed a GPU, which can take over 50,000 images/s: more than one core copies
    from the archive's memory map (about 9 GB/s, 60,000 224-px images/s), so each batch is read
    in READ_THREADS slices at once (numpy releases the GIL while it copies)."""
    if not pin:
        for start in range(0, len(ids), batch_size):
            yield start, archive.read_batch(ids[start:start + batch_size])
        return
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="fklip-read") as pool:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            batch = archive.empty_pinned(len(chunk))
            out = batch.numpy()
            cuts = np.linspace(0, len(chunk), min(READ_THREADS, len(chunk)) + 1).astype(int)
            list(pool.map(partial(_read_rows, archive, chunk, out), cuts[:-1], cuts[1:]))
            yield start, batch


def encode_archive(runner: Runner, archive: ImageArchive, batch_size: int = 256,
                   image_ids: Sequence | None = None, out: np.ndarray | None = None,
                   progress: bool = False) -> np.ndarray:
    """L2-normalised image features (N, D) float32, in archive order (or `image_ids` order)."""
    _check_batch_size(batch_size)
    ids = list(archive.ids if image_ids is None else image_ids)
    archive.check_image_size(runner.image_size, runner.model_name)
    archive.require(ids, "the image ids to encode")
    out = alloc_features(len(ids), runner.embed_dim, out)
    pin = _on_cuda(runner)
    batches = _read_batches(archive, ids, batch_size, pin)
    upload = pin and getattr(runner, "takes_device_tensors", False)
    if upload:  # copy to the GPU from the reading thread, on a side stream: overlaps the encoding
        batches = _uploaded(batches, runner.device)
    with tqdm(total=len(ids), desc="encode images", unit="img", disable=not progress) as bar, \
            in_background(batches) as ready:
        for row, batch in ready:
            if upload:
                batch = _ready_on_device(*batch)
            emb = runner.encode_images(batch)  # (B, D)
            _store(out, slice(row, row + len(batch)), emb, len(batch))
            check_finite_images(emb, archive, ids[row:row + len(batch)])
            bar.update(len(batch))
    return out


def _uploaded(batches: Iterable[tuple[int, object]], device: str) -> Iterator[tuple[int, tuple]]:
    """(row, (device tensor, copy-done event)) for pinned (row, batch) pairs: each copy is issued
    on a side stream in the reading thread, so batch i+1 crosses the bus while batch i computes."""
    stream = torch.cuda.Stream(device=device)
    for row, batch in batches:
        with torch.cuda.stream(stream):
            x = batch.to(device, non_blocking=True)  # the host allocator keeps `batch` until done
            done = torch.cuda.Event()
            done.record(stream)
        yield row, (x, done)


def _ready_on_device(x, done):
    """Make the current stream wait for `x`'s copy, and tell the allocator `x` is used there."""
    stream = torch.cuda.current_stream(x.device)
    stream.wait_event(done)
    x.record_stream(stream)
    return x


SORT_CHUNK_BATCHES = 64  # texts are grouped by length within chunks of this many batches


def batches_by_length(ids: np.ndarray, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, ids) batches of token ids (C, L) ordered by end-token position (stable); rows are
    offset by `start`."""
    order = np.argsort(ids.argmax(axis=1), kind="stable")
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        yield start + rows, ids[rows]


def _tokenize_batches(tokenizer, texts: Sequence[str], batch_size: int,
                      by_length: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, ids) pairs: batches of captions, with their input rows.

    With `by_length`, within each chunk of SORT_CHUNK_BATCHES batches the captions are ordered by
    token length (stable), so a batch cut after its last end token carries little padding;
    without, batches keep the input order. Memory stays at one chunk of token ids.
    """
    chunk = batch_size * SORT_CHUNK_BATCHES
    for start in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[start:start + chunk])).numpy()  # (C, context) int64
        if by_length:
            yield from batches_by_length(ids, batch_size, start)
        else:
            for b in range(0, len(ids), batch_size):
                yield np.arange(start + b, start + min(b + batch_size, len(ids))), ids[b:b + batch_size]


def _encode_batches(runner: Runner, batches: Iterable[tuple[np.ndarray, np.ndarray]], out: np.ndarray,
                    desc: str, progress: bool) -> np.ndarray:
    """Run (rows, ids) batches (read one ahead in the background) into `out`'s rows."""
    with tqdm(total=len(out), desc=desc, unit="text", disable=not progress) as bar, \
            in_background(batches) as ready:
        for rows, ids in ready:
            _store(out, rows, runner.encode_texts(ids), len(rows))  # (B, D)
            bar.update(len(rows))
    return out


def encode_texts(runner: Runner, tokenizer, texts: Sequence[str], batch_size: int = 256,
                 out: np.ndarray | None = None, progress: bool = False, by_length: bool = True) -> np.ndarray:
    """L2-normalised text features (N, D) float32, in the order given.

    `tokenizer` must be the runner's model's (`fklip.runner.tokenizer_for(runner)`). By default
    batches are formed from captions of similar length (see `_tokenize_batches`): a row's features
    do not depend on the other rows of its batch beyond the last bits of float32 (a batch's
    length changes how the matrix products are blocked); `by_length=False` keeps the input order,
    as training's knowledge refresh does, so its features are those of the batches it always had.
    """
    _check_batch_size(batch_size)
    check_tokenizer(runner, tokenizer)
    out = alloc_features(len(texts), runner.embed_dim, out)
    batches = _tokenize_batches(tokenizer, texts, batch_size, by_length)
    return _encode_batches(runner, batches, out, "encode texts", progress)


def encode_ids(runner: Runner, ids: np.ndarray, batch_size: int = 256, out: np.ndarray | None = None,
               progress: bool = False) -> np.ndarray:
    """`encode_texts` for captions already tokenised: (N, L) ids -> (N, D) features, in order;
    batches grouped by length over the whole array."""
    _check_batch_size(batch_size)
    out = alloc_features(len(ids), runner.embed_dim, out)
    return _encode_batches(runner, batches_by_length(np.asarray(ids), batch_size), out, "encode ids", progress)
