"""`manifest.json`: what an export folder holds, how it was made, and what it was measured to meet.

The manifest is the contract between export/, which writes it, and engines/, which run what it
lists. `ExportManifest` and its parts are frozen dataclasses named after the JSON keys:

    manifest = ExportManifest.read(folder)  # structure checked, the graphs' sha256 verified
    manifest.model.embed_dim, manifest.towers["image"].input.dtype, manifest.graph_path("text")
    manifest.write(folder)  # the JSON layout `fklip export` has always written

Reading checks every field a runner relies on and collects the problems into one DataError.
Keys written by later versions of fklip (such as "model.activation") are optional, so older
exports still load; keys this fklip does not know are ignored. Hashes are computed in 1 MiB
chunks and remembered per (file, size, mtime, ctime) for the life of the process, so opening
several runners on one export hashes each file once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy
import open_clip
import torch

from export.specs import FirstInputOutput, TensorSpec, Tolerance, TowerSpec
from fklip import __version__
from fklip.errors import ConfigError, DataError, raise_collected
from fklip.io import atomic_output
from fklip.model import ACTIVATIONS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fklip-export"
MANIFEST_VERSION = 1
TOWER_NAMES = ("image", "text")

# (resolved path, size, mtime_ns, ctime_ns) -> sha256; ctime changes on any write, even one that
# restores the modification time.
_HASHES: dict[tuple, str] = {}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, remembered while the file's size and times stay the same."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        digest = _HASHES[key] = sha256_of(Path(path))
    return digest


def file_entry(path: Path) -> dict:
    """{"file": name, "sha256", "bytes"} for a file inside the export folder."""
    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def library_versions() -> dict:
    """Versions of everything that shaped the graphs (tensorrt only when it is installed)."""

    import onnx
    import onnxruntime

    versions = {"fklip": __version__, "torch": str(torch.__version__), "open_clip": str(open_clip.__version__),
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                "python": platform.python_version()}
    try:
        versions["tensorrt"] = md.version("tensorrt")
    except md.PackageNotFoundError:
        pass
    return versions


# ---------------------------------------------------------------- the types


# A key that older (or hand-written) manifests may lack: None when absent, not written when None.
_OPTIONAL = {"optional": True}


class _Record:
    """`as_dict()`: the JSON object, keys in field order."""

    def as_dict(self) -> dict:
        return _json_value(self)


def _json_value(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _json_value(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("json", True)
                and not (f.metadata.get("optional") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class ModelInfo(_Record):
    """"model": the architecture the graphs compute."""

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    truncation: str  # the tokenizer mode the model expects ("original" | "openai")
    # "gelu" | "quick_gelu"; exports written before fklip recorded it lack it
    activation: str | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True, kw_only=True)
class ParityFigures(_Record):
    """One kind of inputs (random or real) against the fp32 PyTorch model (export.parity.ParityStats)."""

    samples: int
    min_cosine: float
    mean_cosine: float
    max_abs: float
    non_finite: int  # embeddings with a NaN or an infinity


@dataclass(frozen=True, kw_only=True)
class ParityReport(_Record):
    """"parity": a graph's or an engine's embeddings against the fp32 PyTorch model."""

    random: ParityFigures | None = field(default=None, metadata=_OPTIONAL)
    real: ParityFigures | None = field(default=None, metadata=_OPTIONAL)  # with --parity-images / --parity-texts
    tolerance: Tolerance
    passed: bool
    # what ran the graph (onnxruntime, onnx.reference); engines' reports have none
    validator: str | None = field(default=None, metadata=_OPTIONAL)
    check_s: float | None = field(default=None, metadata=_OPTIONAL)

    def figures(self) -> dict[str, ParityFigures]:
        """{"random": ..., "real": ...}, the kinds that were measured."""
        return {k: v for k, v in (("random", self.random), ("real", self.real)) if v is not None}


@dataclass(frozen=True, kw_only=True)
class TowerEntry(_Record, FirstInputOutput):
    """"towers.<tower>": one ONNX graph, what it takes and gives, and its parity."""

    file: str  # relative to the export folder
    sha256: str
    bytes: int | None = field(default=None, metadata=_OPTIONAL)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_axis: str | None = field(default=None, metadata=_OPTIONAL)
    export_s: float | None = field(default=None, metadata=_OPTIONAL)
    opset: int | None = field(default=None, metadata=_OPTIONAL)
    precision: str | None = field(default=None, metadata=_OPTIONAL)
    parity: ParityReport | None = field(default=None, metadata=_OPTIONAL)



@dataclass(frozen=True, kw_only=True)
class Int8Entry(_Record):
    """"int8.<tower>": a dynamically quantised graph (export.quantize); it takes and gives what
    its tower's graph does."""

    file: str
    sha256: str
    bytes: int | None = field(default=None, metadata=_OPTIONAL)
    quantize_s: float | None = field(default=None, metadata=_OPTIONAL)
    recipe: str | None = field(default=None, metadata=_OPTIONAL)  # a key of export.quantize.RECIPES
    ops: tuple[str, ...] | None = field(default=None, metadata=_OPTIONAL)
    nodes_excluded: tuple[str, ...] | None = field(default=None, metadata=_OPTIONAL)
    weight_type: str | None = field(default=None, metadata=_OPTIONAL)
    weight_bits: int | None = field(default=None, metadata=_OPTIONAL)
    per_channel: bool | None = field(default=None, metadata=_OPTIONAL)
    reduce_range: bool | None = field(default=None, metadata=_OPTIONAL)
    activations: str | None = field(default=None, metadata=_OPTIONAL)
    kernel_on_avx2: str | None = field(default=None, metadata=_OPTIONAL)
    parity: ParityReport | None = field(default=None, metadata=_OPTIONAL)

    def __post_init__(self) -> None:  # lists from JSON or export.quantize, kept as tuples
        for name in ("ops", "nodes_excluded"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True, kw_only=True)
class EngineEntry(_Record):
    """"trt.<tower>": a TensorRT engine built from the tower's graph, checked against PyTorch."""

    file: str  # engines/<key>/<tower>.plan, relative to the export folder
    key: str | None = field(default=None, metadata=_OPTIONAL)
    sha256: str
    parity: ParityReport | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True, kw_only=True)
class TrtBlock(_Record):
    """"trt": the engines `fklip export --trt` built, and the device they were built for."""

    device: dict  # export.trt.device_facts(): GPU name, compute capability, TensorRT and CUDA versions
    image: EngineEntry
    text: EngineEntry

    def engines(self) -> dict[str, EngineEntry]:
        return {"image": self.image, "text": self.text}


@dataclass(frozen=True, kw_only=True)
class Profile(_Record):
    """"profile": the batch sizes the TensorRT engines are tuned for and allow."""

    opt_batch: int | None = field(default=None, metadata=_OPTIONAL)
    max_batch: int  # runners split larger batches


@dataclass(frozen=True, kw_only=True)
class Source(_Record):
    """"source": the checkpoint the graphs were exported from."""

    checkpoint: str  # its absolute path at export time
    sha256: str
    format: str  # how the checkpoint was written (fklip, OpenAI, PAI ...)
    epoch: int | None  # written as null when the checkpoint records none


@dataclass(frozen=True, kw_only=True)
class ExportManifest(_Record):
    """An export folder's manifest.json (see the module docstring). `folder` is set by `read`."""

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    created: str | None = field(default=None, metadata=_OPTIONAL)
    model: ModelInfo
    precision: str | None = field(default=None, metadata=_OPTIONAL)  # "fp32" | "fp16" | "bf16"
    uint8_input: bool | None = field(default=None, metadata=_OPTIONAL)
    opset: int | None = field(default=None, metadata=_OPTIONAL)
    profile: Profile
    towers: dict[str, TowerEntry]  # "image", "text"
    int8: dict[str, Int8Entry] | None = None  # written as null without --int8
    trt: TrtBlock | None = None  # written as null without --trt
    source: Source | None = field(default=None, metadata=_OPTIONAL)
    versions: dict[str, str] | None = field(default=None, metadata=_OPTIONAL)
    machine: dict[str, str] | None = field(default=None, metadata=_OPTIONAL)
    folder: Path | None = field(default=None, compare=False, metadata={"json": False})

    def to_json(self) -> str:
        """The text of manifest.json."""
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        """Write `folder`/manifest.json (atomically); returns its path."""
        path = Path(folder) / MANIFEST_NAME
        with atomic_output(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike, *, verify: bool = True, int8: bool = False) -> ExportManifest:
        """The manifest of a `fklip export` folder, its graph files checked.

        `int8` selects the graphs to check (the int8 pair, which must exist, instead of the
        tower graphs); `verify=False` skips the sha256 comparison but not the files' presence.
        """
        return _read(Path(folder), verify, int8)

    @classmethod
    def from_dict(cls, doc: dict, where: str = MANIFEST_NAME) -> ExportManifest:
        """The manifest in a parsed JSON document; DataError listing every malformed field."""
        problems: list[str] = []
        manifest = _manifest(doc, problems)
        raise_collected(problems, f"{where}: malformed manifest; re-export")
        return manifest

    def graphs(self, int8: bool = False) -> dict[str, TowerEntry]:
        """{tower: entry} of the ONNX graphs a runner loads: the towers' graphs, or the int8 pair
        (each int8 graph's file, hash and parity, with the IO of the graph it was quantised from)."""
        if not int8:
            return dict(self.towers)
        if self.int8 is None:
            raise ConfigError(f"--int8: the export in {self.folder} has no int8 graphs; "
                              "re-export with `fklip export ... --int8`")
        return {t: dataclasses.replace(self.towers[t], file=q.file, sha256=q.sha256, bytes=q.bytes, parity=q.parity)
                for t, q in self.int8.items()}

    def graph_path(self, tower: str, int8: bool = False) -> Path:
        return Path(self.folder) / self.graphs(int8)[tower].file

    def spec(self, tower: str) -> TowerSpec:
        """The export spec of a tower's graph, as export.specs builds it (text: the context length
        bounds the length axis)."""
        entry = self.towers[tower]
        if entry.batch_axis is None:
            raise DataError(f"{Path(self.folder or '.') / MANIFEST_NAME}: towers.{tower}.batch_axis: expected str, "
                            "got None; re-export")
        return TowerSpec(tower, entry.inputs, entry.outputs, entry.batch_axis,
                         max_length=self.model.context_length if tower == "text" else None)


def build_manifest(*, model: ModelInfo, precision: str, uint8_input: bool, opset: int, profile: Profile,
                   source: Source, towers: dict[str, TowerEntry], int8: dict[str, Int8Entry] | None,
                   trt: TrtBlock | None = None) -> ExportManifest:
    """A new export's manifest: the time, library versions and machine are recorded here."""
    return ExportManifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), model=model, precision=precision,
        uint8_input=uint8_input, opset=opset, profile=profile, towers=towers, int8=int8, trt=trt, source=source,
        versions=library_versions(),
        machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine()})


# ---------------------------------------------------------------- reading


def _preview_folder(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def _read(folder: Path, verify: bool, int8: bool) -> ExportManifest:
    hint = f"make one with `fklip export CHECKPOINT --out {folder}`"
    if not folder.is_dir():
        what = "is a file, not an export folder" if folder.exists() else "no such export folder"
        raise ConfigError(f"{folder}: {what}; {hint}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing, so {folder} is not an fklip export folder "
                        f"({_preview_folder(folder)}); {hint}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); re-export") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f"{path}: not an fklip export manifest (format {found!r}, expected "
                        f"{MANIFEST_FORMAT!r}); {hint}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {version!r} is not supported (this fklip reads "
                        f"version {MANIFEST_VERSION}); upgrade fklip or re-export with this one")
    manifest = dataclasses.replace(ExportManifest.from_dict(doc, str(path)), folder=folder)

    problems = []
    for tower, entry in manifest.graphs(int8).items():
        graph = folder / entry.file
        if not graph.is_file():
            problems.append(f"{graph} ({tower} tower) is listed in {MANIFEST_NAME} but missing")
        elif verify:
            digest = file_sha256(graph)
            if digest != entry.sha256:
                problems.append(f"{graph} was modified after export (sha256 {digest[:12]}..., "
                                f"the manifest records {entry.sha256[:12]}...)")
    raise_collected(problems, f"{folder}: the export is incomplete or changed; re-export it")
    logger.debug("read %s (model %s, precision %s)", path, manifest.model.name, manifest.precision)
    return manifest


def _is(value, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


class _Fields:
    """Typed reads of one JSON object's keys; problems are collected into `problems`, not raised."""

    def __init__(self, obj: dict, where: str, problems: list[str]):
        self.obj, self.where, self.problems, self._start = obj, where, problems, len(problems)

    @property
    def ok(self) -> bool:
        """No problem found in this object so far."""
        return len(self.problems) == self._start

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, required: bool = False, message: str | None = None):
        value = self.obj.get(key)
        if value is None and not required:
            return None
        if not _is(value, kind):
            self.problems.append(message or f'"{self._path(key)}" should be {kind.__name__}, got {value!r}')
            return None
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, list)
        if value is not None and not all(isinstance(v, str) for v in value):
            self.problems.append(f'"{self._path(key)}" should list strings, got {value!r}')
        return value

    def obj_of(self, key: str, read, required: bool = False):
        """`read(obj, where, problems)` of the object under `key` (None when absent and optional)."""
        value = self.obj.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            self.problems.append(f'"{self._path(key)}" should be an object, got {value!r}')
            return None
        return read(value, self._path(key), self.problems)


def _tensors(value, where: str, problems: list[str]) -> tuple[TensorSpec, ...]:
    def fits(t) -> bool:
        return (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
                and isinstance(t.get("shape"), list) and all(_is(d, int) or isinstance(d, str) for d in t["shape"]))

    if not (isinstance(value, list) and value and all(fits(t) for t in value)):
        problems.append(f'"{where}" should list {{"name", "dtype", "shape"}} objects')
        return ()
    return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in value)


def _figures(obj: dict, where: str, problems: list[str]) -> ParityFigures | None:
    f = _Fields(obj, where, problems)
    values = {"samples": f.get("samples", int, True), "min_cosine": f.get("min_cosine", float, True),
              "mean_cosine": f.get("mean_cosine", float, True), "max_abs": f.get("max_abs", float, True),
              "non_finite": f.get("non_finite", int, True)}
    return ParityFigures(**values) if f.ok else None


def _tolerance(obj: dict, where: str, problems: list[str]) -> Tolerance | None:
    f = _Fields(obj, where, problems)
    values = {"min_cosine": f.get("min_cosine", float, True), "max_abs": f.get("max_abs", float, True)}
    return Tolerance(**values) if f.ok else None


def _parity(obj: dict, where: str, problems: list[str]) -> ParityReport | None:
    f = _Fields(obj, where, problems)
    values = {"random": f.obj_of("random", _figures), "real": f.obj_of("real", _figures),
              "tolerance": f.obj_of("tolerance", _tolerance, True), "passed": f.get("passed", bool, True),
              "validator": f.get("validator", str), "check_s": f.get("check_s", float)}
    return ParityReport(**values) if f.ok else None


def _tower(obj: dict, where: str, problems: list[str]) -> TowerEntry | None:
    f = _Fields(obj, where, problems)
    values = {"file": f.get("file", str, True, f'"{where}.file" should be a string'),
              "sha256": f.get("sha256", str, True, f'"{where}.sha256" should be a string'),
              "bytes": f.get("bytes", int), "inputs": _tensors(obj.get("inputs"), f"{where}.inputs", problems),
              "outputs": _tensors(obj.get("outputs"), f"{where}.outputs", problems),
              "batch_axis": f.get("batch_axis", str), "export_s": f.get("export_s", float),
              "opset": f.get("opset", int), "precision": f.get("precision", str),
              "parity": f.obj_of("parity", _parity)}
    return TowerEntry(**values) if f.ok else None


def _int8(obj: dict, where: str, problems: list[str]) -> Int8Entry | None:
    f = _Fields(obj, where, problems)
    if not (isinstance(obj.get("file"), str) and isinstance(obj.get("sha256"), str)):
        problems.append(f'"{where}" should have "file" and "sha256" strings')
    values = {"file": obj.get("file"), "sha256": obj.get("sha256"), "bytes": f.get("bytes", int),
              "quantize_s": f.get("quantize_s", float), "recipe": f.get("recipe", str),
              "ops": f.strings("ops"), "nodes_excluded": f.strings("nodes_excluded"),
              "weight_type": f.get("weight_type", str), "weight_bits": f.get("weight_bits", int),
              "per_channel": f.get("per_channel", bool), "reduce_range": f.get("reduce_range", bool),
              "activations": f.get("activations", str), "kernel_on_avx2": f.get("kernel_on_avx2", str),
              "parity": f.obj_of("parity", _parity)}
    return Int8Entry(**values) if f.ok else None


def _engine(obj: dict, where: str, problems: list[str]) -> EngineEntry | None:
    f = _Fields(obj, where, problems)
    values = {"file": f.get("file", str, True), "key": f.get("key", str), "sha256": f.get("sha256", str, True),
              "parity": f.obj_of("parity", _parity)}
    return EngineEntry(**values) if f.ok else None


def _trt(obj: dict, where: str, problems: list[str]) -> TrtBlock | None:
    f = _Fields(obj, where, problems)
    values = {"device": f.get("device", dict, True), "image": f.obj_of("image", _engine, True),
              "text": f.obj_of("text", _engine, True)}
    return TrtBlock(**values) if f.ok else None


def _source(obj: dict, where: str, problems: list[str]) -> Source | None:
    f = _Fields(obj, where, problems)
    values = {"checkpoint": f.get("checkpoint", str, True), "sha256": f.get("sha256", str, True),
              "format": f.get("format", str, True), "epoch": f.get("epoch", int)}
    return Source(**values) if f.ok else None


def _pair(value, where: str, read, problems: list[str], missing: str) -> dict | None:
    """{"image": ..., "text": ...} read by `read`; `missing` is the message for a tower that is not an object."""
    entries = {}
    for tower in TOWER_NAMES:
        entry = value.get(tower) if isinstance(value, dict) else None
        if not isinstance(entry, dict):
            problems.append(missing.format(tower=tower))
            continue
        entries[tower] = read(entry, f"{where}.{tower}", problems)
    return entries if len(entries) == len(TOWER_NAMES) and None not in entries.values() else None


def _manifest(doc: dict, problems: list[str]) -> ExportManifest | None:
    """Every missing or mistyped field, in the order of the file's sections."""
    start = len(problems)
    model = doc.get("model")
    if isinstance(model, dict):
        f = _Fields(model, "model", problems)
        values = {k: f.get(k, kind, True) for k, kind in (("name", str), ("embed_dim", int), ("image_size", int),
                                                           ("context_length", int), ("truncation", str))}
        activation = model.get("activation")
        if "activation" in model and activation not in ACTIVATIONS:
            problems.append(f'"model.activation" should be one of {", ".join(ACTIVATIONS)}, got {activation!r}')
        model = ModelInfo(**values, activation=activation) if f.ok else None
    else:
        problems.append('no "model" object')
        model = None
    towers = doc.get("towers")
    if isinstance(towers, dict):
        towers = _pair(towers, "towers", _tower, problems, 'no "towers.{tower}" object')
    else:
        problems.append('no "towers" object')
        towers = None
    int8 = doc.get("int8")
    if int8 is not None:
        int8 = _pair(int8, "int8", _int8, problems, '"int8.{tower}" should have "file" and "sha256" strings')
    profile = doc.get("profile")
    max_batch = profile.get("max_batch") if isinstance(profile, dict) else None
    if not (_is(max_batch, int) and max_batch >= 1):
        problems.append('"profile.max_batch" should be an integer >= 1')
        profile = None
    else:
        profile = Profile(opt_batch=_Fields(profile, "profile", problems).get("opt_batch", int), max_batch=max_batch)
    top = _Fields(doc, "", problems)
    values = {"format": doc.get("format", MANIFEST_FORMAT), "version": doc.get("version", MANIFEST_VERSION),
              "created": top.get("created", str), "precision": top.get("precision", str),
              "uint8_input": top.get("uint8_input", bool), "opset": top.get("opset", int),
              "trt": top.obj_of("trt", _trt), "source": top.obj_of("source", _source),
              "versions": top.get("versions", dict), "machine": top.get("machine", dict)}
    if len(problems) > start:
        return None
    return ExportManifest(model=model, profile=profile, towers=towers, int8=int8, **values)
