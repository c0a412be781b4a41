"""The knowledge training reads (spec 3.3): the KB archives and vocabularies, loaded once, and each
concept's 10 KB images, retrieved with the current weights before the first epoch, or at the start
of every epoch with --is-update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fklip.data.archive import ImageArchive
from fklip.data.jsonl import TrainQuery
from fklip.distributed import DistContext, gather_rows, shard_range
from fklip.encode import encode_archive, encode_texts
from fklip.knowledge.concept_images import retrieve_concept_images
from fklip.knowledge.concepts import (
    ConceptTable,
    Vocabulary,
    build_concept_table,
    load_vocabulary,
)
from fklip.model import ModelSpec, Tokenizer


@dataclass
class Knowledge:
    """Retrieved concept images: per vocabulary, each concept's KB rows; and the KB features.
    Row r of `retrieved[kind]` belongs to the vocabulary's r-th prompt (`Vocabulary.rows`)."""

    kb_emb: torch.Tensor                 # (M, D) float32, L2-normalised
    retrieved: dict[str, torch.Tensor]   # kind -> (C, 10) int64 rows into kb_emb, -1 padding

    def to(self, device: str | torch.device) -> Knowledge:
        """The same knowledge on `device`: on the training device, each step's prototype gather
        (B, S, 10, D) runs there instead of on the host and crossing the bus every step."""
        return Knowledge(self.kb_emb.to(device), {k: v.to(device) for k, v in self.retrieved.items()})


def load_knowledge_inputs(queries: Sequence[TrainQuery], vocabulary_files: Mapping[str, tuple[Path, Path | None]],
                          kb_paths: Sequence[Path], tokenizer: Tokenizer, spec: ModelSpec,
                          stack: contextlib.ExitStack):
    """Vocabularies, per-query concept tables and KB archives (ids de-duplicated across files).

    vocabulary_files: kind ("data", "kb") -> (concept queries file, fathers file or None).
    Returns ({kind: (Vocabulary, tokenizer)}, {kind: ConceptTable}, [(archive, ids)]); every
    archive is closed by `stack`.
    """
    vocabs: dict[str, tuple[Vocabulary, Tokenizer]] = {}
    tables: dict[str, ConceptTable] = {}
    for kind, (path, fathers) in vocabulary_files.items():
        vocab = load_vocabulary(path, fathers)
        vocabs[kind] = (vocab, tokenizer)
        tables[kind] = build_concept_table(queries, vocab, kind=kind)
    kb_archives, seen = [], set()
    for path in kb_paths:
        archive = stack.enter_context(ImageArchive(path))
        archive.check_image_size(spec.image_size, spec.name)
        ids = [i for i in archive.ids if i not in seen]
        seen.update(ids)
        kb_archives.append((archive, ids))
    return vocabs, tables, kb_archives


@torch.no_grad()
def refresh_knowledge(model, kb_archives, vocabs: dict, ctx: DistContext, batch_size: int,
                      device: str, precision: str = "fp32") -> Knowledge:
    """Encode every KB image and concept prompt with the current weights (fp32 weights, eval mode;
    each rank a shard, gathered), then retrieve each concept's 20 nearest KB images over the WHOLE
    KB and keep 10 by MMR (spec 3.3 with the stance of 6.7). precision "fp32" encodes as the
    original does; "amp" under autocast (fp16 on CUDA, bf16 on the CPU). The knowledge is
    returned on `device`, where training gathers from it."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    model.float()
    parts = []
    for archive, ids in kb_archives:
        lo, hi = shard_range(len(ids), ctx.rank, ctx.world_size)
        local = encode_archive(model, archive, batch_size, device, ids[lo:hi], precision=precision)
        parts.append(gather_rows(torch.from_numpy(local), len(ids), ctx))
    kb_emb = torch.cat(parts).to(device)  # (M, D)
    retrieved = {}
    for kind, (vocab, tok) in vocabs.items():
        prompts = [text for _, text in vocab.prompts]
        lo, hi = shard_range(len(prompts), ctx.rank, ctx.world_size)
        local = encode_texts(model, tok, prompts[lo:hi], batch_size, device, precision=precision)
        concept_emb = gather_rows(torch.from_numpy(local), len(prompts), ctx)  # (C, D)
        retrieved[kind] = retrieve_concept_images(concept_emb.to(device), kb_emb)
    model.to(dtype)
    model.train(was_training)
    return Knowledge(kb_emb, retrieved)
