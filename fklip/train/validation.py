"""The validation pass after each training epoch: the original's val loss plus recall@1/5/10.

The val loss is the mean InfoNCE over (caption, image) pairs in batches of --batch-size, weighted
by batch size (spec 3.4); recall uses the project's exact top-k over the whole val set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fklip.config import SearchConfig
from fklip.data.archive import ImageArchive
from fklip.data.jsonl import ValQuery, id_key, read_val_queries
from fklip.encode import encode_archive, encode_texts
from fklip.model import ModelSpec, Tokenizer, build_tokenizer
from fklip.predict import gold_from_item_ids, gold_from_queries, score, search


@dataclass
class ValSet:
    queries: list[ValQuery]
    archive: ImageArchive
    tokenizer: Tokenizer


def load_val(val_data: Path, val_img: Path, spec: ModelSpec, stack: contextlib.ExitStack) -> ValSet:
    """The val queries and images, checked; `stack` closes the archive."""
    queries = read_val_queries(val_data)
    archive = stack.enter_context(ImageArchive(val_img))
    archive.require([i for q in queries for i in q.item_ids], str(val_data))
    archive.check_image_size(spec.image_size, spec.name)
    return ValSet(queries, archive, build_tokenizer(spec))


@torch.no_grad()
def evaluate_val(model, val: ValSet, eval_batch_size: int, batch_size: int, device: str) -> dict:
    """{"val_loss", "t2i_r1", ..., "i2t_r10"} with the current weights (eval mode, then back)."""
    was_training = model.training
    model.eval()
    image_emb = torch.from_numpy(encode_archive(model, val.archive, eval_batch_size, device))  # (N, D)
    text_emb = torch.from_numpy(encode_texts(model, val.tokenizer, [q.query_text for q in val.queries],
                                             eval_batch_size, device))                      # (Q, D)
    scale = model.logit_scale.float().exp().cpu()
    model.train(was_training)

    # val loss over (caption, image) pairs, one per item id, in file order
    row_of = {key: i for i, key in enumerate(val.archive.ids)}
    pairs = [(qi, row_of[id_key(item)]) for qi, q in enumerate(val.queries) for item in q.item_ids]
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        img = image_emb[[p[1] for p in chunk]]
        txt = text_emb[[p[0] for p in chunk]]
        logits = scale * img @ txt.T
        labels = torch.arange(len(chunk))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        total += loss.item() * len(chunk)
        count += len(chunk)

    image_keys = list(val.archive.ids)
    text_keys = [id_key(q.query_id) for q in val.queries]
    cfg = SearchConfig(device=device)
    t2i = score(gold_from_queries(val.queries, "val"), text_keys, image_keys, search(text_emb, image_emb, cfg, "val t2i"))
    i2t = score(gold_from_item_ids(val.queries, image_keys, "val"), image_keys, text_keys,
                search(image_emb, text_emb, cfg, "val i2t"))
    out = {"val_loss": total / max(count, 1)}
    for name, result in (("t2i", t2i), ("i2t", i2t)):
        for k, r in result["recall"].items():
            out[f"{name}_r{k}"] = 100.0 * r
    return out
