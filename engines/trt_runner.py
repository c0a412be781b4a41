"""The TensorRT runner: the engines of a `fklip export` folder, one execution context per tower.

    with TrtRunner(EncodeConfig("trt", engine_dir=out, device="cuda")) as runner:
        image_emb = runner.encode_images(pixels)  # (B, D) float32

On entry each tower's engine is loaded from `<folder>/engines/<key>/`, or built from the
folder's ONNX graph when no engine matches this GPU, TensorRT version, precision and profile
(export.trt.load_or_build_engine). Inputs and outputs are torch CUDA tensors whose addresses are
handed to the execution context (the TensorRT 10 named-tensor API); the engines run on a torch
stream ordered after the caller's current stream. Batches above the profile's max batch are cut
into chunks, text batches are cut after their last end token first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.manifest import MANIFEST_NAME, TOWER_NAMES, ExportManifest
from export.profiles import profiles_for
from export.specs import ID_DTYPES, TowerSpec
from export.trt import (
    device_facts,
    load_or_build_engine,
    require_tensorrt,
    trt_logger,
)
from fklip.config import EncodeConfig
from fklip.data.archive import model_input_from_batch, pixels_from_normalized
from fklip.errors import ConfigError, DataError, FklipError, raise_collected
from fklip.precision import EXPORT
from fklip.runner import as_numpy, image_encoding_of, text_ids_from

logger = logging.getLogger(__name__)

# TensorRT documents 256-byte alignment for IO tensor addresses (torch's allocator gives 512).
TENSOR_ALIGNMENT = 256
# TensorRT DataType member name -> the torch dtype of its IO buffers.
TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
}
# Manifest dtype -> the TensorRT DataType member name an engine built from that graph has.
TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "uint8": "UINT8",
                   "int32": "INT32", "int64": "INT64"}


def _check_tower(tower: str, spec: TowerSpec, image_size: int, problems: list) -> None:
    """The runner's expectations of each graph's one input."""
    t, s, b = spec.input, image_size, spec.batch_axis
    if tower == "image":
        expected = {"float32": [b, 3, s, s], "uint8": [b, s, s, 3]}.get(t.dtype)
        if expected is None or list(t.shape) != expected:
            problems.append(f"towers.image.inputs[0]: expected float32 {[b, 3, s, s]} or uint8 "
                            f"{[b, s, s, 3]}, got {t.dtype} {list(t.shape)}")
    elif t.dtype not in ID_DTYPES or len(t.shape) != 2 or t.shape[0] != b or not isinstance(t.shape[1], str):
        problems.append(f"towers.text.inputs[0]: expected {' or '.join(ID_DTYPES)} [{b!r}, <length axis>], "
                        f"got {t.dtype} {list(t.shape)}")


def trt_problems(m: ExportManifest) -> list[str]:
    """What the TensorRT runner needs of a manifest beyond what every reader does: a precision it
    builds, an opt batch, and one input and one output per tower, of the shapes it feeds."""
    problems: list[str] = []
    if m.precision is None:
        problems.append("manifest.precision: expected str, got None")
    elif m.precision not in EXPORT:
        problems.append(f"precision: expected one of {', '.join(EXPORT)}, got {m.precision!r}")
    opt_batch, max_batch = m.profile.opt_batch, m.profile.max_batch
    if opt_batch is None:
        problems.append("profile.opt_batch: expected int, got None")
    elif not 1 <= opt_batch <= max_batch:
        problems.append(f"profile.opt_batch: expected 1..max_batch ({max_batch}), got {opt_batch}")
    for tower in TOWER_NAMES:
        entry, where, usable = m.towers[tower], f"towers.{tower}", True
        if entry.batch_axis is None:
            problems.append(f"{where}.batch_axis: expected str, got None")
            usable = False
        for name, tensors in (("inputs", entry.inputs), ("outputs", entry.outputs)):
            if len(tensors) != 1:
                got = [t.as_dict() for t in tensors]
                problems.append(f"{where}.{name}: expected a list of one tensor, got {got!r}")
                usable = False
        if usable:
            _check_tower(tower, m.spec(tower), m.model.image_size, problems)
    return problems


def trt_manifest(folder: str | Path) -> ExportManifest:
    """An export folder's manifest (structure and the graphs' sha256 checked), and what the
    TensorRT runner needs on top (`trt_problems`); every problem in one DataError."""
    m = ExportManifest.read(folder)
    raise_collected(trt_problems(m), f"{m.folder / MANIFEST_NAME}: not usable by the trt engine; re-export",
                    error=DataError)
    return m


def image_input(pixels, encoding: str, image_size: int, device) -> torch.Tensor:
    """A (B, ...) batch in either image encoding -> a contiguous tensor on `device` in `encoding`.

    uint8 pixels for a float graph are normalised on the device; float pixels for a uint8 graph
    are rounded back to pixels on the CPU (exact for pixels that came from uint8 images).
    """
    given = image_encoding_of(pixels, image_size)
    if given == encoding:
        x = torch.as_tensor(pixels).to(device, non_blocking=True)
        x = x.float() if encoding == "float32_chw" else x
    elif encoding == "float32_chw":
        x = model_input_from_batch(pixels, "uint8_hwc", device=device)
    else:
        x = torch.from_numpy(pixels_from_normalized(as_numpy(pixels))).to(device)
    return x.contiguous()


def text_input(ids, context_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) token ids -> a contiguous CPU tensor of `dtype`, cut after the last end token."""
    return torch.from_numpy(text_ids_from(ids, context_length, str(dtype).removeprefix("torch.")))


def batch_slices(n: int, max_batch: int) -> list[slice]:
    """[0, n) in consecutive slices of at most max_batch rows."""
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def _dtype_fits(trt_name: str, manifest_dtype: str) -> bool:
    """Whether an engine tensor of TensorRT type `trt_name` serves a graph tensor of `manifest_dtype`.
    Token ids are cast to whatever integer type the engine takes, so INT32 and INT64 both serve ids."""
    if manifest_dtype in ID_DTYPES:
        return trt_name in ("INT32", "INT64")
    return trt_name == TRT_DTYPE_NAMES.get(manifest_dtype)


@dataclass
class _TowerEngine:
    engine: object  # trt.ICudaEngine
    context: object  # trt.IExecutionContext
    input_name: str
    input_dtype: torch.dtype
    output_name: str
    output_dtype: torch.dtype
    plan: Path


class TrtRunner:
    """Runs the towers of an export folder with TensorRT (see the module docstring)."""

    backend = "trt"

    def __init__(self, cfg: EncodeConfig):
        if cfg.engine_dir is None:
            raise ConfigError("the trt engine needs an export folder written by `fklip export`; none was given")
        self.cfg = cfg
        self.manifest = trt_manifest(cfg.engine_dir)
        model = self.manifest.model
        self.model = self.model_name = model.name
        self.truncation = cfg.truncation or model.truncation
        self.embed_dim = model.embed_dim
        self.image_size = model.image_size
        self.context_length = model.context_length
        self.precision = self.manifest.precision
        self.max_batch = self.manifest.profile.max_batch
        self.specs = {tower: self.manifest.spec(tower) for tower in TOWER_NAMES}
        self.image_encoding = "uint8_hwc" if self.specs["image"].input.dtype == "uint8" else "float32_chw"
        self.device = cfg.device if str(cfg.device).startswith("cuda") else "cuda"
        self.engine_keys: dict[str, str] = {}  # tower -> the engine key used
        self.built: dict[str, bool] = {}  # tower -> whether this entry built its engine
        self.plans: dict[str, Path] = {}  # tower -> the engine file loaded
        self._towers: dict[str, _TowerEngine] = {}
        self._runtime = self._stream = self._trt_log = None
        self._device: torch.device | None = None

    def __enter__(self) -> TrtRunner:  # noqa: PYI034 (typing.Self is Python 3.11+)
        trt = require_tensorrt()
        facts = device_facts(self.device, trt)
        self._device = torch.device("cuda", facts["device_index"])
        self.device = str(self._device)
        try:
            with torch.cuda.device(self._device):
                self._trt_log = trt_logger(trt)  # the builder's too: TensorRT keeps one per process
                self._runtime = trt.Runtime(self._trt_log)
                self._stream = torch.cuda.Stream(self._device)
                for tower, spec in self.specs.items():
                    self._towers[tower] = self._load(trt, tower, spec, facts)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _load(self, trt, tower: str, spec: TowerSpec, facts: dict) -> _TowerEngine:
        m = self.manifest
        onnx, digest = m.graph_path(tower), m.towers[tower].sha256  # the file's hash was checked on reading
        profiles = profiles_for(spec, m.profile.opt_batch, m.profile.max_batch)
        plan, key, built = load_or_build_engine(m.folder, tower, onnx, digest, m.precision, profiles,
                                                facts, log=logger)
        self.engine_keys[tower], self.built[tower], self.plans[tower] = key, built, plan
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise FklipError(f"{plan}: TensorRT could not load this engine (errors logged above); "
                             f"delete {plan.parent} to rebuild it")
        io = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i))
              for i in range(engine.num_io_tensors)}
        problems = []
        for t, mode in ((spec.input, trt.TensorIOMode.INPUT), (spec.output, trt.TensorIOMode.OUTPUT)):
            if io.get(t.name) != mode:
                problems.append(f"{t.name!r} is not an {mode.name.lower()} of the engine (its IO: {sorted(io)})")
            elif not _dtype_fits(engine.get_tensor_dtype(t.name).name, t.dtype):
                problems.append(f"{t.name!r} is {engine.get_tensor_dtype(t.name).name} in the engine, "
                                f"{t.dtype} in the manifest")
        if len(io) != 2:
            problems.append(f"expected one input and one output, the engine has {sorted(io)}")
        raise_collected(problems, f"{plan}: the engine does not fit {m.folder / MANIFEST_NAME}", error=DataError)
        context = engine.create_execution_context()
        if context is None:
            raise FklipError(f"{plan}: TensorRT could not create an execution context (out of GPU memory?)")
        return _TowerEngine(engine, context, spec.input.name, TORCH_DTYPES[engine.get_tensor_dtype(spec.input.name).name],
                            spec.output.name, TORCH_DTYPES[engine.get_tensor_dtype(spec.output.name).name], plan)

    def __exit__(self, *exc) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        # Contexts before engines before the runtime, as TensorRT requires.
        for t in self._towers.values():
            t.context = None
        for t in self._towers.values():
            t.engine = None
        self._towers = {}
        self._runtime = self._stream = self._trt_log = None

    def encode_images(self, pixels) -> np.ndarray:
        """(B, 3, S, S) float32 or (B, S, S, 3) uint8 pixels -> (B, D) float32 embeddings."""
        t = self._tower("image")
        return self._run(t, image_input(pixels, self.image_encoding, self.image_size, self._device))

    def encode_texts(self, ids) -> np.ndarray:
        """(B, L) int32/int64 token ids -> (B, D) float32 embeddings."""
        t = self._tower("text")
        return self._run(t, text_input(ids, self.context_length, t.input_dtype))

    def _tower(self, tower: str) -> _TowerEngine:
        if tower not in self._towers:
            raise FklipError("TrtRunner: use the runner inside a `with` block (its engines load on entry)")
        return self._towers[tower]

    def _run(self, t: _TowerEngine, x: torch.Tensor) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        with torch.cuda.device(self._device):
            x = x.to(self._device, t.input_dtype, non_blocking=True)
            outs = [self._execute(t, x[s]) for s in batch_slices(len(x), self.max_batch)]
            emb = outs[0] if len(outs) == 1 else torch.cat(outs)
            return emb.float().cpu().numpy()

    def _execute(self, t: _TowerEngine, chunk: torch.Tensor) -> torch.Tensor:
        """One enqueue of at most max_batch rows; the result is ready on the current stream."""
        chunk = chunk.contiguous()
        if chunk.data_ptr() % TENSOR_ALIGNMENT:  # a slice of (B, L) ids need not start aligned
            chunk = chunk.clone()
        ctx = t.context
        if not ctx.set_input_shape(t.input_name, tuple(chunk.shape)):
            raise DataError(f"{t.plan}: the engine rejects the input shape {tuple(chunk.shape)} of "
                            f"{t.input_name!r} (errors logged above)")
        shape = tuple(ctx.get_tensor_shape(t.output_name))  # (B, D), resolved from the input shape
        if any(d < 0 for d in shape):
            raise FklipError(f"{t.plan}: the output shape of {t.output_name!r} is unresolved: {shape}")
        out = torch.empty(shape, dtype=t.output_dtype, device=self._device)
        for name, tensor in ((t.input_name, chunk), (t.output_name, out)):
            if not ctx.set_tensor_address(name, tensor.data_ptr()):
                raise FklipError(f"{t.plan}: TensorRT rejected the address of {name!r} (errors logged above)")
        current = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(current)  # the input was written on the current stream
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise FklipError(f"{t.plan}: TensorRT execution failed (errors logged above)")
        # Keep the caching allocator from reusing either buffer before the engine is done,
        # and order whatever reads `out` after it.
        chunk.record_stream(self._stream)
        out.record_stream(self._stream)
        current.wait_stream(self._stream)
        return out
