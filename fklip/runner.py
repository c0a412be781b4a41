"""The runner interface every backend implements, what its inputs are, and the plain PyTorch runner.

A runner is a context manager that owns its resources (a model on a device, an onnxruntime
session, a TensorRT engine and its execution contexts) and encodes one batch at a time:

    with ModelRunner(model, "cpu") as runner:
        image_emb = runner.encode_images(pixels)  # (B, D) float32, L2-normalised
        text_emb = runner.encode_texts(tokenizer_for(runner)(texts))  # (B, D) float32, L2-normalised

What the model is (embed_dim, image_size, context_length, model_name, truncation) is known once
the runner is entered; `tokenizer_for(runner)` builds the tokenizer its model expects. The
batched feature pipeline (fklip.pipeline) runs any runner over whole archives and caption lists;
engines/ adds the torch (compiled, CUDA graphs, fused towers), onnxruntime and TensorRT runners.

`pixels` is either float32 (B, 3, H, W), CLIP-normalised, or uint8 (B, H, W, 3) raw pixels, as
a numpy array or a torch tensor (on the CPU, or already on the runner's device); a runner accepts
both encodings and converts what its model does not take. `ids` is (B, L) int32 or int64 token
ids with L <= the context length; positions after a row's end token are padding. Results are
numpy float32 on the CPU.

One autocast rule for every caller (training, the knowledge refresh, the runners): "amp" is fp16
autocast on CUDA and bf16 on the CPU, "amp_bf16" bf16 autocast; the other precisions run in the
dtype of the weights (`weight_dtype`).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fklip.data.archive import (
    model_input_from_batch,
    normalized_from_pixels,
    pixels_from_normalized,
)
from fklip.errors import ConfigError, DataError
from fklip.model import Tokenizer, text_emb_cut, trimmable

IMAGE_ENCODINGS = ("float32_chw", "uint8_hwc")
WEIGHT_DTYPES = {"fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype the weights are held in at `precision` (autocast precisions keep fp32 weights)."""
    return WEIGHT_DTYPES[precision]


def autocast(precision: str, device: str, cache_enabled: bool = True):
    """The autocast context of `precision` on `device`: fp16 on CUDA and bf16 on the CPU for "amp",
    bf16 for "amp_bf16", none otherwise. `cache_enabled=False` for CUDA graph capture (a captured
    graph must not hold cast copies of the weights made outside it)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "amp":
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    elif precision == "amp_bf16":
        dtype = torch.bfloat16
    else:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


def prepare_model(model, device: str, precision: str):
    """Move the model to `device` in eval mode; bf16/fp16 precisions cast the weights."""
    model = model.to(device).eval()
    if weight_dtype(precision) != torch.float32:
        model = model.to(weight_dtype(precision))
    return model


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
                          + "; build the tokenizer with fklip.runner.tokenizer_for(runner)")


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


class ModelRunner:
    """A model in memory (open_clip's modules, as training holds it) behind the runner interface:
    uint8 pixels normalised on the device (`model_input_from_batch`), texts cut after the batch's
    last end token on the host (`text_emb_cut`), `autocast` at "amp". The reference path the
    engines' runners are held to; the knowledge refresh and validation encode through it.

    It uses the model as it is (device, dtype, train or eval mode are the caller's)."""

    backend = "model"
    image_encoding = "float32_chw"
    takes_device_tensors = True  # encode_images accepts batches already on its CUDA device

    def __init__(self, model, device: str, precision: str = "fp32", truncation: str = "original",
                 model_name: str = "model"):
        self.model, self.device, self.precision = model, str(device), precision
        self.model_name, self.truncation = model_name, truncation
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim, self.context_length = int(model.visual.output_dim), int(model.context_length)
        self._trim = trimmable(model)

    def __enter__(self) -> ModelRunner:  # noqa: PYI034 (typing.Self is Python 3.11+)
        return self

    def __exit__(self, *exc) -> None:
        pass

    @torch.no_grad()
    def encode_images(self, pixels) -> np.ndarray:
        x = torch.as_tensor(pixels)
        encoding = image_encoding_of(x, self.image_size)
        dtype = next(self.model.parameters()).dtype
        x = model_input_from_batch(x, encoding, device=self.device, dtype=dtype)  # (B, 3, H, W)
        with autocast(self.precision, self.device):
            emb = self.model.encode_image(x)  # (B, D)
        return F.normalize(emb.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, ids) -> np.ndarray:
        tokens = torch.as_tensor(as_numpy(ids) if not isinstance(ids, torch.Tensor) else ids)
        with autocast(self.precision, self.device):
            if self._trim:  # cut on the host: only the cut ids cross to the device
                tokens = torch.as_tensor(cut_after_last_end(tokens.numpy())) if tokens.device.type == "cpu" \
                    else tokens[:, :int(tokens.argmax(dim=1).max()) + 1]
                emb = text_emb_cut(self.model, tokens.to(self.device, non_blocking=True))
            else:
                emb = self.model.encode_text(tokens.to(self.device))
        return F.normalize(emb.float(), dim=-1).cpu().numpy()
