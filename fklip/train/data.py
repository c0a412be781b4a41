"""Training samples (spec 3.2): one per (train query, item id), with the query's concept slots.

Batches are built in the main process from the memory-mapped archive. The epoch order is a
seeded permutation cut into global batches of `batch_size x world_size` samples; each rank takes
its contiguous slice, so two processes see exactly the samples one process sees with twice the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from fklip.data.archive import ImageArchive
from fklip.data.jsonl import Id, TrainQuery
from fklip.errors import DataError


@dataclass
class Batch:
    images: np.ndarray            # (B, ...) in the archive's encoding
    tokens: torch.Tensor          # (B, context_length)
    concept_prompts: list[list[str]]  # (B, S) prompt texts; S = data slots + KB slots
    concept_ids: torch.Tensor     # (B, S) int64 concept ids per vocabulary, -1 when empty
    concept_kind: list[str]       # (S,) "data" or "kb": which vocabulary each slot belongs to


class TrainSet:
    """The samples of a train queries file, and batches of them."""

    def __init__(self, queries: Sequence[TrainQuery], archive: ImageArchive, tokenizer,
                 tables: dict | None = None):
        self.queries, self.archive, self.tokenizer = queries, archive, tokenizer
        self.samples: list[tuple[int, Id]] = [(qi, item) for qi, q in enumerate(queries) for item in q.item_ids]
        if not self.samples:
            raise DataError("the training set is empty: no (query, item_id) pairs")
        self.tables = tables or {}  # kind -> ConceptTable (fklip.knowledge)

    def __len__(self) -> int:
        return len(self.samples)

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return len(self) // (batch_size * world_size)

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[list[int]]:
        """This rank's sample indices of each global batch, in a seeded shuffled order (drop_last)."""
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(self), generator=g).tolist()
        global_batch = batch_size * world_size
        for b in range(len(self) // global_batch):
            start = b * global_batch + rank * batch_size
            yield order[start:start + batch_size]

    def batch(self, indices: Sequence[int], out: np.ndarray | None = None) -> Batch:
        query_idx = [self.samples[i][0] for i in indices]
        images = self.archive.read_batch([self.samples[i][1] for i in indices], out=out)
        tokens = self.tokenizer([self.queries[q].query_text for q in query_idx])
        prompts: list[list[str]] = [[] for _ in indices]
        ids, kinds = [], []
        for kind, table in self.tables.items():
            for row, q in enumerate(query_idx):
                prompts[row].extend(table.prompts[q])
            ids.append(table.ids[query_idx])  # (B, slots)
            kinds.extend([kind] * table.ids.shape[1])
        concept_ids = torch.cat(ids, dim=1) if ids else torch.zeros((len(indices), 0), dtype=torch.long)
        return Batch(images, tokens, prompts, concept_ids, kinds)
