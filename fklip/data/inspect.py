"""`fklip data inspect`: recognise a data file by its content, validate it whole, summarise it."""

from __future__ import annotations

from pathlib import Path

from fklip.data import jsonl
from fklip.errors import DataError

# Distinguishing fields of each JSON-lines format -> (description, reader). First match wins.
JSONL_FORMATS = [
    ({"phrase", "phrase_father"}, "concept fathers (hypernyms)", jsonl.read_concept_fathers),
    ({"phrases", "match_phrases"}, "train queries with phrases", jsonl.read_train_queries),
    ({"phrase", "query_text"}, "concept queries", jsonl.read_concept_queries),
    ({"query_id", "item_ids"}, "val queries (text-to-image gold)", jsonl.read_val_queries),
    ({"image_id"}, "val images (image-to-text gold)", jsonl.read_image_gold),
]


def describe(path: Path, trust: bool = False) -> str:
    """One line saying what `path` is and how much it holds; DataError when it is bad."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npz":
        from fklip.data.archive import ImageArchive

        with ImageArchive(path) as archive:
            return (f"{path}: image archive, {len(archive)} images, {archive.encoding}, "
                    f"{archive.height}x{archive.width}, {archive.nbytes / 2**20:.1f} MiB decoded")
    if path.suffix in (".pt", ".pth", ".bin"):
        from fklip.model import count_parameters, load_checkpoint

        ckpt = load_checkpoint(path, trust=trust)
        epoch = "" if ckpt.epoch is None else f", epoch {ckpt.epoch}"
        return (f"{path}: {ckpt.source_format} checkpoint, model {ckpt.spec.name}, "
                f"{count_parameters(ckpt.model) / 1e6:.2f}M parameters, activation {ckpt.spec.activation}, "
                f"truncation {ckpt.spec.truncation}{epoch}")
    first = next(jsonl.iter_json_lines(path))[1]
    if not isinstance(first, dict):
        raise DataError(f"{path}, line 1: expected a JSON object")
    for fields, what, reader in JSONL_FORMATS:
        if fields <= first.keys():
            records = reader(path)
            return f"{path}: {what}, {len(records)} records"
    raise DataError(f"{path}: cannot tell the format from the first record's fields "
                    f"{sorted(first)}; expected the fields of one of: "
                    + "; ".join(f"{what} ({', '.join(sorted(f))})" for f, what, _ in JSONL_FORMATS))
