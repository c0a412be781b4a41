"""Loss terms of FashionKLIP training (spec 3.4): one small module per term, summed in one place.

Notation (spec 3.4): B = per-rank batch, W = world size, N = B*W, S = concept slots per sample,
M = retrieved KB images per slot (10), K = prototypes kept per slot (`top`, 5), D = feature width,
s = exp(logit_scale). Every feature is L2-normalised; features are all-gathered with
`gather_with_grad`, the local rank's rows first, so the targets are always y = arange(N).

`combine` is the only place where the terms are summed; it returns the total and every term by
name as floats for logging (`contrastive_loss`, `concept_loss`, `concept_weight`, `loss`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fklip.distributed import DistContext
from fklip.errors import ConfigError

ConceptWeight = Union[str, float]  # "auto" or a fixed lambda in [0, 1]


def _is_distributed(ctx: Optional[DistContext]) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if ctx is not None and not ctx.distributed:
        return False
    return dist.get_world_size() > 1


def gather_with_grad(x: Tensor, ctx: Optional[DistContext] = None) -> Tensor:
    """All-gather every rank's rows: (B, ...) -> (W*B, ...), the local rows first, then the other
    ranks in rank order (the original's layout). The local block, rows [0, B), keeps its gradient;
    the gathered copies are constants (each rank back-propagates into its own rows, and DDP sums
    the parameter gradients). Identity when not distributed (world size 1, or no process group).

    Every rank must pass the same shape (training uses drop_last); a mismatch raises ValueError on
    every rank instead of hanging in the collective.
    """
    if not _is_distributed(ctx):
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)  # (ndim,)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(other, shape) for other in shapes):
        sizes = ", ".join(f"rank {r}: {tuple(s.tolist())}" for r, s in enumerate(shapes))
        raise ValueError(f"gather_with_grad needs the same shape on every rank ({sizes}); "
                         "use equal per-rank batches (drop_last=True)")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat([x] + parts[:rank] + parts[rank + 1:])  # (W*B, ...)


class ContrastiveLoss(nn.Module):
    """Symmetric CLIP InfoNCE over the gathered batch:

        L_ctr = 1/2 [ CE(s I T^T, y) + CE(s T I^T, y) ],  y = (0, ..., N-1), CE averaged over rows.

    `image_emb`, `text_emb`: (N, D), L2-normalised; `scale`: scalar tensor s = exp(logit_scale).
    """

    def forward(self, image_emb: Tensor, text_emb: Tensor, scale: Tensor) -> Tensor:
        logits = scale * image_emb @ text_emb.t()  # (N, N): rows images, columns texts
        y = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y))


@torch.no_grad()
def select_prototypes(image_emb: Tensor, prototypes: Tensor, top: int = 5,
                      clamp_negative: bool = True) -> tuple[Tensor, Tensor]:
    """The K = `top` prototypes of each (sample, slot) closest to the sample's image, and their
    batch-normalised weights (spec 3.4), both constants:

        sigma_{n,c,m} = <P_{n,c,m}, I_n>;  (pi, v)_{n,c,1..K} = top-K over m, descending (ties: lower m)
        w_{n,c,j} = max(v_{n,c,j}, 0) / sqrt(sum_n' max(v_{n',c,j}, 0)^2),  0 where the norm is 0

    `clamp_negative=False` keeps the sign as the original does: w = v / sqrt(sum_n' v^2), so a
    negative cosine gives a negative weight (still 0 where the norm is 0, NaN in the original).
    `image_emb` (N, D), `prototypes` (N, S, M, D) -> `pi` (N, S, K) int64, `w` (N, S, K).
    """
    dtype = torch.promote_types(prototypes.dtype, torch.float32)
    # in that dtype even under autocast, which would run the einsum in fp16/bf16 and could
    # choose other prototypes than the fp32 step does
    with torch.autocast(image_emb.device.type, enabled=False):
        sim = torch.einsum("nsmd,nd->nsm", prototypes.to(dtype), image_emb.detach().to(dtype))  # (N, S, M)
    v, pi = torch.sort(sim, dim=-1, descending=True, stable=True)
    v, pi = v[..., :top], pi[..., :top]  # (N, S, K)
    if clamp_negative:
        v = v.clamp_min(0)
    norm = v.pow(2).sum(0, keepdim=True).sqrt()  # (1, S, K): L2 over the batch, not over ranks
    w = torch.where(norm > 0, v / norm.clamp_min(1e-30), torch.zeros_like(v))  # (N, S, K)
    return pi, w


class ConceptLoss(nn.Module):
    """Concept-level (knowledge) alignment loss of spec 3.4, with the intended indexing.

    For each slot c, with P_{n,c,m} the constant retrieved KB image features (zeros when empty):

        sigma_{n,c,m} = <P_{n,c,m}, I_n>;  (pi, v)_{n,c,1..K} = top-K of sigma over m, descending
        v <- max(v, 0)                              (spec 6: a negative cosine is no evidence)
        w_{n,c,j} = v_{n,c,j} / sqrt(sum_n' v_{n',c,j}^2)          (L2 over the batch; 0 if 0/0)
        Lambda^{c,j} = s Q^{c,j} T_c^T,  Q^{c,j}_n = P_{n,c,pi_{n,c,j}},  (T_c)_n = t_{n,c}  (N, N)
        CE_w(Z, y) = sum_n w_n l_n / sum_n w_n,  l_n = -log softmax(Z_n)_{y_n}
        alpha_{c,j} = sum_n w_{n,c,j} / sum_{n,j'} w_{n,c,j'}
        L_cpt = 1/|C+| sum_{c in C+} sum_j alpha_{c,j} 1/2 [CE_w(Lambda^{c,j}, y) + CE_w((Lambda^{c,j})^T, y)]

    C+ = the slots with any positive weight in the batch. With every slot filled somewhere this is
    the original's (1/S) sum_c; a slot empty across the whole batch (NaN in the original) is
    dropped, and with no slot left the loss is an exact 0 that still back-propagates.
    By default a negative cosine is clamped to 0: a (sample, slot) whose kept prototypes all have
    negative cosine gets weight 0, as an empty one does, and a slot where that holds for every
    sample is dropped.

    `clamp_negative=False` is the original's arithmetic (spec 3.4): w = v / sqrt(sum_n' v^2) with
    v's sign kept, so negative cosines give negative weights, CE_w and alpha divide by signed sums
    (a column or slot of negative weights alone gives the same CE_w and alpha as their absolute
    values), and C+ = the slots whose weights do not sum to 0. Only the original's divisions by 0
    (NaN) stay guarded: a weight column or slot summing to 0 contributes 0.

    Selection and weights are detached and the prototypes are constants, so the loss trains only
    the concept text features and the scale; the image feature only ranks the prototypes, and
    the image tower gets no gradient from it. Ties in sigma keep the lower m (stable sort).

    `transposed_indexing=True` reproduces the original's bug (spec 6.4): term (c, j) uses the
    logits Lambda^{j,c} with the weights w_{.,c,j} and alpha_{c,j}; it needs S == K.
    `--original-indexing` sets both: `transposed_indexing=True, clamp_negative=False`.
    """

    def __init__(self, top: int = 5, transposed_indexing: bool = False, clamp_negative: bool = True) -> None:
        super().__init__()
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        self.top = top
        self.transposed_indexing = transposed_indexing
        self.clamp_negative = clamp_negative

    def forward(self, image_emb: Tensor, concept_text_emb: Tensor, prototypes: Tensor,
                scale: Tensor) -> Tensor:
        n, s, m, d = prototypes.shape  # (N, S, M, D)
        k = self.top
        if image_emb.shape != (n, d) or concept_text_emb.shape != (n, s, d):
            raise ValueError(f"ConceptLoss shapes disagree: image_emb {tuple(image_emb.shape)}, "
                             f"concept_text_emb {tuple(concept_text_emb.shape)}, prototypes "
                             f"{tuple(prototypes.shape)}; want (N, D), (N, S, D), (N, S, M, D)")
        if k > m:
            raise ValueError(f"ConceptLoss(top={k}) needs at least {k} prototypes per slot, got {m}")
        if self.transposed_indexing and s != k:
            raise ValueError(f"transposed_indexing needs as many slots as kept ranks, got S={s}, top={k}")
        prototypes = prototypes.detach()
        dtype = torch.promote_types(concept_text_emb.dtype, torch.float32)  # softmax in >= fp32
        pi, w = select_prototypes(image_emb, prototypes, k, self.clamp_negative)  # (N, S, K) each, constants
        w = w.permute(1, 2, 0).to(dtype)  # (S, K, N)
        w_sum = w.sum(-1)  # (S, K)
        slot_sum = w_sum.sum(-1)  # (S,)
        # sums of signed weights (clamp_negative=False) may be negative: guard only exact zeros
        active = slot_sum != 0  # (S,)
        alpha = w_sum / torch.where(active, slot_sum, 1).unsqueeze(-1)  # (S, K), 0 on empty slots
        q = prototypes.gather(2, pi.unsqueeze(-1).expand(n, s, k, d))  # (N, S, K, D)
        q = q.to(concept_text_emb.dtype)
        # logits[c, j, a, b] = s <q_{a,c,j}, t_{b,c}>: rows prototypes, columns concept texts
        logits = scale * torch.einsum("acjd,bcd->cjab", q, concept_text_emb)  # (S, K, N, N)
        if self.transposed_indexing:
            logits = logits.transpose(0, 1)  # term (c, j) reads Lambda^{j,c}
        logits = logits.to(dtype)
        loss_rows = -torch.diagonal(logits.log_softmax(-1), dim1=-2, dim2=-1)  # (S, K, N)
        loss_cols = -torch.diagonal(logits.log_softmax(-2), dim1=-2, dim2=-1)  # (S, K, N)
        nonzero = w_sum != 0  # (S, K)
        safe_sum = torch.where(nonzero, w_sum, 1)
        # 0 where w_sum == 0 (also when signed weights cancel: inf or NaN in the original)
        ce_rows = torch.where(nonzero, (w * loss_rows).sum(-1) / safe_sum, 0)  # (S, K)
        ce_cols = torch.where(nonzero, (w * loss_cols).sum(-1) / safe_sum, 0)
        per_slot = (alpha * 0.5 * (ce_rows + ce_cols)).sum(-1)  # (S,)
        # mean over the slots with any weight; inactive slots are 0 (alpha = 0), and with none active
        # the result is an exact 0 still connected to the text features and the scale (no host sync)
        return (per_slot * active).sum() / active.sum().clamp_min(1)


def concept_weight(contrastive: Tensor, concept: Tensor, mode: ConceptWeight = "auto",
                   num_slots: int = 5) -> Tensor:
    """lambda of L = (1 - lambda) L_ctr + lambda L_cpt, a detached scalar tensor.

    "auto": the original's adaptive weight lambda = L_ctr / (num_slots * L_cpt), clamped to [0, 1]
    (spec 6.6: unclamped it can exceed 1 and turn the contrastive weight negative); 0 when
    L_cpt is 0. A number (or a numeric string) in [0, 1] is used as a fixed weight.
    """
    ref = contrastive.detach()
    if isinstance(mode, str) and mode.strip().lower() == "auto":
        ctr, cpt = ref.float(), concept.detach().float()
        lam = torch.where(cpt > 0, ctr / (num_slots * cpt.clamp_min(1e-30)), torch.zeros_like(cpt))
        return lam.clamp(0.0, 1.0).to(ref.dtype)
    try:
        if isinstance(mode, bool):
            raise TypeError
        value = float(mode)
    except (TypeError, ValueError):
        raise ConfigError(f"--concept-loss-weight: expected 'auto' or a number in [0, 1], got {mode!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"--concept-loss-weight: a fixed weight must lie in [0, 1], got {value}")
    return torch.tensor(value, dtype=ref.dtype, device=ref.device)


def combine(terms: Mapping[str, Tensor], weight: ConceptWeight = "auto",
            num_slots: int = 5) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum the named terms: L = (1 - lambda) L_ctr + lambda L_cpt with lambda = `concept_weight(...)`
    when `terms` has "concept_loss", else L = L_ctr. Returns (L, every term, lambda and L as
    detached float32 scalars on L's device: the caller reads them all at once, so that logging
    does not make the host wait for the device once per value).
    """
    if "contrastive_loss" not in terms:
        raise KeyError(f"combine needs a 'contrastive_loss' term, got {sorted(terms)}")
    unknown = set(terms) - {"contrastive_loss", "concept_loss"}
    if unknown:
        raise KeyError(f"combine got unknown loss terms {sorted(unknown)}")
    ctr = terms["contrastive_loss"]
    logged = {"contrastive_loss": ctr}
    if "concept_loss" in terms:
        cpt = terms["concept_loss"]
        lam = concept_weight(ctr, cpt, weight, num_slots)
        total = (1 - lam) * ctr + lam * cpt
        logged.update(concept_loss=cpt, concept_weight=lam)
    else:
        total = ctr
    logged["loss"] = total
    return total, {name: value.detach().float().reshape(()) for name, value in logged.items()}
