"""`fklip export`: checkpoint -> ONNX graphs (-> int8 graphs, TensorRT engines), each checked
against the PyTorch model, described by `manifest.json`.

Everything is written into a hidden folder beside `--out` and renamed into place only when
every check passed, so a failed export leaves nothing behind (and an earlier export intact);
`--out` is claimed for the run, so two exports into it cannot mix. The TensorRT engines are
built in that folder too, by a step the caller passes in (engines.trt_build.build_trt_engines):
checking an engine needs a runner, and export/ imports nothing from engines/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.manifest import (
    MANIFEST_NAME,
    ExportManifest,
    Int8Entry,
    ModelInfo,
    Profile,
    Source,
    TowerEntry,
    TrtBlock,
    build_manifest,
    file_entry,
    sha256_of,
)
from export.onnx_export import ExportError, onnx_from_tower, ort_session, require_onnx
from export.parity import check_tower
from export.quantize import TOWER_RECIPES, int8_cpu_from_onnx
from export.specs import TOLERANCES, TowerSpec, image_tower_spec, text_tower_spec
from export.towers import build_towers
from export.trt import device_facts, require_tensorrt
from fklip.config import ExportConfig
from fklip.data.archive import (
    ImageArchive,
    normalized_from_pixels,
    pixels_from_normalized,
)
from fklip.data.jsonl import read_text_queries
from fklip.errors import ConfigError, raise_collected
from fklip.io import foreign_files, staged_folder
from fklip.model import build_tokenizer, load_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedExport:
    """An export checked and described in its staging folder, before it is moved into place:
    what the `build_engines` step of `run_export` builds on."""

    folder: Path  # the staging folder; its manifest.json is `manifest`
    manifest: ExportManifest
    model: torch.nn.Module  # the fp32 PyTorch model the graphs came from (the parity reference)
    real: dict[str, np.ndarray | None]  # tower -> the real parity inputs, in the graph's input encoding
    device: dict  # export.trt.device_facts() of the --trt check made before any slow work


# Builds the TensorRT engines of a staged export, each checked against `model`; returns the
# manifest's "trt" block, or raises (nothing is left behind).
EngineBuilder = Callable[[StagedExport], TrtBlock]


def run_export(cfg: ExportConfig, build_engines: EngineBuilder | None = None) -> ExportManifest:
    """Export, check and describe; returns the manifest written to `cfg.out / manifest.json`.

    With `cfg.trt`, `build_engines` (engines.trt_build.build_trt_engines, as `fklip export --trt`
    passes it) builds the engines in the staging folder once the manifest of the graphs is
    written there, and the block it returns joins the manifest.
    """

    if cfg.trt and build_engines is None:
        raise ValueError("run_export: cfg.trt needs build_engines (engines.trt_build.build_trt_engines)")
    require_onnx()
    for flag, path in (("--parity-images", cfg.parity_images), ("--parity-texts", cfg.parity_texts)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    trt_facts = _trt_preflight() if cfg.trt else None  # before any slow work
    _check_out(cfg.out, cfg.overwrite, {"CHECKPOINT": cfg.checkpoint, "--parity-images": cfg.parity_images,
                                    "--parity-texts": cfg.parity_texts})
    # built in a hidden folder beside --out (claimed: a second export there stops at once) and
    # swapped into place when every check passed
    with staged_folder(cfg.out, recheck=lambda: _refuse_foreign(cfg.out)) as tmp:
        ckpt = load_checkpoint(cfg.checkpoint, model_name=cfg.model, truncation=cfg.truncation,
                               trust=cfg.trust_checkpoint)
        spec = ckpt.spec
        specs = {"image": image_tower_spec(spec.image_size, spec.embed_dim, cfg.uint8_input),
                 "text": text_tower_spec(spec.context_length, spec.embed_dim, cfg.ids_dtype)}
        real = _real_inputs(cfg, ckpt, specs)
        towers = _export_towers(ckpt.model, specs, real, cfg.precision, cfg.uint8_input, tmp)
        int8 = _export_int8(ckpt.model, specs, real, tmp) if cfg.int8 else None
        source = Source(checkpoint=str(cfg.checkpoint.resolve()), sha256=sha256_of(cfg.checkpoint),
                        format=ckpt.source_format, epoch=ckpt.epoch)
        manifest = build_manifest(
            model=ModelInfo(name=spec.name, embed_dim=spec.embed_dim, image_size=spec.image_size,
                            context_length=spec.context_length, truncation=spec.truncation,
                            activation=spec.activation),
            precision=cfg.precision, uint8_input=cfg.uint8_input, opset=towers["image"].opset,
            profile=Profile(opt_batch=cfg.opt_batch, max_batch=cfg.max_batch),
            source=source, towers=towers, int8=int8)
        manifest.write(tmp)
        if cfg.trt:  # built from the manifest above, as `fklip eval --engine trt` would; the engines join it after
            trt = build_engines(StagedExport(tmp, manifest, ckpt.model, real, trt_facts))
            manifest = dataclasses.replace(manifest, trt=trt)
            manifest.write(tmp)
    return manifest


def _check_out(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """--out is new, empty, or (with --overwrite) an earlier export holding nothing else and none
    of the inputs."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise ConfigError(f"--out {out}: folder is not empty and holds no fklip export; "
                              "choose a new folder")
        if not overwrite:
            raise ConfigError(f"--out {out}: holds an earlier export; pass --overwrite to replace it")
        inside = [f"{flag} {p}" for flag, p in inputs.items()
                  if p is not None and Path(os.path.realpath(p)).is_relative_to(os.path.realpath(out))]
        if inside:
            raise ConfigError(f"--out {out}: replacing it would remove the input {inside[0]}; copy it "
                              "elsewhere or export into another folder")
        _refuse_foreign(out)


def _refuse_foreign(out: Path) -> None:
    """The files of `out` an export did not write (its manifest lists its graphs; the TensorRT
    engines and timing caches are under engines/) would be lost by replacing it: refused."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    own: list[str] = []
    if (out / MANIFEST_NAME).is_file():
        doc = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        own = [MANIFEST_NAME] + [entry["file"] for section in ("towers", "int8", "trt")
                                 for entry in (doc.get(section) or {}).values()
                                 if isinstance(entry, dict) and isinstance(entry.get("file"), str)]
    foreign = foreign_files(out, own, own_folders=["engines"])
    if foreign:
        raise ConfigError(f"--out {out}: holds files the export did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); fklip replaces only what it made: move them, "
                          "or export into another folder")


def _trt_preflight() -> dict:
    """TensorRT importable and a CUDA GPU present, or one line saying what is missing."""

    require_tensorrt()
    return device_facts()


def _real_inputs(cfg: ExportConfig, ckpt, specs: dict[str, TowerSpec]) -> dict[str, np.ndarray | None]:
    """Up to `--parity-samples` real images and captions, in the graphs' input encodings."""
    real: dict[str, np.ndarray | None] = {"image": None, "text": None}
    n = cfg.parity_samples
    if cfg.parity_images is not None:

        with ImageArchive(cfg.parity_images) as archive:
            archive.check_image_size(ckpt.spec.image_size, ckpt.spec.name)
            batch = archive.read_batch(list(archive.ids)[:n])
            encoding = archive.encoding
        want_uint8 = specs["image"].input.dtype == "uint8"
        if want_uint8 and encoding == "float32_chw":
            batch = pixels_from_normalized(batch)
        elif not want_uint8 and encoding == "uint8_hwc":
            batch = normalized_from_pixels(batch)
        real["image"] = batch
    if cfg.parity_texts is not None:

        queries = read_text_queries(cfg.parity_texts)[:n]
        ids = build_tokenizer(ckpt.spec)([q.query_text for q in queries]).numpy()
        real["text"] = ids.astype(specs["text"].input.dtype)
    return real


def _graph_runner(path: Path, spec: TowerSpec) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function running the graph on a batch, and what runs it.

    onnxruntime's CPU provider where it has kernels for every node; bf16 graphs (no CPU kernels
    in onnxruntime) go through ONNX's reference evaluator, which computes in bf16 as written.
    """
    name = spec.input.name
    try:
        session = ort_session(path)
    except Exception as e:  # onnxruntime raises its own NotImplemented for missing kernels
        if "NOT_IMPLEMENTED" not in str(e):
            raise
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        logger.info("onnxruntime has no CPU kernel for a node of %s; validating with onnx.reference",
                    path.name)
        return (lambda x: evaluator.run(None, {name: x})[0]), "onnx.reference.ReferenceEvaluator"
    return (lambda x: session.run(None, {name: x})[0]), "onnxruntime CPUExecutionProvider"


def _export_towers(model, specs, real, precision: str, uint8_input: bool, folder: Path) -> dict[str, TowerEntry]:

    towers = build_towers(model, precision, uint8_input)
    entries, problems = {}, []
    for name, spec in specs.items():
        path = folder / spec.file_name
        info = onnx_from_tower(towers[name], spec, path)
        run, validator = _graph_runner(path, spec)
        started = time.perf_counter()
        report, failed = check_tower(run, model, spec, real[name], TOLERANCES[precision])
        report = dataclasses.replace(report, validator=validator, check_s=round(time.perf_counter() - started, 3))
        problems += [f"{name} tower: {p}" for p in failed]
        entries[name] = TowerEntry(**file_entry(path), inputs=spec.inputs, outputs=spec.outputs,
                                   batch_axis=spec.batch_axis, **info, precision=precision, parity=report)
        logger.info("%s tower parity (%s): %s", name, validator, report.as_dict())
    raise_collected(problems, f"export at {precision} is outside its tolerance "
                    f"({TOLERANCES[precision].as_dict()}); nothing was written", ExportError)
    return entries


def _export_int8(model, specs, real, folder: Path) -> dict[str, Int8Entry]:

    entries, problems = {}, []
    for name, spec in specs.items():
        src, dst = folder / spec.file_name, folder / f"{name}.int8.onnx"
        info = int8_cpu_from_onnx(src, dst, TOWER_RECIPES[name])
        run, validator = _graph_runner(dst, spec)
        report, failed = check_tower(run, model, spec, real[name], TOLERANCES["int8"])
        report = dataclasses.replace(report, validator=validator)
        problems += [f"{name} tower: {p}" for p in failed]
        entries[name] = Int8Entry(**file_entry(dst), **info, parity=report)
    raise_collected(problems, "--int8: quantised graphs are outside tolerance; nothing was written",
                    ExportError)
    return entries
