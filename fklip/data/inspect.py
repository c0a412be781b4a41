"""`fklip data inspect`: recognise a data file by its content, validate it whole, summarise it.

Each file is read by the reader every command uses for it, so inspect applies the same rules
(repeated ids, blank lines, zero feature rows) as the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fklip.data import jsonl
from fklip.data.archive import ImageArchive
from fklip.data.features import npy_ids_path, read_features
from fklip.errors import DataError, check_input_file
from fklip.model import count_parameters, load_checkpoint

IDS_SUFFIX = ".ids.jsonl"


def _records(reader: Callable[[Path], list]) -> Callable[[Path], str]:
    return lambda path: f"{len(reader(path))} records"


def _features(path: Path) -> str:
    """A feature file, JSON lines or .npy (with its ids file): rows, dim, dtype, id field."""

    feats = read_features(path)
    form = f".npy with {npy_ids_path(path).name}" if path.suffix == ".npy" else "JSON lines"
    return f"{form}, {len(feats)} rows, dim {feats.dim}, {feats.matrix.dtype}, id field {feats.id_field}"


def _ids_file(path: Path) -> str:
    """The `<name>.ids.jsonl` of a .npy feature matrix: checked with its matrix."""

    if not path.name.endswith(IDS_SUFFIX):
        raise DataError(f"{path}: the ids file of .npy features (its first line is their header) must be "
                        f"named <name>{IDS_SUFFIX}, beside its matrix <name>.npy")
    matrix = path.with_name(path.name[:-len(IDS_SUFFIX)] + ".npy")
    if not matrix.exists():
        raise DataError(f"{path}: an ids file of .npy features whose matrix {matrix} is missing")
    feats = read_features(matrix)
    return (f"for {matrix.name}, {len(feats)} ids, dim {feats.dim}, {feats.matrix.dtype}, "
            f"id field {feats.id_field}")


# Distinguishing fields of each JSON-lines format -> (description, summariser). First match wins.
JSONL_FORMATS: list[tuple[set[str], str, Callable[[Path], str]]] = [
    ({"feature"}, "features", _features),
    ({"id_field", "count", "dim", "dtype"}, "ids file of .npy features", _ids_file),
    ({"phrase", "phrase_father"}, "concept fathers (hypernyms)", _records(jsonl.read_concept_fathers)),
    ({"phrases", "match_phrases"}, "train queries with phrases", _records(jsonl.read_train_queries)),
    ({"phrase", "query_text"}, "concept queries", _records(jsonl.read_concept_queries)),
    ({"query_id", "query_text", "item_ids"}, "val queries (text-to-image gold)", _records(jsonl.read_val_queries)),
    ({"query_id", "item_ids"}, "text-to-image gold", _records(jsonl.read_text_gold)),
    ({"image_id"}, "val images (image-to-text gold)", _records(jsonl.read_image_gold)),
]


def describe(path: Path, trust: bool = False) -> str:
    """One line saying what `path` is and how much it holds; DataError when it is bad."""
    path = check_input_file(path, "a data file (.npz, .npy, JSON lines or a checkpoint)")
    if path.suffix == ".npz":

        with ImageArchive(path) as archive:
            return (f"{path}: image archive, {len(archive)} images, {archive.encoding}, "
                    f"{archive.height}x{archive.width}, {archive.nbytes / 2**20:.1f} MiB decoded")
    if path.suffix == ".npy":
        return f"{path}: features, {_features(path)}"
    if path.suffix in (".pt", ".pth", ".bin"):

        ckpt = load_checkpoint(path, trust=trust)
        epoch = "" if ckpt.epoch is None else f", epoch {ckpt.epoch}"
        return (f"{path}: {ckpt.source_format} checkpoint, model {ckpt.spec.name}, "
                f"{count_parameters(ckpt.model) / 1e6:.2f}M parameters, activation {ckpt.spec.activation}, "
                f"truncation {ckpt.spec.truncation}{epoch}")
    lines = jsonl.iter_json_lines(path)
    try:
        lineno, first = next(lines)
    finally:
        lines.close()
    if not isinstance(first, dict):
        raise DataError(f"{path}, line {lineno}: expected a JSON object")
    for fields, what, summarise in JSONL_FORMATS:
        if fields <= first.keys():
            return f"{path}: {what}, {summarise(path)}"
    raise DataError(f"{path}: cannot tell the format from the first record's fields "
                    f"{sorted(first)}; expected the fields of one of: "
                    + "; ".join(f"{what} ({', '.join(sorted(f))})" for f, what, _ in JSONL_FORMATS))
