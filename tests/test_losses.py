"""fklip.losses: every term against a plain formula written out here (loops, float64), forward and
gradient; empty slots; the original's transposed indexing; lambda; all-gather on 2 gloo processes."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fklip.distributed import DistContext
from fklip.errors import ConfigError
from fklip.losses import (
    ConceptLoss,
    ContrastiveLoss,
    combine,
    concept_weight,
    gather_with_grad,
    select_prototypes,
)
from tests.conftest import HANG_S

S, M, D, TOP = 5, 10, 8, 5


def unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def batch(n: int, seed: int = 0):
    """image (N, D), concept texts (N, S, D) and scale as float64 leaves; prototypes (N, S, M, D)."""
    image = unit(n, D, seed=seed).requires_grad_()
    text = unit(n, S, D, seed=seed + 1).requires_grad_()
    protos = unit(n, S, M, D, seed=seed + 2)
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    return image, text, protos, scale


# ---- plain formulas: loops over n, c, j with scalar torch ops ----

def plain_ce(logits: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Row-wise CE with targets y_n = n; the weighted mean sum_n w_n l_n / sum_n w_n (plain mean
    without weights)."""
    n = logits.shape[0]
    weights = weights if weights is not None else [1.0] * n
    losses = [-(logits[i, i] - torch.log(sum(torch.exp(logits[i, b]) for b in range(n)))) for i in range(n)]
    return sum(w * l for w, l in zip(weights, losses)) / sum(weights)


def plain_contrastive(image, text, scale):
    n = image.shape[0]
    logits = torch.stack([torch.stack([scale * torch.dot(image[a], text[b]) for b in range(n)])
                          for a in range(n)])
    return 0.5 * (plain_ce(logits) + plain_ce(logits.t()))


def plain_selection(image, protos, top=TOP, clamp=True):
    """pi[n][c] (top indices, descending, ties to the lower m), w[n][c][j] as Python floats;
    clamp=False keeps negative cosines (the original)."""
    n, s, m, _ = protos.shape
    pi, v = [], []
    for i in range(n):
        pi.append([]), v.append([])
        for c in range(s):
            sims = [float(torch.dot(protos[i, c, k], image[i].detach())) for k in range(m)]
            order = sorted(range(m), key=lambda k: (-sims[k], k))[:top]
            pi[i].append(order)
            v[i].append([max(sims[k], 0.0) if clamp else sims[k] for k in order])
    w = [[[0.0] * top for _ in range(s)] for _ in range(n)]
    for c in range(s):
        for j in range(top):
            norm = math.sqrt(sum(v[i][c][j] ** 2 for i in range(n)))
            for i in range(n):
                w[i][c][j] = v[i][c][j] / norm if norm > 0 else 0.0
    return pi, w


def plain_concept(image, text, protos, scale, top=TOP, clamp=True):
    """The intended formula of spec 3.4; slots with no weight at all are left out of the mean."""
    n, s = text.shape[:2]
    pi, w = plain_selection(image, protos, top, clamp)
    total, active = 0.0, 0
    for c in range(s):
        slot_weight = sum(w[i][c][j] for i in range(n) for j in range(top))
        if slot_weight == 0:
            continue
        active += 1
        for j in range(top):
            col = [w[i][c][j] for i in range(n)]
            if sum(col) == 0:
                continue
            alpha = sum(col) / slot_weight
            logits = torch.stack([torch.stack([scale * torch.dot(protos[a, c, pi[a][c][j]], text[b, c])
                                               for b in range(n)]) for a in range(n)])
            total = total + alpha * 0.5 * (plain_ce(logits, col) + plain_ce(logits.t(), col))
    return total / active if active else text.sum() * 0.0


def original_transposed(image, text, protos, scale, top=TOP):
    """The original's get_loss, restated literally: the top cosines with their sign, each rank's
    column divided by its L2 norm over the batch, logits built as [rank j][slot c] and read as
    [c][j], CE weighted by sum_n w_n l_n / sum_n w_n, alpha = column sum / slot sum, then / S.
    No guards: where the original divides by 0 this gives NaN too."""
    n, s = text.shape[:2]
    pi, w = plain_selection(image, protos, top, clamp=False)
    built = []
    for j in range(top):
        row = []
        for c in range(s):
            q = torch.stack([protos[a, c, pi[a][c][j]] for a in range(n)])  # (N, D)
            row.append(scale * q @ text[:, c].t())
        built.append(row)
    total = 0.0
    for c in range(s):
        slot_weight = sum(w[i][c][j] for i in range(n) for j in range(top))
        for j in range(top):
            col = [w[i][c][j] for i in range(n)]
            logits = built[c][j]  # the bug: should be built[j][c]
            total = total + sum(col) / slot_weight * 0.5 * (plain_ce(logits, col) + plain_ce(logits.t(), col))
    return total / s


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


# ---- ContrastiveLoss ----

@pytest.mark.parametrize("n", [4, 6])
def test_contrastive_matches_plain_formula_and_numpy(n):
    image, text, _, scale = batch(n, seed=n)
    text2 = unit(n, D, seed=99).requires_grad_()
    got = ContrastiveLoss()(image, text2, scale)
    want = plain_contrastive(image, text2, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and an independent float64 numpy statement of the value
    logits = scale.item() * image.detach().numpy() @ text2.detach().numpy().T
    lse_rows = np.log(np.exp(logits).sum(1))
    lse_cols = np.log(np.exp(logits).sum(0))
    ref = 0.5 * (np.mean(lse_rows - np.diag(logits)) + np.mean(lse_cols - np.diag(logits)))
    assert abs(got.item() - ref) < 1e-12
    for g, w in zip(grads(got, image, text2, scale), grads(want, image, text2, scale)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---- ConceptLoss: intended indexing ----

def zero_some_prototypes(protos: torch.Tensor) -> torch.Tensor:
    protos = protos.clone()
    protos[0, 2] = 0  # sample 0, slot 2: an unknown concept (all 10 prototypes zero)
    protos[1, :, 7:] = 0  # sample 1: only 7 prototypes retrieved in every slot
    protos[3, 4, ::2] = 0
    return protos


@pytest.mark.parametrize("n,partial", [(4, False), (5, True), (6, True)])
def test_concept_matches_plain_formula_forward_and_gradient(n, partial):
    image, text, protos, scale = batch(n, seed=10 + n)
    if partial:
        protos = zero_some_prototypes(protos)
    got = ConceptLoss()(image, text, protos, scale)
    want = plain_concept(image, text, protos, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_text, g_scale = grads(got, text, scale)
    w_text, w_scale = grads(want, text, scale)
    torch.testing.assert_close(g_text, w_text, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_scale, w_scale, rtol=1e-10, atol=1e-12)
    assert g_text.abs().sum() > 0 and g_scale != 0


def test_concept_gradcheck():
    image, text, protos, scale = batch(4, seed=3)
    loss = ConceptLoss()
    assert torch.autograd.gradcheck(lambda t, s: loss(image.detach(), t, protos, s), (text, scale))


def test_concept_gives_the_image_tower_no_gradient():
    image, text, protos, scale = batch(5, seed=4)
    tower = torch.nn.Linear(D, D, dtype=torch.float64)  # stands in for the image tower
    image_emb = F.normalize(tower(image.detach()), dim=-1)
    ConceptLoss()(image_emb, text, protos, scale).backward()
    assert all(p.grad is None for p in tower.parameters())
    assert text.grad is not None and scale.grad is not None
    # whereas the contrastive term does reach it
    ContrastiveLoss()(image_emb, text[:, 0], scale).backward()
    assert tower.weight.grad.abs().sum() > 0


def test_selection_excludes_zero_and_negative_prototypes():
    image, text, protos, scale = batch(5, seed=5)
    protos = zero_some_prototypes(protos)
    protos[2, 1] = -image[2].detach().expand(M, D)  # every prototype points away: cosine -1
    pi, w = select_prototypes(image, protos, TOP)
    assert pi.shape == w.shape == (5, S, TOP) and not w.requires_grad
    assert torch.all(w[0, 2] == 0) and torch.all(w[2, 1] == 0)  # no evidence, no weight
    assert torch.all(w >= 0)
    want_pi, want_w = plain_selection(image, protos)
    assert pi.tolist() == want_pi
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=torch.float64))
    # each (slot, rank) column has unit L2 norm over the batch
    torch.testing.assert_close(w.norm(dim=0), torch.ones(S, TOP, dtype=torch.float64))
    # an excluded row: sample 0's slot-2 text only acts as a negative column, so the loss matches
    # the plain formula, which skips weight-0 rows explicitly
    torch.testing.assert_close(ConceptLoss()(image, text, protos, scale),
                               plain_concept(image, text, protos, scale), rtol=1e-12, atol=1e-12)
    # the original's weights keep the sign: cosine -1 everywhere gives negative weights
    pi_signed, w_signed = select_prototypes(image, protos, TOP, clamp_negative=False)
    assert torch.equal(pi_signed, pi) and torch.all(w_signed[2, 1] < 0) and torch.all(w_signed[0, 2] == 0)
    want_pi, want_w = plain_selection(image, protos, clamp=False)
    assert pi_signed.tolist() == want_pi
    torch.testing.assert_close(w_signed, torch.tensor(want_w, dtype=torch.float64))
    torch.testing.assert_close(w_signed.norm(dim=0), torch.ones(S, TOP, dtype=torch.float64))


def test_slot_empty_for_every_sample_is_dropped_not_nan():
    image, text, protos, scale = batch(6, seed=6)
    protos[:, 3] = 0  # slot 3 is empty across the whole batch (NaN in the original)
    loss = ConceptLoss()(image, text, protos, scale)
    g_text, g_scale = grads(loss, text, scale)
    assert torch.isfinite(loss) and torch.isfinite(g_text).all() and torch.isfinite(g_scale)
    assert torch.all(g_text[:, 3] == 0)
    want = plain_concept(image, text, protos, scale)  # mean over the 4 slots that remain
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    # the same as the mean over the other slots computed separately
    keep = [0, 1, 2, 4]
    sub = ConceptLoss()(image, text[:, keep], protos[:, keep], scale)
    torch.testing.assert_close(loss, sub, rtol=1e-12, atol=1e-12)


def test_all_slots_empty_gives_zero_with_a_graph():
    image, text, protos, scale = batch(4, seed=7)
    loss = ConceptLoss()(image, text, torch.zeros_like(protos), scale)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(text.grad == 0) and scale.grad == 0
    # negative cosines everywhere are no evidence either
    text.grad = None
    loss = ConceptLoss()(image, text, -image.detach()[:, None, None, :].expand(4, S, M, D), scale)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(text.grad).all()


# ---- ConceptLoss: the original's transposed indexing ----

def pointing_away(image: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """(N, m, D) unit prototypes, each with a distinct negative cosine to its sample's image."""
    gen = torch.Generator().manual_seed(seed)
    image = image.detach()
    noise = torch.randn(image.shape[0], m, D, generator=gen, dtype=torch.float64)
    noise = noise - (noise @ image[:, :, None]) * image[:, None, :]  # orthogonal to the image
    away = torch.rand(image.shape[0], m, 1, generator=gen, dtype=torch.float64) + 0.2
    return F.normalize(noise - away * image[:, None, :], dim=-1)


def test_transposed_indexing_reproduces_the_original_and_differs_from_intended():
    image, text, protos, scale = batch(5, seed=8)
    bugged = ConceptLoss(transposed_indexing=True, clamp_negative=False)(image, text, protos, scale)
    literal = original_transposed(image, text, protos, scale)
    torch.testing.assert_close(bugged, literal, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(bugged, text, scale), grads(literal, text, scale)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    intended = ConceptLoss()(image, text, protos, scale)
    assert abs(bugged.item() - intended.item()) > 1e-4


def test_original_weights_reproduce_the_original_on_negative_cosines():
    """What --original-indexing runs (transposed, signed weights) against the literal original, on
    a batch where every prototype of slot 1 has a negative cosine for every sample (the original
    weighs that slot by |cosine|; fklip's clamp drops it) and sample 2's slot 3 has only negative
    ones (negative weights beside positive ones in the same columns)."""
    image, text, protos, scale = batch(5, seed=12)
    protos[:, 1] = pointing_away(image, M, seed=13)
    protos[2, 3] = pointing_away(image, M, seed=14)[2]
    _, w = select_prototypes(image, protos, TOP, clamp_negative=False)
    assert torch.all(w[:, 1] < 0) and torch.all(w[2, 3] < 0) and torch.all(w[[0, 1, 3, 4], 3, 0] > 0)
    original = ConceptLoss(transposed_indexing=True, clamp_negative=False)(image, text, protos, scale)
    literal = original_transposed(image, text, protos, scale)
    assert torch.isfinite(literal)
    torch.testing.assert_close(original, literal, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(original, text, scale), grads(literal, text, scale)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the signed weights with the intended indexing, against the plain formula without the clamp
    signed = ConceptLoss(clamp_negative=False)(image, text, protos, scale)
    plain = plain_concept(image, text, protos, scale, clamp=False)
    torch.testing.assert_close(signed, plain, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(signed, text, scale), grads(plain, text, scale)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # fklip's default clamps: slot 1 has no weight and leaves the mean, so the values differ
    clamped = ConceptLoss(transposed_indexing=True)(image, text, protos, scale)
    assert abs(clamped.item() - original.item()) > 1e-4
    assert torch.all(grads(ConceptLoss()(image, text, protos, scale), text)[0][:, 1] == 0)


def test_transposed_indexing_needs_square_slots_and_ranks():
    image, text, protos, scale = batch(4, seed=9)
    with pytest.raises(ValueError, match="transposed_indexing"):
        ConceptLoss(top=4, transposed_indexing=True)(image, text, protos, scale)
    with pytest.raises(ValueError, match="shapes disagree"):
        ConceptLoss()(image[:3], text, protos, scale)


# ---- lambda and the sum ----

def t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("ctr,cpt,want", [(1.0, 1.0, 0.2), (1.0, 0.1, 1.0), (2.0, 0.5, 0.8),
                                          (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)])
def test_auto_weight_is_clamped(ctr, cpt, want):
    assert concept_weight(t(ctr), t(cpt), "auto").item() == pytest.approx(want)


def test_auto_weight_uses_the_number_of_slots_and_is_detached():
    ctr, cpt = t(1.0).requires_grad_(), t(0.5).requires_grad_()
    lam = concept_weight(ctr, cpt, "auto", num_slots=10)
    assert lam.item() == pytest.approx(0.2) and not lam.requires_grad


@pytest.mark.parametrize("mode,want", [(0.0, 0.0), (0.3, 0.3), (1, 1.0), ("0.25", 0.25)])
def test_fixed_weight(mode, want):
    assert concept_weight(t(1.0), t(0.01), mode).item() == pytest.approx(want)


@pytest.mark.parametrize("mode", [-0.1, 1.5, float("nan"), "abc", True, None])
def test_bad_weight_is_a_config_error(mode):
    with pytest.raises(ConfigError, match="concept-loss-weight"):
        concept_weight(t(1.0), t(1.0), mode)


def test_combine_sums_in_one_place_and_logs_every_term():
    ctr, cpt = t(2.0).requires_grad_(), t(1.0).requires_grad_()
    total, logged = combine({"contrastive_loss": ctr, "concept_loss": cpt}, "auto")
    lam = 2.0 / 5.0
    assert total.item() == pytest.approx((1 - lam) * 2.0 + lam * 1.0)
    # detached scalars, read by the caller in one go
    assert all(isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad for v in logged.values())
    assert {k: v.item() for k, v in logged.items()} == pytest.approx(
        {"contrastive_loss": 2.0, "concept_loss": 1.0, "concept_weight": lam, "loss": total.item()})
    total.backward()
    assert ctr.grad.item() == pytest.approx(1 - lam) and cpt.grad.item() == pytest.approx(lam)
    total, logged = combine({"contrastive_loss": ctr}, 0.5)
    assert total is ctr and set(logged) == {"contrastive_loss", "loss"}
    with pytest.raises(KeyError):
        combine({"concept_loss": cpt})
    with pytest.raises(KeyError):
        combine({"contrastive_loss": ctr, "kb_loss": cpt})


# ---- all-gather ----

def test_gather_is_identity_without_distribution():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_with_grad(x, DistContext()) is x
    assert gather_with_grad(x, DistContext(rank=0, world_size=2)) is x  # no process group


B = 3


def _worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2, timeout=timedelta(seconds=HANG_S))
    try:
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank)
        mine = slice(rank * B, (rank + 1) * B)
        res: dict = {}
        # layout: local rows first; gathered copies carry no gradient
        x = (torch.arange(2 * B * 2, dtype=torch.float64).view(2 * B, 2)[mine]).clone().requires_grad_()
        gathered = gather_with_grad(x, ctx)
        res["layout"] = gathered.detach().clone()
        (gathered[B:] * 3).sum().backward(retain_graph=True)
        res["grad_from_copies"] = x.grad.clone()
        x.grad = None
        (gathered[:B] * 3).sum().backward()
        res["grad_from_local"] = x.grad.clone()
        # ContrastiveLoss on 2 x B rows, float32 and float64
        for dtype in (torch.float32, torch.float64):
            image, text = unit(2 * B, D, seed=20).to(dtype), unit(2 * B, D, seed=21).to(dtype)
            image, text = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
            scale = torch.tensor(7.5, dtype=dtype, requires_grad=True)
            loss = ContrastiveLoss()(gather_with_grad(image, ctx), gather_with_grad(text, ctx), scale)
            loss.backward()
            res[f"ctr_{dtype}"] = (loss.detach(), image.grad, text.grad, scale.grad)
        # ConceptLoss with every input gathered
        image, text, protos, scale = batch(2 * B, seed=30)
        image_l, text_l = image.detach()[mine], text.detach()[mine].clone().requires_grad_()
        loss = ConceptLoss()(gather_with_grad(image_l, ctx), gather_with_grad(text_l, ctx),
                             gather_with_grad(protos[mine], ctx), scale)
        loss.backward()
        res["cpt"] = (loss.detach(), text_l.grad, scale.grad)
        # unequal batches raise on every rank instead of hanging
        try:
            gather_with_grad(torch.zeros(B + rank, D), ctx)
        except ValueError as exc:
            res["unequal"] = str(exc)
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("gloo")
    procs = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_S
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the 2-process gloo workers did not finish within {HANG_S} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_gather_layout_and_gradient_on_two_ranks(two_ranks):
    rows = torch.arange(2 * B * 2, dtype=torch.float64).view(2 * B, 2)
    torch.testing.assert_close(two_ranks[0]["layout"], rows)
    torch.testing.assert_close(two_ranks[1]["layout"], torch.cat([rows[B:], rows[:B]]))  # local first
    for res in two_ranks:
        assert torch.all(res["grad_from_copies"] == 0)
        assert torch.all(res["grad_from_local"] == 3)
        assert "same shape on every rank" in res["unequal"] and "drop_last" in res["unequal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_on_two_ranks_equals_one_process_with_the_doubled_batch(two_ranks, dtype):
    image = unit(2 * B, D, seed=20).to(dtype).requires_grad_()
    text = unit(2 * B, D, seed=21).to(dtype).requires_grad_()
    scale = torch.tensor(7.5, dtype=dtype, requires_grad=True)
    loss = ContrastiveLoss()(image, text, scale)
    loss.backward()
    for rank, res in enumerate(two_ranks):
        got, g_image, g_text, g_scale = res[f"ctr_{dtype}"]
        mine = slice(rank * B, (rank + 1) * B)
        assert abs(got.item() - loss.item()) < 1e-6
        # each rank back-propagates into its own rows exactly the full-batch gradient
        torch.testing.assert_close(g_image, image.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_text, text.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_scale, scale.grad, rtol=1e-5, atol=1e-6)


def test_concept_on_two_ranks_equals_one_process_with_the_doubled_batch(two_ranks):
    image, text, protos, scale = batch(2 * B, seed=30)
    loss = ConceptLoss()(image, text, protos, scale)
    loss.backward()
    for rank, (got, g_text, g_scale) in enumerate(two_ranks[r]["cpt"] for r in range(2)):
        torch.testing.assert_close(got, loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_text, text.grad[rank * B:(rank + 1) * B], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_scale, scale.grad, rtol=1e-10, atol=1e-12)


def test_prototype_selection_ignores_autocast():
    """Under autocast the einsum would run in bf16 (fp16 on CUDA) and near-equal similarities
    would rank differently: the selection is computed in float32 whatever the context."""
    from fklip.losses import select_prototypes

    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(16, 64, generator=gen), dim=-1)
    # 20 prototypes per slot, 1e-4 apart in cosine: bf16 (8 bits of mantissa) cannot tell them apart
    base = F.normalize(torch.randn(16, 3, 1, 64, generator=gen), dim=-1)
    protos = F.normalize(base + 1e-4 * torch.randn(16, 3, 20, 64, generator=gen), dim=-1)
    want = select_prototypes(image, protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = select_prototypes(image, protos)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
