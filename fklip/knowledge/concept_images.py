"""Concept -> image retrieval over the knowledge base (KB): exact top-k, then MMR re-ranking
(spec 3.3, stance 6.7: each concept's images are searched over the whole KB, exactly, with the
project's top-k); and the retrieved images' features of each training sample's slots (spec 3.4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fklip.errors import DataError
from fklip.retrieval import topk_chunked


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
