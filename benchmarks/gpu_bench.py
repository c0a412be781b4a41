"""Issue 6's GPU figures, each against plain open_clip/PyTorch measured in the same run.

    python benchmarks/gpu_bench.py [--sections image text topk eval train] [--json-out PATH]
    python benchmarks/gpu_bench.py --device cpu --small      # a dry run of every section here

Run by benchmarks/gpu.sh on a lent H100/H200 (nothing is downloaded). ViT-B-32 with random
weights (seeded). Every variant is warmed up (compiles, graph captures, autotuning) and then
timed --repeats times after a device synchronisation; figures are medians. Sections:

* image: images/s end to end from a uint8 archive in host memory (read, copy, normalisation
  included), batch --image-batch: open_clip under fp16 autocast (the baseline), open_clip with
  fp16 weights, and fklip's torch engine (`--fused` towers, fp16/bf16, CUDA graphs; with
  --compile-engines also compiled), with each one's min cosine to open_clip fp32;
* text: texts/s from token ids, batch --text-batch, for FashionGen-like captions and for concept
  prompts: open_clip autocast fp16 over 77 positions (the baseline) against the engine (captions
  grouped by length, each batch cut after its last end token), and the fused tower at full
  length against cut (the same tower): the speed-up of cutting, and the largest difference;
* topk: Q x N fp16 features (d 512, k 10): the matmul alone, torch.mm + torch.topk per chunk
  (the baseline), fklip's torch path and the fused Triton kernel (a few tile configurations);
  results checked against `topk_reference` on grid features (exact scores, many ties);
* eval: `fklip eval` as a subprocess on a FashionGen-val-sized set (--eval-size images and
  captions, uint8 archive), loading included: the fast flags, and plain --precision amp; the
  baseline is open_clip under autocast plus torch.topk both ways in this process, model loaded;
* train: `refresh_knowledge` (the KB images and concept prompts encoded, top-20, MMR) on
  --kb-size images, against open_clip under autocast encoding the same images and prompts; the
  median warm training step on ViT-B-32 with and without the concept loss.

Prints a table per section, then one JSON line. A section that fails reports its error in the
JSON and the others still run; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("gpu_bench")


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median seconds of `repeats` calls (each synchronised, `fklip.bench.timed`) after `warmup`
    calls, and the last result."""
    from fklip.bench import timed as timed_once

    out = [fn() for _ in range(warmup)]
    seconds = [timed_once(lambda: out.append(fn()), device)[0] for _ in range(repeats)]
    return statistics.median(seconds), out[-1]


def min_cosine(got, ref) -> float:
    from engines.measure import cosines

    return round(float(cosines(np.asarray(got), np.asarray(ref)).min()), 6)


def table(title: str, rows: dict[str, dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'':<46}" + "".join(f"{c:>16}" for c in columns))
    for name, row in rows.items():
        print(f"{name:<46}" + "".join(f"{row.get(c, ''):>16}" if not isinstance(row.get(c), float)
                                      else f"{row[c]:>16.4g}" for c in columns))


# ---- inputs


def random_model(name: str, folder: Path):
    """A seeded random-weight model (fp32, eval, CPU) and its fklip checkpoint."""
    from fklip.model import ModelSpec, build_model, save_checkpoint

    spec = ModelSpec.from_name(name)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    ckpt = folder / f"{name}.pt"
    save_checkpoint(ckpt, model, spec)
    return spec, model, ckpt


def write_uint8_archive(path: Path, n: int, size: int, pool: int = 256) -> list[str]:
    """n uint8 (size, size, 3) images: a pool of random ones, repeated, each with its number
    written into its first pixels so that no two are equal (repeated images would give tied
    features, and every row of a search would take top-k's tie path). Content does not change
    the speed of a tower."""
    from fklip.data.archive import ArchiveWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(min(pool, n), size, size, 3), dtype=np.uint8)
    ids = [str(100000 + i) for i in range(n)]
    with ArchiveWriter(path) as w:
        for i, image_id in enumerate(ids):
            image = images[i % len(images)]
            image[0, :4] = np.frombuffer(i.to_bytes(12, "little"), np.uint8).reshape(4, 3)  # in place
            w.add(image_id, image)
    return ids


def fashiongen_like_captions(n: int, seed: int = 0) -> list[str]:
    """Demo captions joined to FashionGen's length: descriptions of 2 to 5 sentences (most of
    them 25 to 60 tokens, some cut at 77)."""
    from fklip.data.demo_dataset import caption_and_phrases, sample_garment

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts = [caption_and_phrases(sample_garment(rng), rng)[0] for _ in range(int(rng.integers(2, 6)))]
        out.append(". ".join(parts) + ".")
    return out


def concept_prompts(n: int) -> list[str]:
    """"a photo of <concept>" over the demo vocabularies, repeated to n."""
    from fklip.data.demo_dataset import build_vocabularies

    data_vocab, kb_vocab = build_vocabularies()
    concepts = sorted(set(data_vocab) | set(kb_vocab))
    return [f"a photo of {concepts[i % len(concepts)]}" for i in range(n)]


# ---- image and text towers


def _open_clip(model, device: str, autocast: bool):
    """`fklip bench`'s baseline (engines.measure.open_clip_backend): open_clip as users run it,
    uint8 pixels normalised on the device, fp16 autocast on CUDA (the CPU dry run runs fp32)."""
    from engines.measure import open_clip_backend

    return open_clip_backend(model, device, autocast=autocast and device.startswith("cuda"),
                             image_encoding="uint8_hwc")


def openclip_image_pass(model, archive, ids: list, batch: int, device: str, autocast: bool) -> np.ndarray:
    """What an open_clip user runs: read a batch from the archive, copy it, normalise, encode."""
    encode = _open_clip(model, device, autocast).encode_images
    return np.concatenate([encode(archive.read_batch(ids[i:i + batch])) for i in range(0, len(ids), batch)])


def openclip_text_pass(model, ids: np.ndarray, batch: int, device: str, autocast: bool) -> np.ndarray:
    """open_clip's encode_text over the full context, as users run it."""
    from engines.measure import encode_all

    return encode_all(_open_clip(model, device, autocast).encode_texts, ids, batch)


def engine_variants(ckpt: Path, device: str, compiled: bool = False) -> dict:
    from engines.base import RunnerConfig

    if not device.startswith("cuda"):  # the dry run: fp32, no graphs
        return {"fklip fused fp32": RunnerConfig("torch", checkpoint=ckpt, fused=True),
                "fklip open_clip modules fp32": RunnerConfig("torch", checkpoint=ckpt)}
    out = {"fklip fused fp16 + CUDA graphs": RunnerConfig("torch", checkpoint=ckpt, device=device, precision="fp16",
                                                          fused=True, cuda_graphs=True),
           "fklip fused bf16 + CUDA graphs": RunnerConfig("torch", checkpoint=ckpt, device=device, precision="bf16",
                                                          fused=True, cuda_graphs=True)}
    if compiled:  # --compile-engines: inductor's first compile of ViT-B-32 takes a minute or more
        out["fklip fused fp16 + compile + CUDA graphs"] = RunnerConfig(
            "torch", checkpoint=ckpt, device=device, precision="fp16", fused=True, compile=True, cuda_graphs=True)
    return out


def image_section(args, tmp: Path) -> dict:
    from engines import pipeline
    from fklip.data.archive import ImageArchive

    spec, model, ckpt = random_model(args.model, tmp)
    path = tmp / "images.npz"
    ids = write_uint8_archive(path, args.images, spec.image_size)
    device, rows = args.device, {}
    with ImageArchive(path) as archive:
        ref = openclip_image_pass(model.to(device), archive, ids[:256], 64, device, autocast=False)
        baselines = {"open_clip autocast fp16 (baseline)": (model, True)}
        if device.startswith("cuda"):
            baselines["open_clip fp16 weights"] = (_half_copy(model), False)
            if args.compile_baselines:
                baselines["open_clip fp16 weights + torch.compile"] = (_compiled_half_copy(model), False)
        for name, (m, autocast) in baselines.items():
            run = (lambda m=m, a=autocast: openclip_image_pass(m, archive, ids, args.image_batch, device, a))
            rows[name] = _guarded(lambda run=run: _measure(run, len(ids), ref, device, args.repeats))
        model.cpu()
        for name, cfg in engine_variants(ckpt, device, args.compile_engines).items():
            rows[name] = _engine_row(cfg, lambda r: pipeline.encode_archive(r, archive, args.image_batch, image_ids=ids),
                                     len(ids), ref, device, args.repeats)
    _ratios(rows, "items_per_s")
    table(f"images/s, {args.model}, {len(ids)} uint8 images from an archive in host memory, batch "
          f"{args.image_batch}", rows, ["items_per_s", "x", "min_cos", "seconds"])
    return {"n": len(ids), "batch": args.image_batch, "rows": rows, "target_images_per_s": 50_000}


def _half_copy(model):
    import copy

    return copy.deepcopy(model).half()


def _compiled_half_copy(model):
    m = _half_copy(model)
    m.encode_image = torch.compile(m.encode_image)
    return m


def _measure(run: Callable, n: int, ref: np.ndarray, device: str, repeats: int) -> dict:
    seconds, out = timed(run, device, repeats)
    return {"items_per_s": round(n / seconds, 1), "seconds": round(seconds, 4), "min_cos": min_cosine(out[:len(ref)], ref)}


def _guarded(measure: Callable[[], dict]) -> dict:
    """One row measured, or the error that stopped it: the section's other rows still run."""
    try:
        return measure()
    except Exception as e:  # a failing row is reported in the JSON, not fatal
        logger.exception("a measurement failed")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _engine_row(cfg, run: Callable, n: int, ref: np.ndarray, device: str, repeats: int) -> dict:
    """One engine variant measured, or the error that stopped it (the other variants still run)."""
    from engines.base import build_runner

    def measure() -> dict:
        with build_runner(cfg) as runner:
            return _measure(lambda: run(runner), n, ref, device, repeats)

    return _guarded(measure)


def _ratios(rows: dict, key: str, lower_is_better: bool = False) -> None:
    """Each row's `x` against the first row (the baseline), where both have `key`."""
    base = next(iter(rows.values())).get(key)
    if not base:
        return
    for row in rows.values():
        if key in row:
            row["x"] = round(base / row[key] if lower_is_better else row[key] / base, 3)


def text_section(args, tmp: Path) -> dict:
    from engines import pipeline
    from fklip.model import build_tokenizer

    spec, model, ckpt = random_model(args.model, tmp)
    tokenizer = build_tokenizer(spec)
    device, result = args.device, {}
    model.to(device)
    for kind, texts in (("captions", fashiongen_like_captions(args.texts)), ("concept prompts", concept_prompts(args.texts))):
        ids = tokenizer(texts).numpy()  # (N, 77)
        lengths = ids.argmax(1) + 1
        ref = openclip_text_pass(model, ids[:512], 128, device, autocast=False)
        rows = {"open_clip autocast fp16, 77 positions (baseline)": _guarded(
                lambda i=ids, ref=ref: _measure(lambda: openclip_text_pass(model, i, args.text_batch, device, True),
                                                len(i), ref, device, args.repeats))}
        for name, cfg in engine_variants(ckpt, device).items():
            rows[name + ", cut, grouped by length"] = _engine_row(
                cfg, lambda r, i=ids: pipeline.encode_ids(r, i, args.text_batch), len(ids), ref, device, args.repeats)
        _ratios(rows, "items_per_s")
        result[kind] = {"n": len(ids), "tokens": {"median": float(np.median(lengths)), "max": int(lengths.max())},
                        "rows": rows, "cut_vs_full": _guarded(lambda i=ids: cut_vs_full(model, i, args, device))}
        table(f"texts/s, {kind} ({len(ids)}, median {np.median(lengths):.0f} tokens), batch {args.text_batch}",
              rows, ["items_per_s", "x", "min_cos", "seconds"])
        print(f"  the same fused tower, cut vs 77 positions: {result[kind]['cut_vs_full']}")
    model.cpu()
    result["target_texts_per_s"] = 100_000
    return result


def cut_vs_full(model, ids: np.ndarray, args, device: str) -> dict:
    """The fused text tower (fp16 on CUDA, fp32 here) on 77 positions and cut after each batch's
    last end token (batches grouped by length): speed-up and the largest feature difference."""
    from export.towers import TextTower
    from fklip.pipeline import batches_by_length

    precision = "fp16" if device.startswith("cuda") else "fp32"
    tower = TextTower(model.float().cpu(), precision, attention="sdpa").eval().to(device)
    model.to(device)
    batches = [(rows, torch.from_numpy(b).to(device)) for rows, b in batches_by_length(ids, args.text_batch)]

    @torch.no_grad()
    def run(cut: bool) -> torch.Tensor:
        out = torch.empty((len(ids), model.text_projection.shape[1]), device=device)
        for rows, b in batches:
            x = b[:, :int(b.argmax(1).max()) + 1] if cut else b
            out[torch.from_numpy(rows).to(device)] = tower(x)
        return out

    full_s, full = timed(lambda: run(False), device, args.repeats)
    cut_s, cut = timed(lambda: run(True), device, args.repeats)
    return {"full_s": round(full_s, 4), "cut_s": round(cut_s, 4), "speedup": round(full_s / cut_s, 2),
            "max_abs_diff": float((full - cut).abs().max()), "target_speedup_concepts": 3.0}


# ---- top-k


def topk_section(args, tmp: Path) -> dict:
    from fklip.bench import plain_topk
    from fklip.retrieval import topk_chunked
    from fklip.retrieval.kernel import KernelConfig, fused_topk

    device, q, n, k = args.device, args.topk_queries, args.topk_gallery, 10
    gen = torch.Generator(device=device).manual_seed(0)
    queries = F.normalize(torch.randn(q, 512, device=device, generator=gen), dim=-1).half()
    gallery = F.normalize(torch.randn(n, 512, device=device, generator=gen), dim=-1).half()
    chunk = min(n, 262_144)
    out = torch.empty((q, chunk), dtype=torch.float16, device=device)

    def matmul_only():
        for c in range(0, n, chunk):
            g = gallery[c:c + chunk]
            torch.mm(queries, g.T, out=out[:, :len(g)])

    rows = {}  # the baseline: `fklip bench`'s, what a PyTorch user writes (torch.mm, torch.topk per chunk)
    variants = {"torch.mm + torch.topk per chunk (baseline)": lambda: plain_topk(queries, gallery, k), "matmul only (no selection)": matmul_only,
                "fklip torch path": lambda: topk_chunked(queries, gallery, k, method="torch"),
                "fklip fused (default tiles)": lambda: topk_chunked(queries, gallery, k, method="fused",
                                                                     query_chunk=q, gallery_chunk=n)}
    configs = [KernelConfig(128, 128, 64, 8, 3), KernelConfig(128, 256, 64, 8, 3), KernelConfig(64, 256, 64, 4, 4),
               KernelConfig(128, 128, 128, 8, 2), KernelConfig(64, 128, 64, 4, 4)]
    if device.startswith("cuda"):
        for cfg in configs:
            variants[f"fused kernel {cfg.block_m}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"] = \
                (lambda c=cfg: fused_topk(queries, gallery, k, config=c))
        # gallery splits per query block: the default fills 4 programs per SM; fewer, longer
        # splits run the insertion loop less often (see fklip.retrieval.kernel)
        for splits in (2, 4, 16):
            variants[f"fused kernel default tiles, {splits} splits"] = \
                (lambda sp=splits: fused_topk(queries, gallery, k, splits=sp))
    for name, fn in variants.items():
        try:
            seconds, _ = timed(fn, device, args.repeats)
            rows[name] = {"ms": round(seconds * 1e3, 2), "queries_per_s": round(q / seconds, 1)}
        except Exception as e:  # noqa: BLE001 (a tile configuration the compiler rejects: reported, not fatal)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    _ratios(rows, "ms", lower_is_better=True)
    result = {"queries": q, "gallery": n, "k": k, "rows": rows, "target_ms": 20}
    table(f"top-k, {q} queries x {n} gallery, d 512 fp16, k {k}", rows, ["ms", "queries_per_s", "x"])
    result.update(_guarded(lambda: _topk_checks(queries, gallery, k, args, gen)))
    return result


def _topk_checks(queries, gallery, k: int, args, gen) -> dict:
    """Exactness on grid features, fused against torch on random ones, and the float32 both-ways
    search that `fklip eval` runs."""
    from fklip.retrieval import topk_both_ways, topk_chunked, topk_reference

    device, q, n = args.device, len(queries), len(gallery)
    # exactness: grid features (every score exact in float32), fused and torch path against the reference
    grid_q = (torch.randint(-4, 5, (min(q, 2048), 512), device=device, generator=gen) / 8).half()
    grid_g = (torch.randint(-4, 5, (min(n, 200_000), 512), device=device, generator=gen) / 8).half()
    ref = topk_reference(grid_q[:256], grid_g, k)
    checks = {}
    for method in ("fused", "torch"):
        v, i = topk_chunked(grid_q, grid_g, k, method=method)
        checks[method] = bool(torch.equal(v[:256], ref[0]) and torch.equal(i[:256], ref[1]))
    fused_v, fused_i = topk_chunked(queries, gallery, k, method="fused")
    torch_v, torch_i = topk_chunked(queries, gallery, k, method="torch")
    # what `fklip eval` searches: float32 features from the towers, both directions
    m = min(args.eval_size, n)
    texts = F.normalize(torch.randn(m, 512, device=device, generator=gen), dim=-1)
    images = F.normalize(torch.randn(m, 512, device=device, generator=gen), dim=-1)
    both = {}
    for method in ("fused", "torch"):
        seconds, (ab, _) = timed(lambda mt=method: topk_both_ways(texts, images, k, method=mt), device, args.repeats)
        both[method] = {"ms": round(seconds * 1e3, 2), "indices": ab[1]}
    same = float((both["fused"]["indices"] == both["torch"]["indices"]).float().mean())
    eval_like = {"n": m, "dtype": "float32", "fused_ms": both["fused"]["ms"], "torch_ms": both["torch"]["ms"],
                 "same_indices": round(same, 6)}
    print(f"  both ways, {m} x {m} float32 (an eval set): fused {eval_like['fused_ms']} ms, torch path "
          f"{eval_like['torch_ms']} ms, {same:.6f} of indices equal")
    result = {"eval_like_float32": eval_like, "grid_equal_reference": checks,
              "random_features_same_indices_fused_vs_torch": round(float((fused_i == torch_i).float().mean()), 6),
              "random_features_max_value_diff": float((fused_v - torch_v).abs().max())}
    print(f"  grid features equal to topk_reference: {checks}; random features, fused vs torch path: "
          f"{result['random_features_same_indices_fused_vs_torch']:.6f} of indices equal")
    return result


# ---- fklip eval end to end


def write_eval_set(folder: Path, n: int, size: int) -> dict:
    """An eval set in the original's formats: n uint8 images, n captions, one gold image each."""
    from fklip.io import write_jsonl

    ids = write_uint8_archive(folder / "val.npz", n, size)
    captions = fashiongen_like_captions(n, seed=1)
    write_jsonl(folder / "queries.jsonl", [{"query_id": i, "query_text": t, "item_ids": [int(ids[i])]}
                                           for i, t in enumerate(captions)])
    write_jsonl(folder / "gold.jsonl", [{"image_id": int(image_id), "item_ids": [i]} for i, image_id in enumerate(ids)])
    return {"images": folder / "val.npz", "queries": folder / "queries.jsonl", "gold": folder / "gold.jsonl"}


def plain_eval(model, files: dict, args) -> dict:
    """The baseline of `fklip eval`: what a PyTorch user writes with the model already loaded in
    this process: open_clip under fp16 autocast over the archive and the captions (77
    positions), then torch.mm + torch.topk per chunk both ways. No files are written."""
    from fklip.bench import plain_topk
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    device = args.device
    model.to(device)
    captions = [json.loads(line)["query_text"] for line in files["queries"].read_text(encoding="utf-8").splitlines()]
    tokenizer = build_tokenizer(files["spec"])

    def run() -> None:
        with ImageArchive(files["images"]) as archive:
            ids = list(archive.ids)
            images = openclip_image_pass(model, archive, ids, args.image_batch, device, autocast=True)
        texts = openclip_text_pass(model, tokenizer(captions).numpy(), args.text_batch, device, autocast=True)
        t, i = torch.from_numpy(texts).to(device), torch.from_numpy(images).to(device)
        plain_topk(t, i, 10), plain_topk(i, t, 10)

    seconds, _ = timed(run, device, 1)
    model.cpu()
    return {"seconds": round(seconds, 2), "note": "in process, model loaded, no files"}


def eval_section(args, tmp: Path) -> dict:
    spec, model, ckpt = random_model(args.model, tmp)
    files = {**write_eval_set(tmp, args.eval_size, spec.image_size), "spec": spec}
    common = ["eval", "--resume", str(ckpt), "--image-data", str(files["images"]), "--text-data", str(files["queries"]),
              "--image-standard-path", str(files["gold"]), "--device", args.device]
    fast = (["--precision", "fp16", "--fused", "--cuda-graphs"] if args.device.startswith("cuda") else ["--fused"])
    runs = {"fklip eval, fast flags": [*fast, "--img-batch-size", str(args.image_batch),
                                       "--text-batch-size", str(args.text_batch)],
            "fklip eval, defaults": ["--precision", "amp"] if args.device.startswith("cuda") else []}
    rows = {"open_clip autocast fp16 + torch.topk, in process (baseline)": _guarded(lambda: plain_eval(model, files, args))}
    for name, extra in runs.items():
        out = tmp / name.replace(" ", "_").replace(",", "")
        started = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-m", "fklip", *common, *extra, "--output-dir", str(out)],
                               capture_output=True, text=True, check=False, timeout=args.eval_timeout_s)
        except subprocess.TimeoutExpired:
            rows[name] = {"error": f"still running after {args.eval_timeout_s} s; stopped", "flags": " ".join(extra)}
            continue
        rows[name] = {"seconds": round(time.perf_counter() - started, 2), "rc": r.returncode,
                      "flags": " ".join(extra)}
        if r.returncode:
            rows[name]["error"] = r.stderr[-800:]
        else:
            metrics = json.loads((out / "metrics.json").read_text())
            rows[name]["mean_recall"] = metrics["mean_recall"]
            rows[name]["timings_s"] = metrics.get("timings_s")
    _ratios(rows, "seconds", lower_is_better=True)
    table(f"fklip eval end to end, {args.eval_size} uint8 images + captions, loading included", rows,
          ["seconds", "x", "rc", "mean_recall"])
    return {"n": args.eval_size, "rows": rows, "target_s": 10}


# ---- training: knowledge refresh, concept loss overhead


def train_section(args, tmp: Path) -> dict:
    from fklip.data.archive import ImageArchive
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo
    from fklip.distributed import DistContext
    from fklip.knowledge import load_vocabulary, refresh_knowledge
    from fklip.model import build_tokenizer

    spec, model, _ = random_model(args.model, tmp)
    device = args.device
    # uint8 pixels, as a real training archive holds them (float32 would read and copy 4x the bytes)
    demo = generate_demo(DemoDataConfig(out=tmp / "demo", size=spec.image_size, train=args.train_products, val=4, kb=8,
                                        encoding="uint8_hwc"))
    tok = build_tokenizer(spec)
    vocabs = {"data": (load_vocabulary(demo.concept_queries, demo.concept_fathers), tok),
              "kb": (load_vocabulary(demo.kb_concept_queries, demo.kb_concept_fathers), tok)}
    kb_path = tmp / "kb.npz"
    kb_ids = write_uint8_archive(kb_path, args.kb_size, spec.image_size)
    model.to(device)
    seconds = {}
    with ImageArchive(kb_path) as kb:
        for precision in ("fp32", "amp"):  # fp32: the original's and the default; amp: --knowledge-precision amp
            def refresh(precision=precision):
                return refresh_knowledge(model, [(kb, kb_ids)], vocabs, DistContext(), args.image_batch,
                                         device, precision)
            # the fp32 warm-up warms the archive's pages and CUDA for both (amp's first call is timed)
            seconds[precision], _ = timed(refresh, device, 1, warmup=1 if precision == "fp32" else 0)
        prompts = [text for vocab, _ in vocabs.values() for _, text in vocab.prompts]

        def plain() -> None:  # the baseline: open_clip under autocast encodes the same images and prompts
            openclip_image_pass(model, kb, kb_ids, args.image_batch, device, autocast=True)
            openclip_text_pass(model, tok(prompts).numpy(), args.text_batch, device, autocast=True)

        baseline = _guarded(lambda: {"seconds": round(timed(plain, device, 1, warmup=0)[0], 2)})
    refresh_row = {"seconds": round(seconds["fp32"], 2), "seconds_amp": round(seconds["amp"], 2),
                   "open_clip_encode_only_s (baseline)": baseline.get("seconds", baseline.get("error")),
                   "kb_images": len(kb_ids),
                   "concepts": {kind: len(v.prompts) for kind, (v, _) in vocabs.items()}, "target_s": 10}
    model.cpu()
    print(f"\nknowledge refresh: {refresh_row}")
    steps = {}
    for concept in (False, True):
        steps["concept" if concept else "contrastive"] = _train_steps(demo, args, tmp, concept)
    overhead = steps["concept"]["step_s"] / steps["contrastive"]["step_s"] - 1
    print(f"training step, batch {args.train_batch}: {steps}; the concept loss adds {overhead:.1%} (target < 25%)")
    return {"refresh": refresh_row, "steps": steps, "concept_overhead": round(overhead, 4), "target_overhead": 0.25}


def _train_steps(demo, args, tmp: Path, concept: bool) -> dict:
    """Seconds per step of `fklip train` over one epoch: the median step without the first
    (`step_s_median` of the epoch's record); the knowledge refresh is outside the steps."""
    from fklip.config import TrainConfig
    from fklip.train import run_train

    cfg = TrainConfig(
        train_data=demo.train_queries, train_img=demo.train_images, model=args.model,
        txt_id_filename=demo.concept_queries, kb_txt_id_filename=demo.kb_concept_queries,
        concept_fathers=demo.concept_fathers, kb_concept_fathers=demo.kb_concept_fathers,
        img_data_sets=(demo.kb_images,), is_concept=concept, is_data_concept=concept, warmup=2,
        batch_size=args.train_batch, eval_batch_size=256, lr=1e-5, wd=0.001, epochs=1, report_to="none",
        logs=tmp / "logs", name=f"bench-{concept}", device=args.device,
        precision="amp" if args.device.startswith("cuda") else "fp32")
    summary = run_train(cfg)
    epoch = summary["epochs"][0]
    batches = json.loads((Path(summary["run_dir"]) / "params.json").read_text())["batches_per_epoch"]
    step_s = epoch["step_s_median"] if epoch.get("step_s_median") is not None else epoch["epoch_s"] / batches
    return {"step_s": round(step_s, 4), "epoch_s": round(epoch["epoch_s"], 3), "batches": batches}


# In order of priority: with --budget-s, the sections left when the time is spent are skipped.
def _earlier_sections(path: Path | None) -> dict:
    """The sections, and the commands, that an earlier run wrote to `path` (nothing if none)."""
    if path is None or not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    if not isinstance(earlier, dict) or earlier.get("benchmark") != "gpu_bench":
        return {}
    return {key: value for key, value in earlier.items() if key in SECTIONS or key == "commands"}


SECTIONS = {"topk": topk_section, "image": image_section, "text": text_section, "eval": eval_section,
            "train": train_section}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--small", action="store_true", help="tiny sizes: a dry run of the script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--image-batch", type=int, default=1024)
    parser.add_argument("--texts", type=int, default=32768)
    parser.add_argument("--text-batch", type=int, default=2048)
    parser.add_argument("--topk-queries", type=int, default=8192)
    parser.add_argument("--topk-gallery", type=int, default=1_000_000)
    parser.add_argument("--eval-size", type=int, default=32_528)
    parser.add_argument("--kb-size", type=int, default=50_000)
    parser.add_argument("--train-products", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--compile-baselines", action="store_true", help="also open_clip + torch.compile (slow)")
    parser.add_argument("--compile-engines", action="store_true",
                        help="also the torch engine with --compile (inductor's first compile is slow)")
    parser.add_argument("--eval-timeout-s", type=float, default=90, help="each `fklip eval` subprocess's limit")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no section after this many seconds (the rest are reported as skipped)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also written before and after every section; sections already in the file from "
                             "an earlier run (gpu.sh runs one section per process) are kept")
    args = parser.parse_args()
    from fklip.io import atomic_output
    if args.small:
        args.images, args.image_batch, args.texts, args.text_batch = 24, 8, 40, 16
        args.topk_queries, args.topk_gallery, args.eval_size, args.kb_size = 32, 1500, 24, 32
        args.train_products, args.train_batch, args.repeats = 16, 8, 1
    if not args.device.startswith("cuda"):  # the dry run: the Triton kernel in its interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    logging.basicConfig(level=logging.WARNING)
    report = {"benchmark": "gpu_bench", "device": args.device, "model": args.model, "weights": "random",
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "torch": str(torch.__version__), "cuda": torch.version.cuda, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    with contextlib.suppress(ImportError):
        import triton

        report["triton"] = triton.__version__
    report = {**report, **_earlier_sections(args.json_out)}
    report["commands"] = [*report.get("commands", []), report.pop("command")]

    def save() -> None:
        if args.json_out is not None:  # so a run cut short still leaves the finished sections
            with atomic_output(args.json_out) as tmp:
                tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")

    failed, begun = False, time.perf_counter()
    for name in [n for n in SECTIONS if n in args.sections]:
        started = time.perf_counter()
        if args.budget_s is not None and started - begun > args.budget_s:
            report[name] = {"skipped": f"the time budget of {args.budget_s:.0f} s was spent"}
            continue
        report[name] = {"error": f"started at {datetime.now(timezone.utc).isoformat(timespec='seconds')} and "
                                 "never finished: the process was stopped (a timeout?) or died"}
        save()
        with tempfile.TemporaryDirectory(prefix=f"fklip-gpu-{name}-") as tmp:
            try:
                report[name] = SECTIONS[name](args, Path(tmp))
            except Exception as e:  # noqa: BLE001 (one broken section must not hide the others' figures)
                failed = True
                traceback.print_exc()
                report[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        report[name]["section_s"] = round(time.perf_counter() - started, 1)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save()
    ran = [n for n in SECTIONS if n in args.sections]  # the whole merged report is in --json-out
    print(json.dumps({k: v for k, v in report.items() if k not in SECTIONS or k in ran}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
