"""One optimisation step of `fklip train` (spec 3.4, 3.5), top to bottom, and the pieces it calls.

Features are gathered across ranks for both losses (local rows first, carrying the gradient) and
gradients are summed across ranks, so W processes with batch B follow the trajectory of one
process with batch W*B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fklip.distributed import DistContext
from fklip.knowledge import Knowledge, RowLookup, prototype_features
from fklip.losses import (
    ConceptLoss,
    ConceptWeight,
    ContrastiveLoss,
    combine,
    gather_with_grad,
)
from fklip.model import Tokenizer, encode_text_trimmed
from fklip.schedule import clamp_logit_scale, set_lr
from fklip.train.data import Batch


@dataclass(frozen=True)
class Objective:
    """The run's loss terms and how `combine` weighs them: no `concept` trains contrastive only."""

    contrastive: ContrastiveLoss
    concept: ConceptLoss | None
    weight: ConceptWeight              # "auto" or a fixed lambda in [0, 1]


@dataclass(frozen=True)
class ConceptInputs:
    """What the concept loss reads besides the batch: the tokenizer of the slot prompts, and each
    vocabulary's id -> row lookup into the retrieved images (on the training device)."""

    tokenizer: Tokenizer
    lookups: dict[str, RowLookup]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               images: torch.Tensor, batch: Batch, lr: float, objective: Objective,
               concepts: ConceptInputs | None, knowledge: Knowledge | None, *, autocast, grad_clip: float | None,
               ctx: DistContext, device: str) -> dict[str, float]:
    """One step on this rank's `batch` (`images` its model input on `device`): forward, the named
    loss terms summed once, backward, gradients summed over ranks, update. Returns the logged
    values by name: the terms and the total from `combine`, and the scale exp(logit_scale)."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        image_emb = F.normalize(model.encode_image(images).float(), dim=-1)                      # (B, D)
        text_emb = F.normalize(encode_text_trimmed(model, batch.tokens, device).float(), dim=-1)  # (B, D)
        scale = model.logit_scale.float().exp()
        all_image_emb = gather_with_grad(image_emb, ctx)  # (N, D), gathered once for both terms
        terms = {"contrastive_loss": objective.contrastive(all_image_emb, gather_with_grad(text_emb, ctx), scale)}
        if objective.concept is not None:
            concept_emb = encode_prompts(model, concepts.tokenizer, batch.concept_prompts, device)  # (B, S, D)
            protos = prototypes(knowledge, concepts.lookups, batch, device)                         # (B, S, M, D)
            terms["concept_loss"] = objective.concept(all_image_emb, gather_with_grad(concept_emb, ctx),
                                                      gather_with_grad(protos, ctx), scale)
    loss, terms_now = combine(terms, objective.weight)
    (scaler.scale(loss) if scaler else loss).backward()
    sum_gradients(model, ctx)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model)

    # One read from the device per step, after all of it is queued: the loss terms and the scale
    # together (a float() or .item() per value would stop the host mid-step).
    return dict(zip([*terms_now, "scale"], torch.stack([*terms_now.values(), scale.detach()]).tolist()))


# ---------------------------------------------------------------- the pieces the step calls


def sum_gradients(model: torch.nn.Module, ctx: DistContext) -> None:
    """Sum gradients over ranks: every rank's loss is the global one, each rank holds the gradient
    through its own rows, so the sum is the gradient of the global batch. One flat all-reduce."""
    if not ctx.distributed:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def encode_prompts(model, tokenizer: Tokenizer, prompts: list[list[str]], device: str) -> torch.Tensor:
    """(B, S, D) normalised features of every sample's concept prompts. Each distinct prompt of the
    batch is encoded once (many slots share "a photo of" or a concept): same values, same gradient."""
    unique = list(dict.fromkeys(p for row in prompts for p in row))
    index = {p: i for i, p in enumerate(unique)}
    emb = F.normalize(encode_text_trimmed(model, tokenizer(unique), device).float(), dim=-1)  # (U, D)
    rows = torch.tensor([[index[p] for p in row] for row in prompts]).to(emb.device, non_blocking=True)  # (B, S)
    return emb[rows]


def prototypes(knowledge: Knowledge, lookups: dict[str, RowLookup], batch: Batch, device: str) -> torch.Tensor:
    """(B, S, M, D) retrieved KB image features of each slot's concept; zeros for empty slots."""
    parts, start = [], 0
    kinds = batch.concept_kind
    for kind in dict.fromkeys(kinds):
        width = kinds.count(kind)
        ids = batch.concept_ids[:, start:start + width]
        parts.append(prototype_features(ids, lookups[kind], knowledge.retrieved[kind], knowledge.kb_emb))
        start += width
    return torch.cat(parts, dim=1).to(device)
