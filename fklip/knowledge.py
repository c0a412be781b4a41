"""Concept knowledge: vocabularies with hypernyms, per-sample concept slots, concept->image
retrieval over the knowledge base (KB) with MMR re-ranking (spec 1.3, 1.4, 3.2 to 3.4).

fklip's stances (spec 6.5, 6.7):

* each train query's concept list is computed once and deterministically: its concepts C, then
  the distinct non-empty fathers of C in order of first appearance, then (optionally) their
  fathers, de-duplicated in stable order and truncated to `slots`. The original re-built the list
  on every read (mutation drift), through a Python set (hash-seed order), and added fathers
  all-or-nothing;
* hypernyms come from the father file of the same vocabulary (the original swapped them);
* each concept's images are searched over the whole KB, exactly, with the project's top-k.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fklip.data.jsonl import TrainQuery, read_concept_fathers, read_concept_queries
from fklip.errors import ConfigError, DataError, preview, raise_collected
from fklip.retrieval import topk_chunked

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


# ---- concept -> image retrieval (spec 3.3, stance 6.7) ----

@torch.no_grad()
def mmr(concept_emb: Tensor, cand_emb: Tensor, keep: int = 10, diversity: float = 0.8) -> Tensor:
    """Maximal marginal relevance re-ranking, batched over concepts.

    concept_emb (C, D), cand_emb (C, K, D); both are L2-normalised here, and cos(a, b) = <a, b>.
    First pick: argmax_i cos(cand_i, concept). Each next pick, over the unpicked i:
        argmax_i  (1 - diversity) * cos(cand_i, concept) - diversity * max_{p picked} cos(cand_i, p)
    Ties go to the lowest candidate position. Scores are float64, so exact inputs give exact ties.
    Returns (C, keep) int64 positions into the K candidates in selection order, -1 past K.
    """
    if concept_emb.ndim != 2 or cand_emb.ndim != 3 or cand_emb.shape[0] != concept_emb.shape[0] \
            or cand_emb.shape[2] != concept_emb.shape[1]:
        raise DataError(f"mmr: expected concept_emb (C, D) and cand_emb (C, K, D), got "
                        f"{tuple(concept_emb.shape)} and {tuple(cand_emb.shape)}")
    n_concept, n_cand, _ = cand_emb.shape
    device = cand_emb.device
    picks = torch.full((n_concept, keep), -1, dtype=torch.int64, device=device)  # (C, keep)
    if n_concept == 0 or n_cand == 0:
        return picks
    concept = F.normalize(concept_emb.to(device, torch.float64), dim=-1)  # (C, D)
    cand = F.normalize(cand_emb.to(torch.float64), dim=-1)  # (C, K, D)
    relevance = torch.bmm(cand, concept[:, :, None]).squeeze(2)  # (C, K)
    pairwise = torch.bmm(cand, cand.transpose(1, 2))  # (C, K, K): [c, i, p] = cos(cand_i, cand_p)
    closest = torch.zeros_like(relevance)  # (C, K): max cos to the picked ones (unused at step 0)
    picked = torch.zeros((n_concept, n_cand), dtype=torch.bool, device=device)  # (C, K)
    position = torch.arange(n_cand, device=device).expand(n_concept, n_cand)  # (C, K)
    for step in range(min(keep, n_cand)):
        score = relevance if step == 0 else (1 - diversity) * relevance - diversity * closest
        score = score.masked_fill(picked, -math.inf)  # (C, K)
        best = score.max(dim=1, keepdim=True).values  # (C, 1)
        # the lowest position among the candidates that reach the best score
        pick = torch.where(score == best, position, n_cand).min(dim=1).values  # (C,)
        picks[:, step] = pick
        picked.scatter_(1, pick[:, None], True)
        sim = pairwise.gather(2, pick[:, None, None].expand(n_concept, n_cand, 1)).squeeze(2)
        closest = sim if step == 0 else torch.maximum(closest, sim)  # (C, K)
    return picks


@torch.no_grad()
def retrieve_concept_images(concept_emb: Tensor, kb_emb: Tensor, k: int = 20, keep: int = 10,
                            diversity: float = 0.8, *, query_chunk: int = 4096,
                            gallery_chunk: int = 65536, concept_chunk: int = 1024) -> Tensor:
    """Each concept's `keep` KB images: exact top-k (min(k, M)) by cosine over the whole KB, then
    `mmr` on those candidates (spec 3.3).

    concept_emb (C, D), kb_emb (M, D) on one device; both are L2-normalised here.
    Returns (C, keep) int64 rows of kb_emb in MMR selection order, -1 where fewer than `keep` exist.
    Raises DataError for empty or non-finite features (from the top-k).
    """
    device = concept_emb.device
    rows = torch.full((concept_emb.shape[0], keep), -1, dtype=torch.int64, device=device)
    if concept_emb.shape[0] == 0:
        return rows
    concept = F.normalize(concept_emb.float(), dim=-1)  # (C, D)
    kb = F.normalize(kb_emb.to(device, torch.float32), dim=-1)  # (M, D)
    _, top = topk_chunked(concept, kb, k, query_chunk=query_chunk,
                          gallery_chunk=gallery_chunk)  # (C, min(k, M))
    for c0 in range(0, concept.shape[0], concept_chunk):  # bounds the (c, k, D) candidate copy
        cand = top[c0:c0 + concept_chunk]  # (c, k)
        pos = mmr(concept[c0:c0 + concept_chunk], kb[cand], keep, diversity)  # (c, keep)
        found = cand.gather(1, pos.clamp(min=0))  # (c, keep)
        rows[c0:c0 + concept_chunk] = torch.where(pos >= 0, found, -1)
    return rows


class RowLookup:
    """Vectorised concept id -> row (-1 when unknown): a dense table over [min id, max id], or
    sorted keys with `searchsorted` when the ids are too sparse for a table."""

    def __init__(self, rows: Mapping[int, int], device: torch.device | str = "cpu") -> None:
        keys = torch.tensor(sorted(rows), dtype=torch.int64)  # (N,)
        values = torch.tensor([rows[i] for i in sorted(rows)], dtype=torch.int64)  # (N,)
        self.offset = int(keys[0]) if len(keys) else 0
        span = int(keys[-1]) - self.offset + 1 if len(keys) else 0
        self.dense = span <= max(4 * len(keys), 1 << 20)
        if self.dense:
            self.table = torch.full((span,), -1, dtype=torch.int64)  # (span,)
            self.table[keys - self.offset] = values
        else:
            self.keys, self.values = keys, values
        self.to(device)

    def __call__(self, ids: Tensor) -> Tensor:
        """Rows for an int64 tensor of ids (any shape); -1 for -1 and for unknown ids."""
        if self.dense:
            if self.table.numel() == 0:
                return torch.full_like(ids, -1)
            local = ids - self.offset
            inside = (local >= 0) & (local < self.table.numel())
            return torch.where(inside, self.table[local.clamp(0, self.table.numel() - 1)], -1)
        if self.keys.numel() == 0:
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self.keys, ids.contiguous()).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == ids, self.values[pos], -1)

    def to(self, device: torch.device | str) -> "RowLookup":
        """Move this lookup to `device` (in place, so it moves once) and return it."""
        if self.dense:
            self.table = self.table.to(device)
        else:
            self.keys, self.values = self.keys.to(device), self.values.to(device)
        return self


def prototype_features(table_ids: Tensor, concept_rows: RowLookup | Mapping[int, int],
                       retrieved: Tensor, kb_emb: Tensor) -> Tensor:
    """The retrieved KB image features of each (sample, slot) (spec 3.4 `predict_concept_images`).

    table_ids (B, S) int64 concept ids (-1: none); concept_rows maps an id to its row of
    `retrieved` (build a RowLookup once: a Mapping is converted on every call); retrieved
    (C, keep) int64 KB rows (-1: padding); kb_emb (M, D), used as given (normalise it first).
    Returns (B, S, keep, D) in kb_emb's dtype and device; zeros for -1, unknown ids and padding.
    """
    device = kb_emb.device
    if kb_emb.shape[0] == 0 or retrieved.shape[0] == 0:
        return kb_emb.new_zeros((*table_ids.shape, retrieved.shape[1], kb_emb.shape[1]))
    lookup = concept_rows if isinstance(concept_rows, RowLookup) else RowLookup(concept_rows)
    rows = lookup.to(device)(table_ids.to(device, non_blocking=True))  # (B, S); the host need not wait
    images = retrieved.to(device)[rows.clamp(min=0)]  # (B, S, keep)
    images = torch.where(rows[..., None] >= 0, images, -1)
    features = kb_emb[images.clamp(min=0)]  # (B, S, keep, D)
    return features.masked_fill(images[..., None] < 0, 0)
