"""Concept vocabularies with hypernyms and each train query's concept slots (spec 1.3, 1.4, 3.2).

fklip's stances (spec 6.5):

* each train query's concept list is computed once and deterministically: its concepts C, then
  the distinct non-empty fathers of C in order of first appearance, then (optionally) their
  fathers, de-duplicated in stable order and truncated to `slots`. The original re-built the list
  on every read (mutation drift), through a Python set (hash-seed order), and added fathers
  all-or-nothing;
* hypernyms come from the father file of the same vocabulary (the original swapped them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fklip.data.jsonl import TrainQuery, read_concept_fathers, read_concept_queries
from fklip.errors import ConfigError, preview, raise_collected

logger = logging.getLogger(__name__)

PROMPT = "a photo of "  # the original's prompt; an empty slot is "a photo of " + "" (spec 3.2)
KINDS = ("data", "kb")


# ---- vocabulary ----

@dataclass(frozen=True, eq=False)
class Vocabulary:
    """One concept vocabulary (spec 1.3) with its hypernyms (spec 1.4).

    ids: phrase -> concept id (the query_id; the reader refuses a repeated phrase or id).
    prompts: (id, query_text) of every line, in file order: the texts to encode.
    rows: concept id -> row of `prompts`, i.e. the row of a retrieval result.
    fathers: phrase -> father ("" for a root); empty without a fathers file.
    unknown_fathers: distinct non-empty fathers that are not concepts (allowed; their slots get
        id -1).
    cyclic: phrases on a cycle of the father relation (allowed; lookups go two levels only).
    """

    path: str
    ids: Mapping[str, int]
    prompts: tuple[tuple[int, str], ...]
    rows: Mapping[int, int]
    fathers: Mapping[str, str]
    unknown_fathers: tuple[str, ...] = ()
    cyclic: tuple[str, ...] = ()

    def id_of(self, phrase: str) -> int:
        """The concept id of `phrase`, or -1 for "" and for phrases not in the vocabulary."""
        return self.ids.get(phrase, -1) if phrase else -1

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"{self.path}: {len(self.ids)} concepts, {len(self.prompts)} prompts, "
                 f"{len(self.fathers)} father links"]
        if self.unknown_fathers:
            parts.append(f"{len(self.unknown_fathers)} fathers are not concepts "
                         f"({preview(self.unknown_fathers, 3)})")
        if self.cyclic:
            parts.append(f"{len(self.cyclic)} phrases on father cycles ({preview(self.cyclic, 3)})")
        return "; ".join(parts)


def _cyclic(fathers: Mapping[str, str]) -> list[str]:
    """Phrases on a cycle of phrase -> father; each phrase is walked once, so this always ends."""
    done: set[str] = set()
    cyclic: list[str] = []
    for start in fathers:
        path: list[str] = []
        on_path: set[str] = set()
        node = start
        while node and node not in done and node not in on_path:
            path.append(node)
            on_path.add(node)
            node = fathers.get(node, "")
        if node in on_path:  # came back to this walk: the tail from `node` is a cycle
            cyclic += path[path.index(node):]
        done.update(path)
    return cyclic


def load_vocabulary(queries_path: str | os.PathLike,
                    fathers_path: str | os.PathLike | None = None) -> Vocabulary:
    """Read a `*_concepts_queries.jsonl` and, optionally, its `*_concepts_fathers.jsonl`.

    Malformed files, and repeated phrases or ids, raise DataError from the readers (file, line,
    what was expected).
    """
    ids: dict[str, int] = {}
    rows: dict[int, int] = {}
    prompts = []
    for row, q in enumerate(read_concept_queries(queries_path)):
        ids[q.phrase] = q.query_id
        rows[q.query_id] = row
        prompts.append((q.query_id, q.query_text))
    fathers: dict[str, str] = {}
    if fathers_path is not None:
        for f in read_concept_fathers(fathers_path):
            fathers[f.phrase] = f.phrase_father
    unknown = dict.fromkeys(f for f in fathers.values() if f and f not in ids)
    return Vocabulary(path=str(queries_path), ids=ids, prompts=tuple(prompts), rows=rows,
                      fathers=fathers, unknown_fathers=tuple(unknown), cyclic=tuple(_cyclic(fathers)))


# ---- per-sample concept lists (spec 3.2, stance 6.5) ----

def _candidates(query: TrainQuery, kind: str) -> list[str]:
    """The phrases the original looks up: data = `phrases` of 2..6 words not in `match_phrases`;
    kb = `match_phrases` of at least 2 characters."""
    if kind == "data":
        matched = set(query.match_phrases)
        return [p for p in query.phrases if 2 <= len(p.split()) <= 6 and p not in matched]
    return [p for p in query.match_phrases if len(p) >= 2]


def data_concepts(query: TrainQuery, vocab: Vocabulary) -> list[str]:
    """Entries of `phrases` with 2..6 words, in the data vocabulary, not in `match_phrases`."""
    return [p for p in _candidates(query, "data") if p in vocab.ids]


def kb_concepts(query: TrainQuery, vocab: Vocabulary) -> list[str]:
    """Entries of `match_phrases` with at least 2 characters that are in the KB vocabulary."""
    return [p for p in _candidates(query, "kb") if p in vocab.ids]


def _fathers(phrases: Iterable[str], vocab: Vocabulary) -> list[str]:
    """The distinct non-empty fathers of `phrases`, in order of first appearance."""
    return list(dict.fromkeys(f for p in phrases if (f := vocab.fathers.get(p, ""))))


def with_hypernyms(concepts: Sequence[str], vocab: Vocabulary, slots: int = 5,
                   grandparents: bool = True) -> list[str]:
    """C, then the distinct fathers F of C, then (if `grandparents`) the fathers of F, all looked up
    in `vocab`'s own father file; de-duplicated in stable order, truncated to `slots`."""
    fathers = _fathers(concepts, vocab)
    levels = [*concepts, *fathers, *(_fathers(fathers, vocab) if grandparents else [])]
    return list(dict.fromkeys(levels))[:slots]


@dataclass(frozen=True)
class ConceptSlots:
    """One sample's concept slots: `slots` prompts and ids (-1: empty slot or not a concept)."""

    prompts: tuple[str, ...]
    ids: tuple[int, ...]


def concept_slots(concepts: Sequence[str], vocab: Vocabulary, slots: int = 5) -> ConceptSlots:
    """Pad (with "") or truncate `concepts` to `slots`; prompt = PROMPT + phrase."""
    padded = list(concepts[:slots]) + [""] * max(0, slots - len(concepts))
    return ConceptSlots(tuple(PROMPT + c for c in padded), tuple(vocab.id_of(c) for c in padded))


@dataclass(frozen=True, eq=False)
class ConceptTable:
    """Every train query's concept slots, in query order, with one-time counts for the log.

    ids: (Q, slots) int64, -1 for an empty slot or a phrase that is not a concept.
    prompts: Q tuples of `slots` prompt strings.
    unknown: distinct non-empty slot phrases that are not concepts (fathers outside the vocabulary).
    dropped: distinct candidate phrases (after the word/character filter) not in the vocabulary.
    """

    kind: str
    ids: Tensor
    prompts: tuple[tuple[str, ...], ...]
    no_concepts: int
    unknown: tuple[str, ...]
    dropped: tuple[str, ...]
    mean_filled: float
    mean_known: float

    def __len__(self) -> int:
        return len(self.prompts)

    def slots(self, index: int) -> ConceptSlots:
        """Query `index`'s slots."""
        return ConceptSlots(self.prompts[index], tuple(self.ids[index].tolist()))

    def summary(self) -> str:
        """One line for the log."""
        return (f"{self.kind} concepts: {len(self)} queries, {self.no_concepts} without concepts; "
                f"{self.mean_filled:.2f} of {self.ids.shape[1]} slots filled on average, "
                f"{self.mean_known:.2f} with a known concept; {len(self.unknown)} slot phrases "
                f"not in the vocabulary ({preview(self.unknown, 3)}); {len(self.dropped)} "
                f"candidate phrases not in the vocabulary ({preview(self.dropped, 3)})")


def build_concept_table(queries: Sequence[TrainQuery], vocab: Vocabulary, kind: str = "data",
                        slots: int = 5, hypernyms: bool = True,
                        grandparents: bool = True) -> ConceptTable:
    """The concept slots of every query, computed once (`kind` "data" or "kb" picks the phrases)."""
    problems = []
    if kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        problems.append(f"slots must be an int >= 1, got {slots!r}")
    raise_collected(problems, "concept table: bad arguments", ConfigError)

    ids = torch.full((len(queries), slots), -1, dtype=torch.int64)  # (Q, slots)
    prompts = []
    unknown: dict[str, None] = {}
    dropped: dict[str, None] = {}
    no_concepts = filled = 0
    for i, q in enumerate(queries):
        candidates = _candidates(q, kind)
        concepts = [p for p in candidates if p in vocab.ids]
        dropped.update(dict.fromkeys(p for p in candidates if p not in vocab.ids))
        no_concepts += not concepts
        if hypernyms:
            concepts = with_hypernyms(concepts, vocab, slots, grandparents)
        else:
            concepts = list(dict.fromkeys(concepts))[:slots]
        unknown.update(dict.fromkeys(c for c in concepts if c not in vocab.ids))
        filled += len(concepts)
        s = concept_slots(concepts, vocab, slots)
        ids[i] = torch.tensor(s.ids, dtype=torch.int64)
        prompts.append(s.prompts)
    n = max(len(queries), 1)
    return ConceptTable(kind=kind, ids=ids, prompts=tuple(prompts), no_concepts=no_concepts,
                        unknown=tuple(unknown), dropped=tuple(dropped), mean_filled=filled / n,
                        mean_known=(ids >= 0).sum().item() / n)

