"""`fklip bench`: images/s and texts/s of each engine and precision, and exact top-k queries/s,
each as a ratio to plain PyTorch measured in the same run.

* Baseline: open_clip as users run it. On the CPU, eager fp32 `model.encode_image` /
  `model.encode_text` over the full 77-token context + F.normalize; on CUDA the same under
  `torch.autocast("cuda", dtype=torch.float16)`. Inputs start as numpy arrays in host memory and
  embeddings end there, for the baseline and every engine alike.
* Engines: the runners of engines/ (torch on the checkpoint; onnx and trt on exports made into a
  temporary folder with `export.pipeline.run_export` and removed afterwards), one per precision.
* Cosines: per sample, against open_clip's fp32 embeddings (the CPU baseline's own; on CUDA one
  untimed fp32 pass).
* Top-k: `fklip.retrieval.topk_chunked` against `torch.mm` + `torch.topk` per chunk
  (`engines.measure.bench_topk`), values compared.

What is measured and how is in engines/measure.py and fklip/timing.py; the scripts in
benchmarks/ call the same functions.

Engines asked for with --engine that cannot run here raise before any slow work; engines left to
the defaults that cannot run, and engine/precision pairs that do not exist, are listed as skipped.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engines.base import build_runner
from engines.measure import (
    Backend,
    bench_topk,
    build_inputs,
    make_exports,
    measure,
    open_clip_backend,
    summary,
    token_lengths,
)
from export.onnx_export import require_onnx
from export.trt import require_tensorrt
from fklip.config import ENGINES, BenchConfig, EncodeConfig, bench_combo_problem
from fklip.data.archive import pixels_from_normalized
from fklip.errors import ConfigError, FklipError, MissingDependencyError
from fklip.model import (
    ModelSpec,
    build_model,
    build_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from fklip.timing import environment

logger = logging.getLogger(__name__)

BASELINES = {"cpu": "open_clip eager fp32", "cuda": "open_clip autocast fp16"}
TOPK_DIM = 512
MAX_UNIQUE = 1024  # demo images and captions drawn; more are repeats
TOWERS = {"images": "image", "texts": "text"}


def require_engine(engine: str, device: str) -> None:
    """Raise the error that stops `engine` from running on `device` (one line naming what to install)."""
    cuda = device.startswith("cuda")
    if engine == "onnx":

        _, ort = require_onnx()
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError(f"--engine onnx --device {device}: this onnxruntime ({ort.__version__}) "
                                         'has no CUDA provider: pip install "fklip[gpu]"')
    elif engine == "trt":
        if not cuda:
            raise ConfigError("--engine trt: TensorRT runs on a CUDA device; pass --device cuda")

        require_tensorrt()


def plan_bench(cfg: BenchConfig) -> tuple[list[tuple[str, str]], list[dict]]:
    """The (engine, precision) pairs to measure, and the skipped ones with the reason. Engines
    named by --engine must run here (else their error is raised); default ones are skipped."""
    runs, skipped = [], []
    for engine in cfg.engines or ENGINES:
        try:
            require_engine(engine, cfg.device)
        except FklipError as e:
            if cfg.engines:
                raise
            skipped.append({"engine": engine, "precision": None, "reason": str(e)})  # every precision
            continue
        for precision in cfg.precisions:
            problem = bench_combo_problem(engine, precision, cfg.device)
            if problem is None:
                runs.append((engine, precision))
            else:
                skipped.append({"engine": engine, "precision": precision, "reason": problem})
    if not runs:
        raise ConfigError(f"--precision {' '.join(cfg.precisions)}: no engine here runs it ("
                          + "; ".join(f"{_label(s)}: {s['reason']}" for s in skipped) + ")")
    return runs, skipped


def _label(skip: dict) -> str:
    return skip["engine"] if skip["precision"] is None else f"{skip['engine']} {skip['precision']}"


def _runner_config(engine: str, precision: str, cfg: BenchConfig, ckpt: Path, folders: dict[str, Path]
                   ) -> EncodeConfig:
    if engine == "torch":
        return EncodeConfig("torch", checkpoint=ckpt, precision=precision, device=cfg.device, threads=cfg.threads,
                            **torch_options(cfg, precision))
    if engine == "onnx" and precision == "int8":
        return EncodeConfig("onnx", engine_dir=folders["int8"], int8=True, device=cfg.device, threads=cfg.threads)
    return EncodeConfig(engine, engine_dir=folders[precision], precision=precision, device=cfg.device,
                        threads=cfg.threads)


def torch_options(cfg: BenchConfig, precision: str) -> dict:
    """The torch engine's options for one precision: --fused does not apply to amp (autocast)."""
    return {"fused": cfg.fused and precision != "amp", "cuda_graphs": cfg.cuda_graphs, "compile": cfg.compile}


def _model(cfg: BenchConfig):
    """(open_clip model in fp32 on the CPU, its ModelSpec): the checkpoint's, or seeded random weights."""

    if cfg.checkpoint is not None:
        loaded = load_checkpoint(cfg.checkpoint, model_name=cfg.model, trust=cfg.trust_checkpoint)
        return loaded.model, loaded.spec
    spec = ModelSpec.from_name(cfg.model_name)
    torch.manual_seed(cfg.seed)
    return build_model(spec), spec


def _inputs(spec, cfg: BenchConfig, cuda: bool) -> dict[str, np.ndarray]:
    """Demo garments and captions: CLIP-normalised float32 (N, 3, S, S) on the CPU; uint8 (N, S, S, 3)
    pixels for CUDA (normalised on the device, a quarter of the bytes to copy). At most
    MAX_UNIQUE of each are drawn, then repeated (drawing is ~7 ms an image at 224 px)."""

    pixels, ids, _ = build_inputs(spec.image_size, build_tokenizer(spec), min(cfg.images, MAX_UNIQUE),
                                  min(cfg.texts, MAX_UNIQUE), cfg.seed)
    if cuda:
        pixels = pixels_from_normalized(pixels)
    return {"images": np.resize(pixels, (cfg.images, *pixels.shape[1:])),  # rows repeated cyclically
            "texts": np.resize(ids, (cfg.texts, ids.shape[1]))}


def _figures(summary_rows: dict) -> dict:
    """summary()'s flat rows -> {tower: {"baseline": figures, engine: {precision: figures}}}."""
    results: dict = {"image": {}, "text": {}}
    for name, row in summary_rows.items():
        for modality, tower in TOWERS.items():
            entry = {"items_per_s": row[f"{modality}_per_s"], "x": row[f"{modality}_x"],
                     "min_cos": row[f"{modality}_min_cos"], "mean_cos": row[f"{modality}_mean_cos"],
                     "seconds": row[f"{modality}_s"], "other_cpu": row[f"{modality}_other_cpu"]}
            if name == "baseline":
                results[tower]["baseline"] = entry
            else:
                engine, precision = name.split()
                results[tower].setdefault(engine, {})[precision] = entry
    return results


def run_bench(cfg: BenchConfig, command: str | None = None) -> dict:
    """Measure what `cfg` selects; returns the result (see `format_table` and the JSON line)."""

    runs, skipped = plan_bench(cfg)  # before any slow work
    cuda = cfg.device.startswith("cuda")
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tmp = Path(tempfile.mkdtemp(prefix="fklip-bench-"))
    try:
        started = time.perf_counter()
        model, spec = _model(cfg)
        ckpt = tmp / "model.pt"  # what the runners and exports read: a self-describing fklip checkpoint
        save_checkpoint(ckpt, model, spec)
        inputs = _inputs(spec, cfg, cuda)
        folders, facts = make_exports(
            ckpt, tmp, sorted({p for e, p in runs if e == "onnx" and p != "int8"}), int8=("onnx", "int8") in runs,
            trt=sorted({p for e, p in runs if e == "trt"}), batch=cfg.batch, uint8_input=cuda)
        if ("onnx", "int8") in runs and "int8" not in folders:
            runs.remove(("onnx", "int8"))
            skipped.append({"engine": "onnx", "precision": "int8", "reason": facts["int8_export_error"]})
        model = model.to(cfg.device).eval()
        encoding = "uint8_hwc" if cuda else "float32_chw"
        backends = [open_clip_backend(model, cfg.device, autocast=cuda, image_encoding=encoding)]
        reference = None
        if cuda:  # cosines against open_clip fp32: one untimed pass
            fp32 = open_clip_backend(model, cfg.device, image_encoding=encoding)
            reference = {m: np.concatenate([fp32.encoder(m)(x[i:i + cfg.batch]) for i in range(0, len(x), cfg.batch)])
                         for m, x in inputs.items()}
        with contextlib.ExitStack() as stack:
            for engine, precision in runs:
                runner = stack.enter_context(build_runner(_runner_config(engine, precision, cfg, ckpt, folders)))
                backends.append(Backend(f"{engine} {precision}", runner.encode_images, runner.encode_texts,
                                        # every shape compiled / captured before timing
                                        full_warmup=engine == "torch" and (cfg.compile or cfg.cuda_graphs)))
            facts["setup_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            logger.info("measuring %s against %s: %s", spec.name, BASELINES["cuda" if cuda else "cpu"],
                        ", ".join(b.name for b in backends[1:]))
            measure(backends, inputs, cfg.batch, cfg.repeats)
            facts["measure_s"] = round(time.perf_counter() - started, 1)
        results = _figures(summary(backends, {m: len(x) for m, x in inputs.items()}, reference))
        del backends, model
        topk = bench_topk(cfg.topk_queries, cfg.topk_gallery, TOPK_DIM, cfg.k, cfg.repeats, cfg.device,
                          torch.float16 if cuda else torch.float32, cfg.seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(previous_threads)

    return {"benchmark": "fklip bench", "model": spec.name,
            "weights": str(cfg.checkpoint) if cfg.checkpoint is not None else f"random (seed {cfg.seed})",
            "device": cfg.device, "n_images": cfg.images, "n_texts": cfg.texts, "image_size": spec.image_size,
            "image_input": encoding, "text_tokens": token_lengths(inputs["texts"]), "batch": cfg.batch,
            "repeats": cfg.repeats,
            "baseline": {"name": BASELINES["cuda" if cuda else "cpu"],
                         "images_per_s": results["image"]["baseline"]["items_per_s"],
                         "texts_per_s": results["text"]["baseline"]["items_per_s"]},
            "torch_engine": {p: torch_options(cfg, p) for e, p in runs if e == "torch"},
            "results": results, "skipped": skipped, "topk": topk, "setup": facts,
            "environment": environment(cfg.device, cfg.threads, command)}


def format_table(result: dict) -> str:
    """The human-readable report: one row per backend, the skipped pairs, the top-k figures."""
    env, tokens, w = result["environment"], result["text_tokens"], 34
    where = env["gpu"] or f"{env['cpu']} ({env['cpus']} CPUs, {env['torch_threads']} threads)"
    lines = [(f"{result['model']}, weights {result['weights']}; {result['n_images']} demo images "
              f"({result['image_size']} px), {result['n_texts']} demo captions ({tokens['min']}-{tokens['max']} "
              f"tokens); batch {result['batch']}; median of {result['repeats']}; {result['device']}: {where}"),
             *([f"torch engine options: {result['torch_engine']}"] if result["torch_engine"] else []),
             (f"{'backend':<{w}}{'images/s':>10}{'x':>7}{'min cos':>10}{'texts/s':>10}{'x':>7}{'min cos':>10}"
              f"{'other':>7}")]
    image, text = result["results"]["image"], result["results"]["text"]
    rows = [(f"{result['baseline']['name']} (baseline)", image["baseline"], text["baseline"])]
    rows += [(f"{engine} {precision}", figures, text[engine][precision])
             for engine, by_precision in image.items() if engine != "baseline"
             for precision, figures in by_precision.items()]
    for name, i, t in rows:
        lines.append(f"{name:<{w}}{i['items_per_s']:>10.2f}{i['x']:>7.2f}{i['min_cos']:>10.6f}"
                     f"{t['items_per_s']:>10.2f}{t['x']:>7.2f}{t['min_cos']:>10.6f}"
                     f"{max(i['other_cpu'], t['other_cpu']):>7.0%}")
    lines += [f"{_label(s):<{w}}skipped: {s['reason']}" for s in result["skipped"]]
    k = result["topk"]
    lines += [f"exact top-{k['k']}: {k['queries']:,} queries x {k['gallery']:,} gallery x {k['dim']} ({k['dtype']})",
              f"{'variant':<{w}}{'queries/s':>10}{'x':>7}",
              f"{'torch.mm + torch.topk (baseline)':<{w}}{k['plain_queries_per_s']:>10.1f}{1:>7.2f}",
              f"{'fklip topk_chunked (' + k['fklip_method'] + ')':<{w}}{k['fklip_queries_per_s']:>10.1f}"
              f"{k['x']:>7.2f}   values "
              + ("equal" if k["values_equal"] else f"DIFFER (max {k['values_max_abs_diff']:.3g})"),
              ("x: against the baseline in this run; min cos: per sample against open_clip's fp32 "
               "embeddings; other: the largest share of the CPUs other processes used during a run")]
    return "\n".join(lines)
