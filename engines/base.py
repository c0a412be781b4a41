"""The runner interface every backend implements, and the registry of backends.

A runner is a context manager that owns its resources (a model on a device, an onnxruntime
session, a TensorRT engine and its execution contexts) and encodes one batch at a time:

    with build_runner(RunnerConfig("onnx", engine_dir=out)) as runner:
        image_emb = runner.encode_images(pixels)  # (B, D) float32, L2-normalised
        text_emb = runner.encode_texts(tokenizer_for(runner)(texts))  # (B, D) float32, L2-normalised

What the model is (embed_dim, image_size, context_length, model_name, truncation) is known once
the runner is entered; `tokenizer_for(runner)` builds the tokenizer its model expects.

`pixels` is either float32 (B, 3, H, W), CLIP-normalised, or uint8 (B, H, W, 3) raw pixels, as
a numpy array or a torch tensor (on the CPU, or already on the runner's device); a runner accepts
both encodings and converts what its model does not take. `ids` is (B, L) int32 or int64 token
ids with L <= the context length; positions after a row's end token are padding. Results are
numpy float32 on the CPU.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fklip.errors import ConfigError, DataError

IMAGE_ENCODINGS = ("float32_chw", "uint8_hwc")


class Runner(Protocol):
    backend: str
    embed_dim: int
    image_size: int
    context_length: int
    device: str
    image_encoding: str  # the encoding its model takes without a conversion
    model_name: str  # the model's name, as its checkpoint or export manifest records it
    truncation: str  # the tokenizer mode the model expects ("original" | "openai")

    def __enter__(self) -> Runner: ...  # noqa: PYI034 (typing.Self is Python 3.11+)

    def __exit__(self, *exc) -> None: ...

    def encode_images(self, pixels) -> np.ndarray: ...

    def encode_texts(self, ids) -> np.ndarray: ...


@dataclass(frozen=True)
class RunnerConfig:
    """What `build_runner` needs. torch: a checkpoint; onnx and trt: an export folder."""

    backend: str
    checkpoint: Path | None = None  # torch
    engine_dir: Path | None = None  # onnx, trt: a `fklip export` folder
    model: str | None = None
    truncation: str | None = None
    trust_checkpoint: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False  # torch: torch.compile
    cuda_graphs: bool = False  # torch on CUDA: replay captured graphs per batch shape
    fused: bool = False  # torch: fklip's re-stated towers (SDPA attention), not open_clip's modules
    int8: bool = False  # onnx: the dynamically quantised graphs, when exported
    threads: int | None = None  # onnx: intra-op threads (None: the library's default)


# name -> "module:class"; imported only when that backend is asked for.
BACKENDS = {
    "torch": "engines.torch_runner:TorchRunner",
    "onnx": "engines.onnx_runner:OnnxRunner",
    "trt": "engines.trt_runner:TrtRunner",
}


def runner_class(backend: str):
    if backend not in BACKENDS:
        raise ConfigError(f"--engine: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)


def build_runner(cfg: RunnerConfig) -> Runner:
    """The runner for `cfg.backend` (enter it with `with` to load the model or engine)."""
    return runner_class(cfg.backend)(cfg)


def as_numpy(x) -> np.ndarray:
    """A CPU numpy view of a numpy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def cut_after_last_end(ids: np.ndarray) -> np.ndarray:
    """(B, L) ids -> (B, L') with L' = the last row's pooling position + 1.

    The text towers are causal and pool at the largest id (the end token), so the positions
    after it in every row cannot change any embedding: a batch of short captions runs over
    a dozen positions instead of 77.
    """
    length = int(ids.argmax(axis=1).max()) + 1
    return ids[:, :length]


def tokenizer_for(runner: Runner):
    """The tokenizer a runner's model expects: its truncation mode and context length."""
    from fklip.model import Tokenizer

    return Tokenizer(runner.truncation, runner.context_length)


def check_tokenizer(runner: Runner, tokenizer) -> None:
    """Raise unless `tokenizer` makes the ids `runner`'s model was trained and exported for."""
    problems = []
    if tokenizer.context_length != runner.context_length:
        problems.append(f"the tokenizer's context length is {tokenizer.context_length}, the model's "
                        f"{runner.context_length}")
    if tokenizer.truncation != runner.truncation:
        problems.append(f"the tokenizer truncates the {tokenizer.truncation!r} way, the model expects "
                        f"{runner.truncation!r} (--truncation)")
    if problems:
        raise ConfigError(f"model {runner.model_name}: " + "; ".join(problems)
                          + "; build the tokenizer with engines.base.tokenizer_for(runner)")


def image_encoding_of(pixels, image_size: int) -> str:
    """"float32_chw" for (B, 3, S, S) floats, "uint8_hwc" for (B, S, S, 3) uint8; else DataError.

    `pixels` is a numpy array or a torch tensor (only its shape and dtype are read)."""
    shape, dtype = tuple(pixels.shape), pixels.dtype
    is_uint8 = str(dtype) in ("uint8", "torch.uint8")
    is_float = getattr(dtype, "is_floating_point", False) is True or getattr(dtype, "kind", "") == "f"
    if len(shape) == 4 and is_uint8 and shape[1:] == (image_size, image_size, 3):
        return "uint8_hwc"
    if len(shape) == 4 and is_float and shape[1:] == (3, image_size, image_size):
        return "float32_chw"
    raise DataError(f"images: got a {dtype} batch of shape {list(shape)}; expected float32 "
                    f"(B, 3, {image_size}, {image_size}) CLIP-normalised or uint8 "
                    f"(B, {image_size}, {image_size}, 3) pixels")


def images_in_encoding(pixels: np.ndarray, image_size: int, encoding: str) -> np.ndarray:
    """A (B, ...) numpy batch in either encoding, converted to `encoding` (contiguous)."""
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; expected one of {IMAGE_ENCODINGS}")
    have = image_encoding_of(pixels, image_size)
    if have == encoding:
        dtype = np.uint8 if encoding == "uint8_hwc" else np.float32
        return np.ascontiguousarray(pixels, dtype=dtype)
    from fklip.data.archive import normalized_from_pixels, pixels_from_normalized

    if encoding == "float32_chw":
        return normalized_from_pixels(pixels)
    return pixels_from_normalized(pixels)


def text_ids_from(ids, context_length: int, dtype: str = "int64") -> np.ndarray:
    """(B, L) integer ids, 1 <= L <= context length, as numpy `dtype` (values checked to fit);
    cut after the batch's last end token. DataError names what is wrong."""
    ids = as_numpy(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise DataError(f"text ids: expected an integer (B, L) array, got {ids.dtype} {list(ids.shape)}")
    if not 1 <= ids.shape[1] <= context_length:
        raise DataError(f"text ids: {ids.shape[1]} positions, expected 1 to the model's context "
                        f"length {context_length}")
    if len(ids) == 0:
        return ids.astype(dtype)
    ids = cut_after_last_end(ids)  # (B, L')
    info = np.iinfo(dtype)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > info.max:
        raise DataError(f"text ids: values span {lo}..{hi}, which do not fit token ids as {dtype} "
                        f"(0..{info.max})")
    return np.ascontiguousarray(ids, dtype=dtype)


def parse_device(device: str) -> tuple[str, int | None]:
    """"cpu" -> ("cpu", None); "cuda" / "cuda:N" -> ("cuda", N); anything else: ConfigError."""
    if device == "cpu":
        return "cpu", None
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index == "" or index.isdigit()):
        return "cuda", int(index or 0)
    raise ConfigError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
