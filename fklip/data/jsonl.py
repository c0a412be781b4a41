"""Readers for the original's JSON-lines files (spec 1.2 to 1.6).

Every reader checks every line and raises one `DataError` naming the file, the line numbers and
what was expected. Ids may be ints or strings in the files; they keep their type in the records,
and `id_key` gives the string form under which fklip compares them.

The rules are the same for every file kind, and every command reads through these readers:

* an id (or concept phrase) that keys the file may appear once: a repeat, compared by `id_key` (94
  and "94" collide), is an error naming both lines. The original kept the last line in its dicts
  and so silently scored fewer queries, or took another concept;
* blank lines (empty or only whitespace; the newline ending the last line is not one) are skipped,
  with one warning per file naming their line numbers; a file with nothing else is an error;
* an input that is missing, a directory or not a regular file (/dev/null, a pipe) is an error
  saying which (`fklip.errors.check_input_file`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Union

from fklip.errors import DataError, check_input_file, preview, raise_collected

logger = logging.getLogger(__name__)

Id = Union[int, str]


def id_key(value: Id) -> str:
    """The string under which an id is compared: 94 and "94" are the same image."""
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class TrainQuery:
    """One caption of the training set with its images and mined concept phrases (spec 1.2)."""

    query_id: Id
    query_text: str
    item_ids: tuple[Id, ...]
    phrases: tuple[str, ...]
    match_phrases: tuple[str, ...]


@dataclass(frozen=True)
class ValQuery:
    """One validation caption and its gold images (spec 1.5)."""

    query_id: Id
    query_text: str
    item_ids: tuple[Id, ...]


@dataclass(frozen=True)
class TextGold:
    """One query's gold images: all the text-to-image gold of `fklip predict` needs (spec 4.2)."""

    query_id: Id
    item_ids: tuple[Id, ...]


@dataclass(frozen=True)
class TextQuery:
    """A caption to encode: the two fields feature extraction reads from any queries file."""

    query_id: Id
    query_text: str


@dataclass(frozen=True)
class ConceptQuery:
    """One concept of a vocabulary with its prompt (spec 1.3)."""

    query_id: Id
    query_text: str
    phrase: str


@dataclass(frozen=True)
class ConceptFather:
    """One concept and its hypernym; `phrase_father` is "" for a root (spec 1.4)."""

    query_id: Id
    phrase: str
    phrase_father: str


@dataclass(frozen=True)
class ImageGold:
    """One validation image and the ids of its matching queries: the image-to-text gold (spec 1.6)."""

    image_id: Id
    item_ids: tuple[Id, ...]


# ---- field checkers: each returns the converted value or raises ValueError(expected) ----

def _is_id(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _id(v: object) -> Id:
    if not _is_id(v):
        raise ValueError("an int or a non-empty string")
    return v  # type: ignore[return-value]


def _int_id(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("an int")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _ids(v: object) -> tuple[Id, ...]:
    if not isinstance(v, list) or not all(_is_id(x) for x in v):
        raise ValueError("a list of ints or strings")
    return tuple(v)


def _nonempty_ids(v: object) -> tuple[Id, ...]:
    ids = _ids(v)
    if not ids:
        raise ValueError("a non-empty list of ids")
    return ids


def _strs(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("a list of strings")
    return tuple(v)


Field = tuple[str, Callable[[object], object]]


def warn_blank_lines(path: str | os.PathLike, linenos: list[int]) -> None:
    """The one warning a reader gives for the blank lines it skipped."""
    if linenos:
        plural = "s" * (len(linenos) > 1)
        logger.warning("%s: skipped %d blank line%s (line%s %s)", path, len(linenos), plural, plural,
                       preview(linenos, 10))


def duplicate_problems(field: str, values: Iterable[tuple[int, Id]]) -> list[str]:
    """One problem per value met again, compared by `id_key` (94 and "94" collide): where, the
    value, and where it was first. `values` gives (line number, value) in file order."""
    first: dict[str, tuple[int, Id]] = {}
    problems = []
    for at, value in values:
        key = id_key(value)
        if key not in first:
            first[key] = (at, value)
            continue
        at0, value0 = first[key]
        written = (f" as {json.dumps(value0)}; ids compare as strings"
                   if json.dumps(value0) != json.dumps(value) else "")
        problems.append(f"line {at}: duplicate {field} {json.dumps(value)} (first on line {at0}{written})")
    return problems


def iter_json_lines(path: str | os.PathLike, what: str = "JSON lines") -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed value) for each non-blank line; malformed JSON raises at once.

    Blank lines are skipped with one warning once the file is read to its end (`warn_blank_lines`).
    """
    path = check_input_file(path, what)
    seen, blank = False, []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                blank.append(lineno)
                continue
            seen = True
            try:
                yield lineno, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e}); "
                                "expected one JSON object per line") from None
    if not seen:
        raise DataError(f"{path}: the file is empty; expected {what}")
    warn_blank_lines(path, blank)


def read_records(path: str | os.PathLike, fields: list[Field], build: Callable[..., object],
                 what: str, unique: tuple[str, ...] = ()) -> list:
    """Read a JSON-lines file whose objects must carry `fields`, the values of each field named in
    `unique` appearing once; collect every problem, raise once."""
    records, lines, problems = [], [], []
    names = ", ".join(f'"{name}"' for name, _ in fields)
    for lineno, obj in iter_json_lines(path, f"{what} (JSON lines with {names})"):
        if not isinstance(obj, dict):
            problems.append(f"line {lineno}: expected a JSON object with {names}, "
                            f"got {type(obj).__name__}")
            continue
        values, ok = {}, True
        for name, check in fields:
            if name not in obj:
                problems.append(f'line {lineno}: missing field "{name}"')
                ok = False
                continue
            try:
                values[name] = check(obj[name])
            except ValueError as e:
                problems.append(f'line {lineno}: field "{name}" must be {e}, got {obj[name]!r:.60}')
                ok = False
        if ok:
            records.append(build(**values))
            lines.append(lineno)
    for name in unique:
        problems += duplicate_problems(name, zip(lines, (getattr(r, name) for r in records)))
    raise_collected(problems, f"{path}: bad {what} file")
    return records


def read_train_queries(path: str | os.PathLike) -> list[TrainQuery]:
    """`fashion-gen_train_queries_phrases.jsonl`: query_id, query_text, item_ids, phrases, match_phrases."""
    fields = [("query_id", _id), ("query_text", _str), ("item_ids", _nonempty_ids),
              ("phrases", _strs), ("match_phrases", _strs)]
    return read_records(path, fields, TrainQuery, "train queries", unique=("query_id",))


def read_val_queries(path: str | os.PathLike) -> list[ValQuery]:
    """`fashion-gen_val_queries.jsonl`: query_id, query_text, item_ids (the text-to-image gold)."""
    fields = [("query_id", _id), ("query_text", _str), ("item_ids", _ids)]
    return read_records(path, fields, ValQuery, "val queries", unique=("query_id",))


def read_text_gold(path: str | os.PathLike) -> list[TextGold]:
    """The text-to-image gold of `fklip predict` (`--text-standard-path`): query_id and item_ids,
    all the original's predict_evaluate.py reads (other fields, such as query_text, are ignored)."""
    fields = [("query_id", _id), ("item_ids", _ids)]
    return read_records(path, fields, TextGold, "text-to-image gold", unique=("query_id",))


def read_text_queries(path: str | os.PathLike) -> list[TextQuery]:
    """Any queries file, for feature extraction: query_id and query_text (other fields ignored)."""
    fields = [("query_id", _id), ("query_text", _str)]
    return read_records(path, fields, TextQuery, "text queries", unique=("query_id",))


def read_concept_queries(path: str | os.PathLike) -> list[ConceptQuery]:
    """`*_concepts_queries.jsonl`: query_id (int), query_text (the prompt), phrase.

    Both the id and the phrase name one concept, so each appears once: the knowledge code maps
    phrase -> id and id -> prompt row (the original kept the last line of each)."""
    fields = [("query_id", _int_id), ("query_text", _str), ("phrase", _str)]
    return read_records(path, fields, ConceptQuery, "concept queries", unique=("query_id", "phrase"))


def read_concept_fathers(path: str | os.PathLike) -> list[ConceptFather]:
    """`*_concepts_fathers.jsonl`: query_id, phrase, phrase_father ("" for a root); one line per
    concept, so query_id and phrase each appear once (a phrase has one father)."""
    fields = [("query_id", _id), ("phrase", _str), ("phrase_father", _str)]
    return read_records(path, fields, ConceptFather, "concept fathers", unique=("query_id", "phrase"))


def read_image_gold(path: str | os.PathLike) -> list[ImageGold]:
    """`fashion-gen_val_images.jsonl`: image_id and item_ids, or image_id and text (spec 1.6).

    As in the original, a line without `item_ids` has the one-element gold `[text]`. Each
    image_id appears once.
    """
    records, lines, problems = [], [], []
    for lineno, obj in iter_json_lines(path, 'image-to-text gold (JSON lines with "image_id" and "item_ids")'):
        if not isinstance(obj, dict):
            problems.append(f'line {lineno}: expected a JSON object with "image_id" and "item_ids"')
            continue
        if "image_id" not in obj:
            problems.append(f'line {lineno}: missing field "image_id"')
            continue
        try:
            image_id = _id(obj["image_id"])
            if "item_ids" in obj:
                gold = _ids(obj["item_ids"])
            elif "text" in obj:
                gold = (_id(obj["text"]),)
            else:
                problems.append(f'line {lineno}: missing field "item_ids" (or "text")')
                continue
        except ValueError as e:
            problems.append(f"line {lineno}: ids must be {e}")
            continue
        records.append(ImageGold(image_id, gold))
        lines.append(lineno)
    problems += duplicate_problems("image_id", zip(lines, (r.image_id for r in records)))
    raise_collected(problems, f"{path}: bad val images file")
    return records
