"""`.npz` image archives (spec 1.1), read lazily member by member.

An archive maps image ids (member names without `.npy`) to one image each, in one of two
encodings:

- `float32_chw`: the original's float32 (3, H, W) arrays, already CLIP-normalised;
- `uint8_hwc`: raw uint8 (H, W, 3) pixels, four times smaller, normalised later (on the GPU when
  there is one) by `model_input_from_pixels`.

Uncompressed archives (what `np.savez` writes) are memory-mapped: a read is a view into the page
cache, and nothing is loaded until it is used. Compressed members are read through zipfile.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from fklip.data.jsonl import Id, id_key
from fklip.errors import DataError, check_input_file, preview, raise_collected
from fklip.io import atomic_output

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# encoding name -> (dtype, layout). The layout gives the shape from the image height and width.
ENCODINGS = {
    "float32_chw": (np.dtype(np.float32), lambda h, w: (3, h, w)),
    "uint8_hwc": (np.dtype(np.uint8), lambda h, w: (h, w, 3)),
}

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # deterministic archives: same content, same bytes


def encoding_of(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, tuple[int, int]] | None:
    """The encoding name and (H, W) of one member, or None if it fits neither encoding."""
    if dtype == np.float32 and len(shape) == 3 and shape[0] == 3:
        return "float32_chw", (shape[1], shape[2])
    if dtype == np.uint8 and len(shape) == 3 and shape[2] == 3:
        return "uint8_hwc", (shape[0], shape[1])
    return None


@dataclass(frozen=True)
class _Member:
    name: str            # zip member name, "<id>.npy"
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int | None  # byte offset of the array data in the file; None when compressed


_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream at `f`, leaving `f` at the array data.

    Archive members nearly always share one header text, so parsed headers are cached by their
    bytes: numpy's parser (an ast.literal_eval) would otherwise dominate opening a large archive.
    """
    preamble = f.read(8)
    if len(preamble) < 8 or preamble[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array")
    major = preamble[6]
    if major == 1:
        size_bytes = f.read(2)
        size = struct.unpack("<H", size_bytes)[0]
    elif major == 2:
        size_bytes = f.read(4)
        size = struct.unpack("<I", size_bytes)[0]
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    raw = preamble + size_bytes + f.read(size)
    parsed = _HEADER_CACHE.get(raw)
    if parsed is None:
        buf = io.BytesIO(raw)
        version = np.lib.format.read_magic(buf)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        parsed = reader(buf)
        if len(_HEADER_CACHE) < 1024:
            _HEADER_CACHE[raw] = parsed
    return parsed


class ImageArchive:
    """Lazy reader of an `.npz` image archive. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_input_file(path, "an image archive (.npz)")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{self.path}: not an .npz archive ({e})") from None
        self._mmap: np.memmap | None = None
        try:
            self._members = self._scan()
        except BaseException:
            self._zip.close()
            raise
        self.ids: list[str] = list(self._members)
        first = self._members[self.ids[0]]
        self.encoding, (self.height, self.width) = encoding_of(first.dtype, first.shape)
        if all(m.data_offset is not None for m in self._members.values()):
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._c_order = not any(m.fortran_order for m in self._members.values())

    def _scan(self) -> dict[str, _Member]:
        """Read every member's .npy header (a few hundred bytes each) and check them all."""
        members: dict[str, _Member] = {}
        problems: list[str] = []
        expected = None
        with open(self.path, "rb") as raw:
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    problems.append(f"member {info.filename!r} is not a .npy array")
                    continue
                key = info.filename[: -len(".npy")]
                if key in members:
                    problems.append(f"key {key!r} appears twice")
                    continue
                try:
                    if info.compress_type == zipfile.ZIP_STORED:
                        raw.seek(info.header_offset)
                        fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                        raw.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
                        shape, fortran, dtype = _read_npy_header(raw)
                        offset = raw.tell()
                    else:
                        with self._zip.open(info) as f:
                            shape, fortran, dtype = _read_npy_header(f)
                        offset = None
                except (ValueError, struct.error, zipfile.BadZipFile) as e:
                    problems.append(f"key {key!r}: unreadable array ({e})")
                    continue
                found = encoding_of(dtype, shape)
                if found is None:
                    problems.append(f"key {key!r}: {dtype} array of shape {shape}, expected float32 "
                                    "(3, H, W) or uint8 (H, W, 3)")
                    continue
                if expected is None:
                    expected = (found, key)
                elif found != expected[0]:
                    problems.append(f"key {key!r}: {found[0]} {found[1][0]}x{found[1][1]}, but key "
                                    f"{expected[1]!r} is {expected[0][0]} "
                                    f"{expected[0][1][0]}x{expected[0][1][1]}")
                    continue
                members[key] = _Member(info.filename, dtype, tuple(shape), fortran, offset)
        raise_collected(problems, f"{self.path}: bad image archive")
        if not members:
            raise DataError(f"{self.path}: the archive holds no images")
        return members

    # ---- queries ----

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: Id) -> bool:
        return id_key(image_id) in self._members

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one member: (3, H, W) or (H, W, 3)."""
        return self._members[self.ids[0]].shape

    def empty_pinned(self, n: int):
        """An empty (n, ...) torch tensor for n images in pinned host memory, in the archive's
        pixel dtype: `read_batch(ids, out=t.numpy())` fills it, and its copy to a GPU is then
        asynchronous (torch's caching host allocator recycles the block once that copy is done)."""

        dtype = torch.from_numpy(np.empty(0, self._members[self.ids[0]].dtype)).dtype
        return torch.empty((n, *self.image_shape), dtype=dtype, pin_memory=True)

    @property
    def nbytes(self) -> int:
        """Size of all decoded images, in bytes."""
        m = self._members[self.ids[0]]
        return len(self) * int(np.prod(m.shape)) * m.dtype.itemsize

    def missing(self, image_ids: Iterable[Id]) -> list[Id]:
        """The ids (in the order given, without repeats) that the archive does not hold."""
        out, seen = [], set()
        for i in image_ids:
            k = id_key(i)
            if k not in self._members and k not in seen:
                seen.add(k)
                out.append(i)
        return out

    def require(self, image_ids: Iterable[Id], source: str) -> None:
        """Raise if any id is missing, saying how many and which ones, and where they came from."""
        missing = self.missing(image_ids)
        if missing:
            raise DataError(f"{self.path}: {len(missing)} image ids from {source} are not in the "
                            f"archive, first: {preview(missing)}")

    def check_image_size(self, image_size: int | tuple[int, int], model: str) -> None:
        """Raise if the archive's images are not the size the model expects."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (self.height, self.width) != (h, w):
            raise DataError(f"{self.path}: images are {self.height}x{self.width} but model {model} "
                            f"expects {h}x{w}; re-make the archive at {h} px or pick a model of "
                            f"that size")

    # ---- reading ----

    def read(self, image_id: Id) -> np.ndarray:
        """One image in the archive's encoding (a read-only view when the archive is uncompressed)."""
        key = id_key(image_id)
        try:
            m = self._members[key]
        except KeyError:
            raise DataError(f"{self.path}: no image with id {image_id!r}") from None
        if self._mmap is not None:
            return np.ndarray(m.shape, m.dtype, buffer=self._mmap, offset=m.data_offset,
                              order="F" if m.fortran_order else "C")
        with self._zip.open(m.name) as f:
            return np.lib.format.read_array(io.BufferedReader(f), allow_pickle=False)

    def read_batch(self, image_ids: Sequence[Id], out: np.ndarray | None = None) -> np.ndarray:
        """Stack images into one (B, ...) array, into `out` when given (e.g. pinned memory).

        Uncompressed C-order members are copied straight from the memory map, one strided copy per
        run of members evenly spaced in the file (archive order: one run per batch), so a batch
        costs a memcpy, not a Python loop over images (about 50,000 images/s a core otherwise)."""
        if out is None:
            out = np.empty((len(image_ids), *self.image_shape), self._members[self.ids[0]].dtype)
        if self._mmap is None or not self._c_order:
            for row, image_id in enumerate(image_ids):
                out[row] = self.read(image_id)
            return out[: len(image_ids)]
        offsets = []
        for image_id in image_ids:
            m = self._members.get(id_key(image_id))
            if m is None:
                raise DataError(f"{self.path}: no image with id {image_id!r}")
            offsets.append(m.data_offset)
        flat = out[: len(offsets)].reshape(len(offsets), -1).view(np.uint8)  # (B, bytes per image)
        size = flat.shape[1]
        start = 0
        while start < len(offsets):
            end, step = start + 1, 0
            if end < len(offsets) and offsets[end] - offsets[start] >= size:  # evenly spaced, no overlap
                step = offsets[end] - offsets[start]
                while end < len(offsets) and offsets[end] - offsets[end - 1] == step:
                    end += 1
            first = offsets[start]
            span = self._mmap[first:first + step * (end - start - 1) + size]
            flat[start:end] = np.lib.stride_tricks.as_strided(span, (end - start, size), (step, 1),
                                                              writeable=False)
            start = end
        return out[: len(offsets)]

    def iter_batches(self, batch_size: int, image_ids: Sequence[Id] | None = None
                     ) -> Iterator[tuple[list[Id], np.ndarray]]:
        """Yield (ids, (B, ...) array) in archive order, or in the order of `image_ids`."""
        ids = list(self.ids if image_ids is None else image_ids)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            yield chunk, self.read_batch(chunk)

    def close(self) -> None:
        self._mmap = None
        self._zip.close()

    def __enter__(self) -> "ImageArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ImageArchive({str(self.path)!r}, {len(self)} images, {self.encoding}, "
                f"{self.height}x{self.width})")


class ArchiveWriter:
    """Write an `.npz` archive member by member, uncompressed, deterministic, atomically renamed.

    >>> with ArchiveWriter("val.64.npz") as w:
    ...     w.add("94", pixels)  # uint8 (64, 64, 3) or float32 (3, 64, 64)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._expected: tuple[str, tuple[int, int]] | None = None
        self._keys: set[str] = set()

    def __enter__(self) -> "ArchiveWriter":
        self._atomic = atomic_output(self.path)
        tmp = self._atomic.__enter__()
        self._zip = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def add(self, image_id: Id, array: np.ndarray) -> None:
        key = id_key(image_id)
        found = encoding_of(array.dtype, array.shape)
        if found is None:
            raise DataError(f"{self.path}: image {key!r} is {array.dtype} {array.shape}, expected "
                            "float32 (3, H, W) or uint8 (H, W, 3)")
        if self._expected is None:
            self._expected = found
        elif found != self._expected:
            raise DataError(f"{self.path}: image {key!r} is {found}, the archive holds {self._expected}")
        if key in self._keys:
            raise DataError(f"{self.path}: image id {key!r} written twice")
        self._keys.add(key)
        info = zipfile.ZipInfo(key + ".npy", date_time=_FIXED_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        with self._zip.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._zip.close()
        if exc_type is None and not self._keys:
            exc = DataError(f"{self.path}: no images were written")
            self._atomic.__exit__(DataError, exc, None)
            raise exc
        self._atomic.__exit__(exc_type, exc, tb)


def pixels_from_normalized(chw: np.ndarray) -> np.ndarray:
    """Invert the CLIP normalisation of float32 (..., 3, H, W) -> uint8 (..., H, W, 3), rounding.
    One image or a batch: the same elementwise arithmetic either way."""
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    pixels = np.clip(np.rint((chw.astype(np.float32, copy=False) * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))


def normalized_from_pixels(hwc: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W), scaled to [0, 1] and CLIP-normalised (the
    original's recipe). One image or a batch."""
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    x = np.moveaxis(hwc.astype(np.float32), -1, -3) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std)


def model_input_from_batch(batch, encoding: str, device=None, dtype=None):
    """Turn a (B, ...) batch in the archive encoding into the model's (B, 3, H, W) input tensor.

    uint8 pixels travel to the device as uint8 (four times fewer bytes) and are normalised there.
    """

    x = torch.as_tensor(batch)
    if device is not None:
        x = x.to(device, non_blocking=True)
    if encoding == "float32_chw":
        return x if dtype is None else x.to(dtype)
    if encoding != "uint8_hwc":
        raise ValueError(f"unknown image encoding {encoding!r}; expected one of {sorted(ENCODINGS)}")
    # built on the host and copied without waiting (torch.tensor(..., device=cuda) would make the
    # host wait for the device's queued work)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)
    return x if dtype is None else x.to(dtype)
