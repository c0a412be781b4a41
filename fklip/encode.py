"""Plain PyTorch feature encoding in batches: the reference path that faster engines are held to.

Features are L2-normalised float32 rows written into a caller's array (in memory, or an
np.memmap when they do not fit), so encoding a large set never holds more than a batch twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fklip.background import in_background
from fklip.data.archive import ImageArchive, model_input_from_batch
from fklip.errors import DataError, preview
from fklip.model import Tokenizer, encode_text_trimmed


def prepare_model(model, device: str, precision: str):
    """Move the model to `device` in eval mode; bf16/fp16 precisions cast the weights."""
    model = model.to(device).eval()
    if precision in ("bf16", "fp16"):
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    return model


def _autocast(device: str, precision: str):
    """amp: fp16 autocast on CUDA, bf16 on the CPU; other precisions run as the weights are."""
    if precision != "amp":
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)


def _input_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


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


def _archive_batches(archive: ImageArchive, ids: list, batch_size: int, pin: bool):
    """The batches of `ids`; with `pin`, each read into pinned host memory (a torch tensor)."""
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        if not pin:
            yield archive.read_batch(chunk)
            continue
        pixels = archive.empty_pinned(len(chunk))
        archive.read_batch(chunk, out=pixels.numpy())
        yield pixels


@torch.no_grad()
def encode_archive(model, archive: ImageArchive, batch_size: int = 256, device: str = "cpu",
                   image_ids: Sequence | None = None, progress: bool = False,
                   precision: str = "fp32", out: np.ndarray | None = None,
                   read_ahead: bool | None = None) -> np.ndarray:
    """L2-normalised image features (N, D) float32, in archive order (or `image_ids` order).

    `read_ahead` (default: on CUDA) reads the next batches in a background thread (on CUDA into
    pinned memory) while the model encodes this one: the same features."""
    from tqdm import tqdm

    ids = list(archive.ids if image_ids is None else image_ids)
    dim = model.visual.output_dim
    out = alloc_features(len(ids), dim, out)
    dtype = _input_dtype(model)
    cuda = str(device).startswith("cuda")
    batches = _archive_batches(archive, ids, batch_size, pin=cuda)
    row = 0
    with tqdm(total=len(ids), desc="encode images", unit="img", disable=not progress) as bar, \
            in_background(batches, enabled=cuda if read_ahead is None else read_ahead) as ready:
        for batch in ready:
            x = model_input_from_batch(batch, archive.encoding, device=device, dtype=dtype)  # (B, 3, H, W)
            with _autocast(device, precision):
                emb = model.encode_image(x)  # (B, D)
            emb = F.normalize(emb.float(), dim=-1).cpu().numpy()
            check_finite_images(emb, archive, ids[row:row + len(batch)])
            out[row:row + len(batch)] = emb
            row += len(batch)
            bar.update(len(batch))
    return out


@torch.no_grad()
def encode_texts(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: str = "cpu", progress: bool = False, precision: str = "fp32",
                 out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised text features (N, D) float32, in the order given."""
    from tqdm import tqdm

    dim = model.visual.output_dim  # the shared embedding width
    out = alloc_features(len(texts), dim, out)
    with tqdm(total=len(texts), desc="encode texts", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens = tokenizer(chunk)  # (B, context_length), cut on the host, then copied
            with _autocast(device, precision):
                emb = encode_text_trimmed(model, tokens, device)  # (B, D)
            out[start:start + len(chunk)] = F.normalize(emb.float(), dim=-1).cpu().numpy()
            bar.update(len(chunk))
    return out
