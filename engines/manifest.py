"""Reading an export folder's `manifest.json`, and checking the graph files it lists.

Every problem with a folder is a `FklipError` naming the file: no folder, no manifest, not an
fklip export, a version this fklip cannot read, a listed file that is missing, or a file whose
sha256 no longer matches ("was modified after export"). Structural problems are collected and
raised once. Hashes are computed in 1 MiB chunks and remembered per (file, size, mtime, ctime)
for the life of the process, so opening several runners on one export hashes each file once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from export.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, sha256_of
from fklip.errors import ConfigError, DataError, raise_collected
from fklip.model import ACTIVATIONS

logger = logging.getLogger(__name__)

TOWER_NAMES = ("image", "text")
MODEL_FIELDS = {"name": str, "embed_dim": int, "image_size": int, "context_length": int, "truncation": str}
# Fields older exports lack -> the values allowed ("activation": "gelu" or "quick_gelu").
OPTIONAL_MODEL_FIELDS = {"activation": tuple(ACTIVATIONS)}

# (resolved path, size, mtime_ns, ctime_ns) -> sha256; ctime changes on any write, even one that
# restores the modification time.
_HASHES: dict[tuple, str] = {}


def _preview_folder(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, remembered while the file's size and times stay the same."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        digest = _HASHES[key] = sha256_of(Path(path))
    return digest


def _structure_problems(manifest: dict) -> list[str]:
    """Every missing or mistyped field a runner relies on."""
    problems = []
    model = manifest.get("model")
    if not isinstance(model, dict):
        problems.append('no "model" object')
    else:
        for name, kind in MODEL_FIELDS.items():
            value = model.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                problems.append(f'"model.{name}" should be {kind.__name__}, got {value!r}')
        for name, allowed in OPTIONAL_MODEL_FIELDS.items():
            if name in model and model[name] not in allowed:
                problems.append(f'"model.{name}" should be one of {", ".join(allowed)}, got {model[name]!r}')
    towers = manifest.get("towers")
    if not isinstance(towers, dict):
        problems.append('no "towers" object')
    else:
        for tower in TOWER_NAMES:
            entry = towers.get(tower)
            if not isinstance(entry, dict):
                problems.append(f'no "towers.{tower}" object')
                continue
            for name in ("file", "sha256"):
                if not isinstance(entry.get(name), str):
                    problems.append(f'"towers.{tower}.{name}" should be a string')
            for name in ("inputs", "outputs"):
                io = entry.get(name)
                if not (isinstance(io, list) and io and all(isinstance(t, dict) and "name" in t
                                                            and "dtype" in t and "shape" in t for t in io)):
                    problems.append(f'"towers.{tower}.{name}" should list {{"name", "dtype", "shape"}} objects')
    int8 = manifest.get("int8")
    if int8 is not None:
        for tower in TOWER_NAMES:
            entry = int8.get(tower) if isinstance(int8, dict) else None
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("sha256"), str)):
                problems.append(f'"int8.{tower}" should have "file" and "sha256" strings')
    profile = manifest.get("profile")
    if not (isinstance(profile, dict) and isinstance(profile.get("max_batch"), int)
            and profile["max_batch"] >= 1):
        problems.append('"profile.max_batch" should be an integer >= 1')
    return problems


def graph_entries(manifest: dict, int8: bool = False) -> dict[str, dict]:
    """{tower: {"file", "sha256", "inputs", "outputs", "parity", ...}} of the graphs a runner uses.

    The int8 graphs take and give what the fp32 graphs do, so their IO comes from `towers`.
    """
    towers = manifest["towers"]
    if not int8:
        return {t: dict(towers[t]) for t in TOWER_NAMES}
    if manifest.get("int8") is None:
        raise ConfigError(f"--int8: the export in {manifest['_dir']} has no int8 graphs; "
                          "re-export with `fklip export ... --int8`")
    return {t: {**towers[t], **manifest["int8"][t]} for t in TOWER_NAMES}


def read_manifest(engine_dir: str | os.PathLike, int8: bool = False, verify: bool = True) -> dict:
    """The manifest of a `fklip export` folder, its graph files checked.

    `int8` selects the graphs to check (the int8 pair, which must exist, instead of the fp32
    pair); `verify=False` skips the sha256 comparison. The returned dict is the JSON document
    plus "_dir" (the folder, a Path).
    """
    folder = Path(engine_dir)
    hint = f"make one with `fklip export CHECKPOINT --out {folder}`"
    if not folder.is_dir():
        what = "is a file, not an export folder" if folder.exists() else "no such export folder"
        raise ConfigError(f"{folder}: {what}; {hint}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing, so {folder} is not an fklip export folder "
                        f"({_preview_folder(folder)}); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); re-export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not an fklip export manifest (format {found!r}, expected "
                        f"{MANIFEST_FORMAT!r}); {hint}")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {version!r} is not supported (this fklip reads "
                        f"version {MANIFEST_VERSION}); upgrade fklip or re-export with this one")
    raise_collected(_structure_problems(manifest), f"{path}: malformed manifest; re-export")
    manifest["_dir"] = folder

    problems = []
    for tower, entry in graph_entries(manifest, int8).items():
        graph = folder / entry["file"]
        if not graph.is_file():
            problems.append(f"{graph} ({tower} tower) is listed in {MANIFEST_NAME} but missing")
        elif verify:
            digest = file_sha256(graph)
            if digest != entry["sha256"]:
                problems.append(f"{graph} was modified after export (sha256 {digest[:12]}..., "
                                f"the manifest records {entry['sha256'][:12]}...)")
    raise_collected(problems, f"{folder}: the export is incomplete or changed; re-export it")
    logger.debug("read %s (model %s, precision %s)", path, manifest["model"]["name"], manifest.get("precision"))
    return manifest
