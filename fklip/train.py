"""`fklip train`: FashionKLIP knowledge-injected training (spec 3), top to bottom.

One process, or one per device under torchrun. Features are gathered across ranks for both
losses (local rows first, carrying the gradient) and gradients are summed across ranks, so W
processes with batch B follow the trajectory of one process with batch W*B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fklip.background import in_background
from fklip.config import TrainConfig, check_device
from fklip.distributed import DistContext, process_group
from fklip.errors import ConfigError, FklipError
from fklip.knowledge import Knowledge, load_knowledge_inputs, refresh_knowledge
from fklip.run_log import RunLog

if TYPE_CHECKING:
    from fklip.train_data import Batch, TrainSet

logger = logging.getLogger(__name__)


class TrainingError(FklipError):
    """Training cannot go on (a NaN loss): the last good checkpoint is left as it was."""


def run_train(cfg: TrainConfig, stop_after: int | None = None) -> dict | None:
    """Train; rank 0 returns a summary. `stop_after` ends this invocation after that many epochs."""
    with process_group(cfg.device) as ctx:
        return _train(cfg, ctx, stop_after)


def run_name(cfg: TrainConfig) -> str:
    return cfg.name or f"{cfg.model.replace('/', '-')}_lr={cfg.lr}_wd={cfg.wd}_b={cfg.batch_size}"


def _train(cfg: TrainConfig, ctx: DistContext, stop_after: int | None) -> dict | None:
    from fklip.model import ModelSpec, build_model, load_checkpoint

    check_device(ctx.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # ---- starting weights: a training checkpoint to resume, pretrained weights, or random
    resume_state = None
    if cfg.resume is not None or cfg.openai_pretrained is not None:
        ckpt = load_checkpoint(cfg.resume or cfg.openai_pretrained, model_name=cfg.model,
                               truncation=None, trust=cfg.trust_checkpoint)
        model, spec = ckpt.model, ckpt.spec
        resume_state = ckpt.extra.get("train_state") if cfg.resume is not None else None
        if resume_state is None:  # pretrained weights start a new run: no inherited epoch count
            spec = ModelSpec(spec.name, spec.config, cfg.truncation)
    else:
        spec = ModelSpec.from_name(cfg.model, cfg.truncation)
        model = build_model(spec)
    name = resume_state["name"] if resume_state else run_name(cfg)
    run_dir = cfg.logs / name
    inputs = [(flag, p) for flag, value in (
        ("--train-data", cfg.train_data), ("--train-img", cfg.train_img), ("--val-data", cfg.val_data),
        ("--val-img", cfg.val_img), ("--txt-id-filename", cfg.txt_id_filename),
        ("--kb-txt-id-filename", cfg.kb_txt_id_filename), ("--concept-data", cfg.concept_data),
        ("--kb-concept-data", cfg.kb_concept_data), ("--concept-fathers", cfg.concept_fathers),
        ("--kb-concept-fathers", cfg.kb_concept_fathers), ("--img-data-sets", cfg.img_data_sets),
        ("--resume", cfg.resume), ("--openai-pretrained", cfg.openai_pretrained))
        for p in (value if isinstance(value, tuple) else (value,)) if p is not None]
    # the run folder is claimed before the slow work (rank 0 writes it); every file it opens and
    # every archive is closed on any exit
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(RunLog(run_dir if ctx.is_main else None, resuming=resume_state is not None,
                                         overwrite=cfg.overwrite, report_to=cfg.report_to, inputs=inputs))
        return _train_in(cfg, ctx, stop_after, stack, log, model, spec, resume_state, name, run_dir)


def _train_in(cfg: TrainConfig, ctx: DistContext, stop_after: int | None, stack: contextlib.ExitStack,
              log: RunLog, model, spec, resume_state: dict | None, name: str, run_dir: Path) -> dict | None:
    from tqdm import tqdm

    from fklip.data.archive import ImageArchive, model_input_from_batch
    from fklip.data.jsonl import read_train_queries
    from fklip.encode import prepare_model
    from fklip.losses import ConceptLoss, ContrastiveLoss, combine, gather_with_grad
    from fklip.model import build_tokenizer, encode_text_trimmed
    from fklip.schedule import build_optimizer, clamp_logit_scale, cosine_lr, set_lr
    from fklip.train_data import TrainSet
    from fklip.train_eval import evaluate_val, load_val

    device = ctx.device
    # ---- data, checked before any slow work
    queries = read_train_queries(cfg.train_data)
    archive = stack.enter_context(ImageArchive(cfg.train_img))
    archive.require([i for q in queries for i in q.item_ids], str(cfg.train_data))
    archive.check_image_size(spec.image_size, spec.name)
    tokenizer = build_tokenizer(spec)
    vocabs, tables, kb_archives, lookups = {}, {}, [], {}
    if cfg.is_concept:
        from fklip.knowledge import RowLookup

        vocabs, tables, kb_archives = load_knowledge_inputs(queries, _vocabulary_files(cfg), cfg.img_data_sets,
                                                            tokenizer, spec, stack)
        lookups = {kind: RowLookup(vocab.rows, device) for kind, (vocab, _) in vocabs.items()}
    train_set = TrainSet(queries, archive, tokenizer, tables)
    batches = train_set.batches_per_epoch(cfg.batch_size, ctx.world_size)
    if batches == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {ctx.world_size} processes is larger than "
                          f"the {len(train_set)} training samples of {cfg.train_data}")
    val = load_val(cfg.val_data, cfg.val_img, spec) if cfg.val_data is not None else None

    model = prepare_model(model, device, cfg.precision).train()  # bf16/fp16 cast the weights
    optimizer = build_optimizer(model, cfg.lr, cfg.wd)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
    autocast = _autocast(cfg.precision, device)
    # --original-indexing: the original's concept loss, its transposition and its signed weights
    contrastive = ContrastiveLoss()
    concept = ConceptLoss(transposed_indexing=cfg.original_indexing, clamp_negative=not cfg.original_indexing)
    weight_mode = cfg.concept_loss_weight if cfg.concept_loss_weight == "auto" else float(cfg.concept_loss_weight)
    total_steps, start_epoch, knowledge = batches * cfg.epochs, 0, None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = int(resume_state["epoch"])
        torch.set_rng_state(resume_state["torch_rng"])
        if resume_state.get("knowledge") is not None:
            knowledge = Knowledge(**resume_state["knowledge"]).to(device)

    if ctx.is_main:
        params = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(cfg).items()}
        params.update(model_name=spec.name, truncation=spec.truncation, world_size=ctx.world_size,
                      samples=len(train_set), batches_per_epoch=batches)
        log.start(params)
        if cfg.is_concept:
            for kind, (vocab, _) in vocabs.items():  # reported once here, never per step
                table = tables[kind]
                level = logging.WARNING if table.unknown or table.dropped or table.no_concepts else logging.INFO
                logger.log(level, "%s", vocab.summary())
                logger.log(level, "%s", table.summary())

    history = []
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    note = None
    if start_epoch >= cfg.epochs:
        note = (f"nothing to train: {cfg.resume} finished epoch {start_epoch} of --epochs {cfg.epochs}; pass a "
                "larger --epochs to train further (the learning-rate schedule then spans the new count)")
    for epoch in range(start_epoch, last_epoch):
        # ---- knowledge: encode the KB and the concept prompts, retrieve 20, keep 10 by MMR
        if cfg.is_concept and (cfg.is_update or knowledge is None):
            t0 = time.perf_counter()
            knowledge = refresh_knowledge(model, kb_archives, vocabs, ctx, cfg.eval_batch_size, device,
                                          cfg.knowledge_precision)
            log.log({"knowledge/refresh_s": time.perf_counter() - t0}, epoch * batches)

        model.train()
        bar = tqdm(total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not ctx.is_main)
        t_epoch = time.perf_counter()
        step_starts = []
        indices = train_set.epoch_batches(epoch, cfg.seed, cfg.batch_size, ctx.rank, ctx.world_size)
        with _batches_read(train_set, indices, device, ahead=cfg.workers > 0 or device.startswith("cuda")) as ready:
            for i, batch in enumerate(ready):
                t_step, step = time.perf_counter(), epoch * batches + i
                step_starts.append(t_step)
                lr = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
                set_lr(optimizer, lr)
                images = model_input_from_batch(batch.images, archive.encoding, device=device,
                                                dtype=next(model.parameters()).dtype)
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    image_emb = F.normalize(model.encode_image(images).float(), dim=-1)          # (B, D)
                    text_emb = F.normalize(encode_text_trimmed(model, batch.tokens, device).float(), dim=-1)
                    scale = model.logit_scale.float().exp()
                    all_image_emb = gather_with_grad(image_emb, ctx)  # (N, D), gathered once for both terms
                    terms = {"contrastive_loss": contrastive(all_image_emb, gather_with_grad(text_emb, ctx), scale)}
                    if cfg.is_concept:
                        concept_emb = _encode_prompts(model, tokenizer, batch.concept_prompts, device)  # (B, S, D)
                        protos = _prototypes(knowledge, lookups, batch, device)                      # (B, S, M, D)
                        terms["concept_loss"] = concept(all_image_emb,
                                                        gather_with_grad(concept_emb, ctx),
                                                        gather_with_grad(protos, ctx), scale)
                loss, terms_now = combine(terms, weight_mode)
                (scaler.scale(loss) if scaler else loss).backward()
                _sum_gradients(model, ctx)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                clamp_logit_scale(model)

                # One read from the device per step, after all of it is queued: the loss terms and
                # the scale together (a float() or .item() per value would stop the host mid-step).
                # A non-finite loss is caught here, after its update: it stops the run all the same,
                # before any checkpoint is written.
                logged = dict(zip([*terms_now, "scale"], torch.stack([*terms_now.values(), scale.detach()]).tolist()))
                if not math.isfinite(logged["loss"]):
                    raise TrainingError(_non_finite_message(logged["loss"], epoch, i, log.last_checkpoint(),
                                                            run_dir))
                samples_per_s = cfg.batch_size * ctx.world_size / (time.perf_counter() - t_step)
                logged.update(lr=lr, samples_per_s=samples_per_s)
                log.log({f"train/{k}": v for k, v in logged.items()}, step)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", samples_s=f"{samples_per_s:.0f}")
                bar.update(1)
        bar.close()

        record = {"epoch": epoch + 1, "loss": logged["loss"], "epoch_s": time.perf_counter() - t_epoch,
                  "step_s_median": _steady_step_s(step_starts, time.perf_counter())}
        if val is not None and ctx.is_main:
            record.update(evaluate_val(model, val, cfg.eval_batch_size, cfg.batch_size, device))
            log.log({f"val/{k.removeprefix('val_')}": v for k, v in record.items()
                     if k == "val_loss" or k.startswith(("t2i_", "i2t_"))}, (epoch + 1) * batches)
        history.append(record)
        if ctx.is_main:
            logger.info("epoch %d: %s", epoch + 1, json.dumps(record))
            state = {"name": name, "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None, "torch_rng": torch.get_rng_state(),
                     "knowledge": (None if cfg.is_update or knowledge is None
                                   else dataclasses.asdict(knowledge.to("cpu")))}
            _save(run_dir, model, spec, state, epoch + 1, cfg)
            log.epoch(record)
        if ctx.distributed:
            dist.barrier()
    return {"run_dir": str(run_dir), "epochs": history, "note": note} if ctx.is_main else None


# ---------------------------------------------------------------- the pieces the loop calls


def _autocast(precision: str, device: str):
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "amp":
        return torch.autocast(device_type, dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _non_finite_message(loss: float, epoch: int, step: int, last: Path | None, run_dir: Path) -> str:
    """What a non-finite loss means for the run folder, and what to do next."""
    where = f"the loss is {loss} at epoch {epoch + 1}, step {step + 1}; stopping"
    if last is not None:
        return (f"{where}. The last good checkpoint {last} is left as it was: continue from it with --resume "
                f"{last} and a lower --lr, --grad-clip, or --precision fp32")
    return (f"{where}, before the first checkpoint; {run_dir} keeps the logs of this attempt. Start again "
            "with --overwrite (or another --name) and a lower --lr, --grad-clip, or --precision fp32")


def _sum_gradients(model: torch.nn.Module, ctx: DistContext) -> None:
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


def _batches_read(train_set: TrainSet, indices, device: str, ahead: bool):
    """The epoch's batches. With `ahead` (CUDA, or --workers > 0) a background thread reads them,
    two ahead of the step, so reading overlaps the device's work; on CUDA into pinned memory,
    so that the step's copy to the device is asynchronous."""
    pin = device.startswith("cuda")

    def read(rows: list[int]) -> Batch:
        if not pin:
            return train_set.batch(rows)
        pixels = train_set.archive.empty_pinned(len(rows))
        return dataclasses.replace(train_set.batch(rows, out=pixels.numpy()), images=pixels)

    return in_background(map(read, indices), enabled=ahead)


def _steady_step_s(starts: list[float], end: float) -> float | None:
    """The median step time of an epoch from its steps' start times, the first step left out
    (it pays for warm-up: cuDNN/cuBLAS choices, allocator growth, compilation). Start to start,
    so the device work a step queues without waiting for it is counted in the step that waits."""
    spans = [b - a for a, b in zip(starts, [*starts[1:], end])][1:]
    return statistics.median(spans) if spans else None


def _encode_prompts(model, tokenizer, prompts: list[list[str]], device: str) -> torch.Tensor:
    """(B, S, D) normalised features of every sample's concept prompts. Each distinct prompt of the
    batch is encoded once (many slots share "a photo of" or a concept): same values, same gradient."""
    from fklip.model import encode_text_trimmed

    unique = list(dict.fromkeys(p for row in prompts for p in row))
    index = {p: i for i, p in enumerate(unique)}
    emb = F.normalize(encode_text_trimmed(model, tokenizer(unique), device).float(), dim=-1)  # (U, D)
    rows = torch.tensor([[index[p] for p in row] for row in prompts]).to(emb.device, non_blocking=True)  # (B, S)
    return emb[rows]


def _prototypes(knowledge: Knowledge, lookups: dict, batch, device: str) -> torch.Tensor:
    """(B, S, M, D) retrieved KB image features of each slot's concept; zeros for empty slots."""
    from fklip.knowledge import prototype_features

    parts, start = [], 0
    kinds = batch.concept_kind
    for kind in dict.fromkeys(kinds):
        width = kinds.count(kind)
        ids = batch.concept_ids[:, start:start + width]
        parts.append(prototype_features(ids, lookups[kind], knowledge.retrieved[kind], knowledge.kb_emb))
        start += width
    return torch.cat(parts, dim=1).to(device)


def _vocabulary_files(cfg: TrainConfig) -> dict[str, tuple[Path, Path | None]]:
    """kind -> (concept queries file, fathers file) of the vocabularies the flags switch on."""
    files = {}
    if cfg.is_data_concept:
        files["data"] = (cfg.txt_id_filename or cfg.concept_data, cfg.concept_fathers)
    if cfg.use_kb_concepts:
        files["kb"] = (cfg.kb_txt_id_filename or cfg.kb_concept_data, cfg.kb_concept_fathers)
    return files


def _save(run_dir: Path, model, spec, state: dict, epoch: int, cfg: TrainConfig) -> None:
    """epoch_N.pt every --save-frequency epochs and at the end; epoch_latest.pt with --save-most-recent."""
    from fklip.model import save_checkpoint

    folder = run_dir / "checkpoints"
    extra = {"train_state": state}
    if epoch % cfg.save_frequency == 0 or epoch == cfg.epochs:
        save_checkpoint(folder / f"epoch_{epoch}.pt", model, spec, epoch=epoch, name=state["name"], extra=extra)
    if cfg.save_most_recent:
        save_checkpoint(folder / "epoch_latest.pt", model, spec, epoch=epoch, name=state["name"], extra=extra)
