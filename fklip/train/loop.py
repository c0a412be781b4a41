"""`fklip train`: FashionKLIP knowledge-injected training (spec 3), top to bottom.

One process, or one per device under torchrun: W processes with batch B follow the trajectory of
one process with batch W*B (`fklip.train.step`). `_train` takes the starting weights and claims the
run folder; `_train_in` checks the data, then runs the epochs: the knowledge refresh, the steps,
the validation pass and the checkpoint. Every file and archive the run opens is closed on any exit.
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

import torch
import torch.distributed as dist
from tqdm import tqdm

from fklip.background import in_background
from fklip.config import TrainConfig, check_device
from fklip.data.archive import ImageArchive, model_input_from_batch
from fklip.data.jsonl import read_train_queries
from fklip.distributed import DistContext, process_group
from fklip.errors import ConfigError, FklipError
from fklip.knowledge import (
    Knowledge,
    RowLookup,
    load_knowledge_inputs,
    refresh_knowledge,
)
from fklip.losses import ConceptLoss, ContrastiveLoss
from fklip.model import (
    ModelSpec,
    build_model,
    build_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from fklip.runner import autocast, prepare_model
from fklip.schedule import build_optimizer, cosine_lr
from fklip.train.data import Batch, TrainSet
from fklip.train.run_log import RunLog
from fklip.train.step import ConceptInputs, Objective, train_step
from fklip.train.validation import evaluate_val, load_val

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
    check_device(ctx.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, spec, resume_state = _starting_weights(cfg)
    name = resume_state["name"] if resume_state else run_name(cfg)
    run_dir = cfg.logs / name
    # the run folder is claimed before the slow work (rank 0 writes it); every file it opens and
    # every archive is closed on any exit
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(RunLog(run_dir if ctx.is_main else None, resuming=resume_state is not None,
                                         overwrite=cfg.overwrite, report_to=cfg.report_to,
                                         inputs=_input_files(cfg)))
        return _train_in(cfg, ctx, stop_after, stack, log, model, spec, resume_state, name, run_dir)


def _train_in(cfg: TrainConfig, ctx: DistContext, stop_after: int | None, stack: contextlib.ExitStack,
              log: RunLog, model, spec: ModelSpec, resume_state: dict | None, name: str,
              run_dir: Path) -> dict | None:
    device = ctx.device
    # ---- data, checked before any slow work
    queries = read_train_queries(cfg.train_data)
    archive = stack.enter_context(ImageArchive(cfg.train_img))
    archive.require([i for q in queries for i in q.item_ids], str(cfg.train_data))
    archive.check_image_size(spec.image_size, spec.name)
    tokenizer = build_tokenizer(spec)
    vocabs, tables, kb_archives, concepts = {}, {}, [], None
    if cfg.is_concept:
        vocabs, tables, kb_archives = load_knowledge_inputs(queries, _vocabulary_files(cfg), cfg.img_data_sets,
                                                            tokenizer, spec, stack)
        concepts = ConceptInputs(tokenizer, {kind: RowLookup(vocab.rows, device)
                                             for kind, (vocab, _) in vocabs.items()})
    train_set = TrainSet(queries, archive, tokenizer, tables)
    batches = train_set.batches_per_epoch(cfg.batch_size, ctx.world_size)
    if batches == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {ctx.world_size} processes is larger than "
                          f"the {len(train_set)} training samples of {cfg.train_data}")
    val = load_val(cfg.val_data, cfg.val_img, spec, stack) if cfg.val_data is not None else None

    # ---- model, optimiser, loss terms; a resumed run's state
    model = prepare_model(model, device, cfg.precision).train()  # bf16/fp16 cast the weights
    optimizer = build_optimizer(model, cfg.lr, cfg.wd)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
    step_autocast = autocast(cfg.precision, device)
    # --original-indexing: the original's concept loss, its transposition and its signed weights
    objective = Objective(
        contrastive=ContrastiveLoss(),
        concept=(ConceptLoss(transposed_indexing=cfg.original_indexing, clamp_negative=not cfg.original_indexing)
                 if cfg.is_concept else None),
        weight=cfg.concept_loss_weight if cfg.concept_loss_weight == "auto" else float(cfg.concept_loss_weight))
    total_steps, start_epoch, knowledge = batches * cfg.epochs, 0, None
    if resume_state is not None:
        start_epoch, knowledge = _restore(resume_state, optimizer, scaler, device)
    if ctx.is_main:
        log.start(_params(cfg, spec, ctx.world_size, len(train_set), batches))
        _report_concepts(vocabs, tables)

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

        # ---- the epoch's steps
        model.train()
        t_epoch, step_starts = time.perf_counter(), []
        indices = train_set.epoch_batches(epoch, cfg.seed, cfg.batch_size, ctx.rank, ctx.world_size)
        ahead = cfg.workers > 0 or device.startswith("cuda")
        with tqdm(total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                  disable=not ctx.is_main) as bar, _batches_read(train_set, indices, device, ahead) as ready:
            for i, batch in enumerate(ready):
                t_step, step = time.perf_counter(), epoch * batches + i
                step_starts.append(t_step)
                lr = cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
                images = model_input_from_batch(batch.images, archive.encoding, device=device,
                                                dtype=next(model.parameters()).dtype)
                logged = train_step(model, optimizer, scaler, images, batch, lr, objective, concepts, knowledge,
                                    autocast=step_autocast, grad_clip=cfg.grad_clip, ctx=ctx, device=device)
                # A non-finite loss is caught here, after its update: it stops the run all the same,
                # before any checkpoint is written.
                if not math.isfinite(logged["loss"]):
                    raise TrainingError(_non_finite_message(logged["loss"], epoch, i, log.last_checkpoint(),
                                                            run_dir))
                samples_per_s = cfg.batch_size * ctx.world_size / (time.perf_counter() - t_step)
                logged.update(lr=lr, samples_per_s=samples_per_s)
                log.log({f"train/{k}": v for k, v in logged.items()}, step)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", samples_s=f"{samples_per_s:.0f}")
                bar.update(1)

        # ---- validation, checkpoint, metrics
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


# ---------------------------------------------------------------- the run's set-up and bookkeeping


def _starting_weights(cfg: TrainConfig) -> tuple[torch.nn.Module, ModelSpec, dict | None]:
    """A training checkpoint to resume (with its train state), pretrained weights, or random ones."""
    if cfg.resume is None and cfg.openai_pretrained is None:
        spec = ModelSpec.from_name(cfg.model, cfg.truncation)
        return build_model(spec), spec, None
    ckpt = load_checkpoint(cfg.resume or cfg.openai_pretrained, model_name=cfg.model,
                           truncation=None, trust=cfg.trust_checkpoint)
    resume_state = ckpt.extra.get("train_state") if cfg.resume is not None else None
    if resume_state is None:  # pretrained weights start a new run: no inherited epoch count
        return ckpt.model, ModelSpec(ckpt.spec.name, ckpt.spec.config, cfg.truncation), None
    return ckpt.model, ckpt.spec, resume_state


def _input_files(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """(flag, path) of every input file: --overwrite never removes a folder that holds one."""
    return [(flag, p) for flag, value in (
        ("--train-data", cfg.train_data), ("--train-img", cfg.train_img), ("--val-data", cfg.val_data),
        ("--val-img", cfg.val_img), ("--txt-id-filename", cfg.txt_id_filename),
        ("--kb-txt-id-filename", cfg.kb_txt_id_filename), ("--concept-data", cfg.concept_data),
        ("--kb-concept-data", cfg.kb_concept_data), ("--concept-fathers", cfg.concept_fathers),
        ("--kb-concept-fathers", cfg.kb_concept_fathers), ("--img-data-sets", cfg.img_data_sets),
        ("--resume", cfg.resume), ("--openai-pretrained", cfg.openai_pretrained))
        for p in (value if isinstance(value, tuple) else (value,)) if p is not None]


def _vocabulary_files(cfg: TrainConfig) -> dict[str, tuple[Path, Path | None]]:
    """kind -> (concept queries file, fathers file) of the vocabularies the flags switch on."""
    files = {}
    if cfg.is_data_concept:
        files["data"] = (cfg.txt_id_filename or cfg.concept_data, cfg.concept_fathers)
    if cfg.use_kb_concepts:
        files["kb"] = (cfg.kb_txt_id_filename or cfg.kb_concept_data, cfg.kb_concept_fathers)
    return files


def _restore(state: dict, optimizer, scaler, device: str) -> tuple[int, Knowledge | None]:
    """Load a resumed run's optimiser, scaler and random state; return its epoch and the retrieval
    it saved (None when it refreshes every epoch)."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    saved = state.get("knowledge")
    return int(state["epoch"]), (Knowledge(**saved).to(device) if saved is not None else None)


def _params(cfg: TrainConfig, spec: ModelSpec, world_size: int, samples: int, batches: int) -> dict:
    """params.json: the resolved configuration, and what the run derived from it."""
    params = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(cfg).items()}
    params.update(model_name=spec.name, truncation=spec.truncation, world_size=world_size,
                  samples=samples, batches_per_epoch=batches)
    return params


def _report_concepts(vocabs: dict, tables: dict) -> None:
    """Each vocabulary's and concept table's coverage, once per run (never per step)."""
    for kind, (vocab, _) in vocabs.items():
        table = tables[kind]
        level = logging.WARNING if table.unknown or table.dropped or table.no_concepts else logging.INFO
        logger.log(level, "%s", vocab.summary())
        logger.log(level, "%s", table.summary())


def _non_finite_message(loss: float, epoch: int, step: int, last: Path | None, run_dir: Path) -> str:
    """What a non-finite loss means for the run folder, and what to do next."""
    where = f"the loss is {loss} at epoch {epoch + 1}, step {step + 1}; stopping"
    if last is not None:
        return (f"{where}. The last good checkpoint {last} is left as it was: continue from it with --resume "
                f"{last} and a lower --lr, --grad-clip, or --precision fp32")
    return (f"{where}, before the first checkpoint; {run_dir} keeps the logs of this attempt. Start again "
            "with --overwrite (or another --name) and a lower --lr, --grad-clip, or --precision fp32")


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


def _save(run_dir: Path, model, spec: ModelSpec, state: dict, epoch: int, cfg: TrainConfig) -> None:
    """epoch_N.pt every --save-frequency epochs and at the end; epoch_latest.pt with --save-most-recent."""
    folder = run_dir / "checkpoints"
    extra = {"train_state": state}
    if epoch % cfg.save_frequency == 0 or epoch == cfg.epochs:
        save_checkpoint(folder / f"epoch_{epoch}.pt", model, spec, epoch=epoch, name=state["name"], extra=extra)
    if cfg.save_most_recent:
        save_checkpoint(folder / "epoch_latest.pt", model, spec, epoch=epoch, name=state["name"], extra=extra)
