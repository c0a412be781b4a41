"""Issue 6's GPU figures, each against plain open_clip/PyTorch measured in the same run.

    python benchmarks/gpu_bench.py [--sections image text topk eval train] [--json-out PATH]
    python benchmarks/gpu_bench.py --device cpu --small      # a dry run of every section here

Run by benchmarks/gpu.sh on a lent H100/H200 (nothing is downloaded). ViT-B-32 with random
weights (seeded). Every variant is warmed up (compiles, graph captures, autotuning) and then
timed --repeats times after a device synchronisation; figures are medians. The timing is
`fklip bench`'s (fklip.timing; the encoders' baselines and top-k's are engines.measure's), and
the flags become one `GpuBenchConfig`, built once in main(). Sections:

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
JSON and the others still run; the exit code is 1 then. A section stopped by SIGTERM (gpu.sh's
time limit) removes its temporary folder, is recorded as stopped, and the exit code is 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engines.measure import (
    encode_all,
    min_cosine,
    open_clip_backend,
    plain_topk,
    topk_method,
)
from fklip.timing import environment, measure_variants, timed_median

logger = logging.getLogger("gpu_bench")

SECTION_NAMES = ("topk", "image", "text", "eval", "train")  # in order of priority


@dataclass(frozen=True)
class GpuBenchConfig:
    """One run of gpu_bench: built once in main() from the flags (`--small` applied), read by
    the sections. The defaults are the GPU run's (see benchmarks/gpu.sh for the time limits)."""

    device: str = "cuda"
    model: str = "ViT-B-32"
    sections: tuple[str, ...] = SECTION_NAMES
    repeats: int = 3
    images: int = 8192
    image_batch: int = 1024
    texts: int = 32768
    text_batch: int = 2048
    topk_queries: int = 8192
    topk_gallery: int = 1_000_000
    eval_size: int = 32_528
    # the train section's CPU set-up (demo data, KB archive) must leave its limit to the GPU work
    kb_size: int = 20_000
    train_products: int = 512
    train_batch: int = 256
    compile_baselines: bool = False
    compile_engines: bool = False
    # each `fklip eval` subprocess: two of them and the set-up fit in gpu.sh's eval limit
    eval_timeout_s: float = 45.0
    budget_s: float | None = None
    json_out: Path | None = None

    def __post_init__(self) -> None:
        problems = [f"--{f.name.replace('_', '-')}: expected a positive integer, got {getattr(self, f.name)}"
                    for f in fields(self) if f.type == "int" and getattr(self, f.name) < 1]
        problems += [f"--sections: unknown section {name!r} (expected some of {', '.join(SECTION_NAMES)})"
                     for name in self.sections if name not in SECTION_NAMES]
        if not self.eval_timeout_s > 0:
            problems.append(f"--eval-timeout-s: expected a positive number of seconds, got {self.eval_timeout_s}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# --small: a dry run of every section (on the CPU: fklip-tiny, the Triton kernel interpreted)
SMALL = {"images": 24, "image_batch": 8, "texts": 40, "text_batch": 16, "topk_queries": 32, "topk_gallery": 1500,
         "eval_size": 24, "kb_size": 32, "train_products": 16, "train_batch": 8, "repeats": 1}


def config_from_argv(argv: list[str] | None = None) -> GpuBenchConfig:
    """The run's config: GpuBenchConfig's defaults, then --small's sizes, then the flags given."""
    default = GpuBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)

    def flag(name: str, help: str = "", **kwargs) -> None:
        shown = getattr(default, name)
        shown = " ".join(shown) if isinstance(shown, tuple) else shown
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs,
                            help=f"{help} (default {shown})".strip())

    flag("device", help="cpu: a dry run (with --small)")
    flag("model")
    flag("sections", nargs="+", choices=SECTION_NAMES)
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes: a dry run of the script (flags given explicitly still win)")
    for name in ("repeats", "images", "image_batch", "texts", "text_batch", "topk_queries", "topk_gallery",
                 "eval_size", "kb_size", "train_products", "train_batch"):
        flag(name, type=int)
    flag("compile_baselines", action="store_true", help="also open_clip + torch.compile (slow)")
    flag("compile_engines", action="store_true",
         help="also the torch engine with --compile (inductor's first compile is slow)")
    flag("eval_timeout_s", type=float, help="each `fklip eval` subprocess's limit")
    flag("budget_s", type=float, help="start no section after this many seconds (the rest are reported as skipped)")
    flag("json_out", type=Path,
         help="also written before and after every section; sections already in the file from an earlier run "
              "(gpu.sh runs one section per process) are kept")
    given = vars(parser.parse_args(argv))
    small = given.pop("small", False)
    if "sections" in given:
        given["sections"] = tuple(given["sections"])
    return GpuBenchConfig(**{**(SMALL if small else {}), **given})


def table(title: str, rows: dict[str, dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'':<46}" + "".join(f"{c:>16}" for c in columns))
    for name, row in rows.items():
        print(f"{name:<46}" + "".join(f"{row[c]:>16.4g}" if isinstance(row.get(c), float)
                                      else f"{'' if row.get(c) is None else row[c]!s:>16}" for c in columns))


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
    return open_clip_backend(model, device, autocast=autocast and device.startswith("cuda"),
                             image_encoding="uint8_hwc")


def openclip_image_pass(model, archive, ids: list, batch: int, device: str, autocast: bool) -> np.ndarray:
    """What an open_clip user runs: read a batch from the archive, copy it, normalise, encode."""
    encode = _open_clip(model, device, autocast).encode_images
    return np.concatenate([encode(archive.read_batch(ids[i:i + batch])) for i in range(0, len(ids), batch)])


def openclip_text_pass(model, ids: np.ndarray, batch: int, device: str, autocast: bool) -> np.ndarray:
    """open_clip's encode_text over the full context, as users run it."""
    return encode_all(_open_clip(model, device, autocast).encode_texts, ids, batch)


def engine_variants(ckpt: Path, device: str, compiled: bool = False) -> dict:
    from fklip.config import EncodeConfig

    if not device.startswith("cuda"):  # the dry run: fp32, no graphs
        return {"fklip fused fp32": EncodeConfig("torch", checkpoint=ckpt, fused=True),
                "fklip open_clip modules fp32": EncodeConfig("torch", checkpoint=ckpt)}
    out = {"fklip fused fp16 + CUDA graphs": EncodeConfig("torch", checkpoint=ckpt, device=device, precision="fp16",
                                                          fused=True, cuda_graphs=True),
           "fklip fused bf16 + CUDA graphs": EncodeConfig("torch", checkpoint=ckpt, device=device, precision="bf16",
                                                          fused=True, cuda_graphs=True)}
    if compiled:  # --compile-engines: inductor's first compile of ViT-B-32 takes a minute or more
        out["fklip fused fp16 + compile + CUDA graphs"] = EncodeConfig(
            "torch", checkpoint=ckpt, device=device, precision="fp16", fused=True, compile=True, cuda_graphs=True)
    return out


def image_section(cfg: GpuBenchConfig, tmp: Path) -> dict:
    from fklip import pipeline
    from fklip.data.archive import ImageArchive

    spec, model, ckpt = random_model(cfg.model, tmp)
    path = tmp / "images.npz"
    ids = write_uint8_archive(path, cfg.images, spec.image_size)
    device, batch, rows = cfg.device, cfg.image_batch, {}
    with ImageArchive(path) as archive:
        ref = openclip_image_pass(model.to(device), archive, ids[:256], 64, device, autocast=False)
        baselines = {"open_clip autocast fp16 (baseline)": (model, True)}
        if cfg.cuda:
            baselines["open_clip fp16 weights"] = (_half_copy(model), False)
            if cfg.compile_baselines:
                baselines["open_clip fp16 weights + torch.compile"] = (_compiled_half_copy(model), False)
        for name, (m, autocast) in baselines.items():
            run = (lambda m=m, a=autocast: openclip_image_pass(m, archive, ids, batch, device, a))
            rows[name] = _guarded(lambda run=run: _measure(run, len(ids), ref, device, cfg.repeats))
        model.cpu()
        for name, runner_cfg in engine_variants(ckpt, device, cfg.compile_engines).items():
            rows[name] = _engine_row(runner_cfg, lambda r: pipeline.encode_archive(r, archive, batch, image_ids=ids),
                                     len(ids), ref, device, cfg.repeats)
    _ratios(rows, "items_per_s")
    table(f"images/s, {cfg.model}, {len(ids)} uint8 images from an archive in host memory, batch "
          f"{batch}", rows, ["items_per_s", "x", "min_cos", "seconds"])
    return {"n": len(ids), "batch": batch, "rows": rows, "target_images_per_s": 50_000}


def _half_copy(model):
    import copy

    return copy.deepcopy(model).half()


def _compiled_half_copy(model):
    m = _half_copy(model)
    m.encode_image = torch.compile(m.encode_image)
    return m


def _measure(run: Callable, n: int, ref: np.ndarray, device: str, repeats: int) -> dict:
    """Items/s of `run` (a pass over `n` items: one warm-up, the median of `repeats`) and the
    min cosine of its first rows to `ref`."""
    seconds, out = timed_median(run, device, repeats)
    return {"items_per_s": round(n / seconds, 1), "seconds": round(seconds, 4),
            "min_cos": round(min_cosine(out[:len(ref)], ref), 6)}


def _guarded(measure: Callable[[], dict]) -> dict:
    """One row measured, or the error that stopped it: the section's other rows still run."""
    try:
        return measure()
    except Exception as e:  # a failing row is reported in the JSON, not fatal
        logger.exception("a measurement failed")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _engine_row(runner_cfg, run: Callable, n: int, ref: np.ndarray, device: str, repeats: int) -> dict:
    """One engine variant measured, or the error that stopped it (the other variants still run)."""
    from engines.base import build_runner

    def measure() -> dict:
        with build_runner(runner_cfg) as runner:
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


def text_section(cfg: GpuBenchConfig, tmp: Path) -> dict:
    from fklip import pipeline
    from fklip.model import build_tokenizer

    spec, model, ckpt = random_model(cfg.model, tmp)
    tokenizer = build_tokenizer(spec)
    device, batch, repeats, result = cfg.device, cfg.text_batch, cfg.repeats, {}
    model.to(device)
    for kind, texts in (("captions", fashiongen_like_captions(cfg.texts)),
                        ("concept prompts", concept_prompts(cfg.texts))):
        ids = tokenizer(texts).numpy()  # (N, 77)
        lengths = ids.argmax(1) + 1
        ref = openclip_text_pass(model, ids[:512], 128, device, autocast=False)
        rows = {"open_clip autocast fp16, 77 positions (baseline)": _guarded(
                lambda i=ids, ref=ref: _measure(lambda: openclip_text_pass(model, i, batch, device, True),
                                                len(i), ref, device, repeats))}
        for name, runner_cfg in engine_variants(ckpt, device).items():
            rows[name + ", cut, grouped by length"] = _engine_row(
                runner_cfg, lambda r, i=ids: pipeline.encode_ids(r, i, batch), len(ids), ref, device, repeats)
        _ratios(rows, "items_per_s")
        result[kind] = {"n": len(ids), "tokens": {"median": float(np.median(lengths)), "max": int(lengths.max())},
                        "rows": rows,
                        "cut_vs_full": _guarded(lambda i=ids: cut_vs_full(model, i, batch, device, repeats))}
        table(f"texts/s, {kind} ({len(ids)}, median {np.median(lengths):.0f} tokens), batch {batch}",
              rows, ["items_per_s", "x", "min_cos", "seconds"])
        print(f"  the same fused tower, cut vs 77 positions: {result[kind]['cut_vs_full']}")
    model.cpu()
    result["target_texts_per_s"] = 100_000
    return result


def cut_vs_full(model, ids: np.ndarray, batch: int, device: str, repeats: int) -> dict:
    """The fused text tower (fp16 on CUDA, fp32 here) on 77 positions and cut after each batch's
    last end token (batches grouped by length), timed in turn: speed-up and the largest feature
    difference."""
    from export.towers import TextTower
    from fklip.pipeline import batches_by_length

    precision = "fp16" if device.startswith("cuda") else "fp32"
    tower = TextTower(model.float().cpu(), precision, attention="sdpa").eval().to(device)
    model.to(device)
    batches = [(rows, torch.from_numpy(b).to(device)) for rows, b in batches_by_length(ids, batch)]

    @torch.no_grad()
    def run(cut: bool) -> torch.Tensor:
        out = torch.empty((len(ids), model.text_projection.shape[1]), device=device)
        for rows, b in batches:
            x = b[:, :int(b.argmax(1).max()) + 1] if cut else b
            out[torch.from_numpy(rows).to(device)] = tower(x)
        return out

    out: dict[str, torch.Tensor] = {}
    timings = measure_variants({"full": lambda: out.__setitem__("full", run(False)),
                                "cut": lambda: out.__setitem__("cut", run(True))}, repeats, device)
    (full_s, full), (cut_s, cut) = ((timings.median(name), out[name]) for name in ("full", "cut"))
    return {"full_s": round(full_s, 4), "cut_s": round(cut_s, 4), "speedup": round(full_s / cut_s, 2),
            "max_abs_diff": float((full - cut).abs().max()), "target_speedup_concepts": 3.0}


# ---- top-k


def topk_section(cfg: GpuBenchConfig, tmp: Path) -> dict:
    from fklip.retrieval import topk_chunked
    from fklip.retrieval.kernel import KernelConfig, fused_topk

    device, q, n, k = cfg.device, cfg.topk_queries, cfg.topk_gallery, 10
    gen = torch.Generator(device=device).manual_seed(0)
    queries = F.normalize(torch.randn(q, 512, device=device, generator=gen), dim=-1).half()
    gallery = F.normalize(torch.randn(n, 512, device=device, generator=gen), dim=-1).half()
    chunk = min(n, 262_144)
    out = torch.empty((q, chunk), dtype=torch.float16, device=device)

    def matmul_only():
        for c in range(0, n, chunk):
            g = gallery[c:c + chunk]
            torch.mm(queries, g.T, out=out[:, :len(g)])

    # the baseline: `fklip bench`'s, what a PyTorch user writes (torch.mm, torch.topk per chunk);
    # each variant's method: what ran ("plain" is no fklip path, None no selection)
    variants = {"torch.mm + torch.topk per chunk (baseline)": ("plain", lambda: plain_topk(queries, gallery, k)),
                "matmul only (no selection)": (None, matmul_only),
                "fklip torch path": ("torch", lambda: topk_chunked(queries, gallery, k, method="torch")),
                "fklip fused (default tiles)": ("fused", lambda: topk_chunked(queries, gallery, k, method="fused",
                                                                              query_chunk=q, gallery_chunk=n))}
    configs = [KernelConfig(128, 128, 64, 8, 3), KernelConfig(128, 256, 64, 8, 3), KernelConfig(64, 256, 64, 4, 4),
               KernelConfig(128, 128, 128, 8, 2), KernelConfig(64, 128, 64, 4, 4)]
    if cfg.cuda:
        for c in configs:
            variants[f"fused kernel {c.block_m}x{c.block_n}x{c.block_d} w{c.num_warps} s{c.num_stages}"] = \
                ("fused", lambda c=c: fused_topk(queries, gallery, k, config=c))
        # gallery splits per query block: the default fills 4 programs per SM; fewer, longer
        # splits run the insertion loop less often (see fklip.retrieval.kernel)
        for splits in (2, 4, 16):
            variants[f"fused kernel default tiles, {splits} splits"] = \
                ("fused", lambda sp=splits: fused_topk(queries, gallery, k, splits=sp))
    # a tile configuration the compiler rejects is reported in its row, not fatal
    timings = measure_variants({name: fn for name, (_, fn) in variants.items()}, cfg.repeats, device,
                               keep_going=True)
    rows = {}
    for name, (method, _) in variants.items():
        if name in timings.errors:
            rows[name] = {"error": timings.errors[name], "method": method}
        else:
            seconds = timings.median(name)
            rows[name] = {"ms": round(seconds * 1e3, 2), "queries_per_s": round(q / seconds, 1), "method": method}
    _ratios(rows, "ms", lower_is_better=True)
    result = {"queries": q, "gallery": n, "k": k, "rows": rows, "target_ms": 20}
    table(f"top-k, {q} queries x {n} gallery, d 512 fp16, k {k}", rows, ["ms", "queries_per_s", "x", "method"])
    result.update(_guarded(lambda: _topk_checks(queries, gallery, k, cfg.eval_size, cfg.repeats, gen)))
    return result


def _topk_checks(queries, gallery, k: int, eval_size: int, repeats: int, gen) -> dict:
    """Exactness on grid features, fused against torch on random ones, and the float32 both-ways
    search that `fklip eval` runs (each method timed in turn)."""
    from fklip.retrieval import topk_both_ways, topk_chunked, topk_reference

    device, q, n = queries.device, len(queries), len(gallery)
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
    m = min(eval_size, n)
    texts = F.normalize(torch.randn(m, 512, device=device, generator=gen), dim=-1)
    images = F.normalize(torch.randn(m, 512, device=device, generator=gen), dim=-1)
    indices = {}  # method -> (m, k) text->image indices of its last run
    timings = measure_variants({method: lambda mt=method: indices.__setitem__(
        mt, topk_both_ways(texts, images, k, method=mt)[0][1]) for method in ("fused", "torch")}, repeats, device)
    same = float((indices["fused"] == indices["torch"]).float().mean())
    eval_like = {"n": m, "dtype": "float32", "fused_ms": round(timings.median("fused") * 1e3, 2),
                 "torch_ms": round(timings.median("torch") * 1e3, 2), "same_indices": round(same, 6)}
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


def plain_eval(model, files: dict, device: str, image_batch: int, text_batch: int) -> dict:
    """The baseline of `fklip eval`: what a PyTorch user writes with the model already loaded in
    this process: open_clip under fp16 autocast over the archive and the captions (77
    positions), then torch.mm + torch.topk per chunk both ways. No files are written."""
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    model.to(device)
    captions = [json.loads(line)["query_text"] for line in files["queries"].read_text(encoding="utf-8").splitlines()]
    tokenizer = build_tokenizer(files["spec"])

    def run() -> None:
        with ImageArchive(files["images"]) as archive:
            ids = list(archive.ids)
            images = openclip_image_pass(model, archive, ids, image_batch, device, autocast=True)
        texts = openclip_text_pass(model, tokenizer(captions).numpy(), text_batch, device, autocast=True)
        t, i = torch.from_numpy(texts).to(device), torch.from_numpy(images).to(device)
        plain_topk(t, i, 10), plain_topk(i, t, 10)

    seconds, _ = timed_median(run, device, 1)  # after one warm-up run
    model.cpu()
    return {"seconds": round(seconds, 2), "note": "in process, model loaded, no files"}


def eval_section(cfg: GpuBenchConfig, tmp: Path) -> dict:
    spec, model, ckpt = random_model(cfg.model, tmp)
    files = {**write_eval_set(tmp, cfg.eval_size, spec.image_size), "spec": spec}
    common = ["eval", "--resume", str(ckpt), "--image-data", str(files["images"]), "--text-data", str(files["queries"]),
              "--image-standard-path", str(files["gold"]), "--device", cfg.device]
    fast = (["--precision", "fp16", "--fused", "--cuda-graphs"] if cfg.cuda else ["--fused"])
    runs = {"fklip eval, fast flags": [*fast, "--img-batch-size", str(cfg.image_batch),
                                       "--text-batch-size", str(cfg.text_batch)],
            "fklip eval, defaults": ["--precision", "amp"] if cfg.cuda else []}
    rows = {"open_clip autocast fp16 + torch.topk, in process (baseline)": _guarded(
        lambda: plain_eval(model, files, cfg.device, cfg.image_batch, cfg.text_batch))}
    method = topk_method(cfg.device)  # fklip eval searches its float32 features with method "auto"
    for name, extra in runs.items():
        out = tmp / name.replace(" ", "_").replace(",", "")
        started = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-m", "fklip", *common, *extra, "--output-dir", str(out)],
                               capture_output=True, text=True, check=False, timeout=cfg.eval_timeout_s)
        except subprocess.TimeoutExpired:
            rows[name] = {"error": f"still running after {cfg.eval_timeout_s} s; stopped", "flags": " ".join(extra),
                          "topk_method": method}
            continue
        rows[name] = {"seconds": round(time.perf_counter() - started, 2), "rc": r.returncode,
                      "flags": " ".join(extra), "topk_method": method}
        if r.returncode:
            rows[name]["error"] = r.stderr[-800:]
        else:
            metrics = json.loads((out / "metrics.json").read_text())
            rows[name]["mean_recall"] = metrics["mean_recall"]
            rows[name]["timings_s"] = metrics.get("timings_s")
    _ratios(rows, "seconds", lower_is_better=True)
    table(f"fklip eval end to end, {cfg.eval_size} uint8 images + captions, loading included", rows,
          ["seconds", "x", "rc", "mean_recall"])
    return {"n": cfg.eval_size, "rows": rows, "target_s": 10}


# ---- training: knowledge refresh, concept loss overhead


def train_section(cfg: GpuBenchConfig, tmp: Path) -> dict:
    from fklip.data.archive import ImageArchive
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo
    from fklip.distributed import DistContext
    from fklip.knowledge import load_vocabulary, refresh_knowledge
    from fklip.model import build_tokenizer

    spec, model, _ = random_model(cfg.model, tmp)
    device = cfg.device
    # uint8 pixels, as a real training archive holds them (float32 would read and copy 4x the bytes)
    demo = generate_demo(DemoDataConfig(out=tmp / "demo", size=spec.image_size, train=cfg.train_products, val=4, kb=8,
                                        encoding="uint8_hwc"))
    tok = build_tokenizer(spec)
    vocabs = {"data": (load_vocabulary(demo.concept_queries, demo.concept_fathers), tok),
              "kb": (load_vocabulary(demo.kb_concept_queries, demo.kb_concept_fathers), tok)}
    kb_path = tmp / "kb.npz"
    kb_ids = write_uint8_archive(kb_path, cfg.kb_size, spec.image_size)
    model.to(device)
    seconds = {}
    with ImageArchive(kb_path) as kb:
        for precision in ("fp32", "amp"):  # fp32: the original's and the default; amp: --knowledge-precision amp
            def refresh(precision=precision):
                return refresh_knowledge(model, [(kb, kb_ids)], vocabs, DistContext(), cfg.image_batch,
                                         device, precision)
            # the fp32 warm-up warms the archive's pages and CUDA for both (amp's first call is timed)
            seconds[precision], _ = timed_median(refresh, device, 1, warmup=1 if precision == "fp32" else 0)
        prompts = [text for vocab, _ in vocabs.values() for _, text in vocab.prompts]

        def plain() -> None:  # the baseline: open_clip under autocast encodes the same images and prompts
            openclip_image_pass(model, kb, kb_ids, cfg.image_batch, device, autocast=True)
            openclip_text_pass(model, tok(prompts).numpy(), cfg.text_batch, device, autocast=True)

        baseline = _guarded(lambda: {"seconds": round(timed_median(plain, device, 1, warmup=0)[0], 2)})
    refresh_row = {"seconds": round(seconds["fp32"], 2), "seconds_amp": round(seconds["amp"], 2),
                   "open_clip_encode_only_s (baseline)": baseline.get("seconds", baseline.get("error")),
                   "kb_images": len(kb_ids),
                   "concepts": {kind: len(v.prompts) for kind, (v, _) in vocabs.items()}, "target_s": 10}
    model.cpu()
    print(f"\nknowledge refresh: {refresh_row}")
    steps = {}
    for concept in (False, True):
        steps["concept" if concept else "contrastive"] = _train_steps(demo, cfg.model, cfg.train_batch, device, tmp,
                                                                      concept)
    overhead = steps["concept"]["step_s"] / steps["contrastive"]["step_s"] - 1
    print(f"training step, batch {cfg.train_batch}: {steps}; the concept loss adds {overhead:.1%} (target < 25%)")
    return {"refresh": refresh_row, "steps": steps, "concept_overhead": round(overhead, 4), "target_overhead": 0.25}


def _train_steps(demo, model: str, batch: int, device: str, tmp: Path, concept: bool) -> dict:
    """Seconds per step of `fklip train` over one epoch: the median step without the first
    (`step_s_median` of the epoch's record); the knowledge refresh is outside the steps."""
    from fklip.config import TrainConfig
    from fklip.train import run_train

    cfg = TrainConfig(
        train_data=demo.train_queries, train_img=demo.train_images, model=model,
        txt_id_filename=demo.concept_queries, kb_txt_id_filename=demo.kb_concept_queries,
        concept_fathers=demo.concept_fathers, kb_concept_fathers=demo.kb_concept_fathers,
        img_data_sets=(demo.kb_images,), is_concept=concept, is_data_concept=concept, warmup=2,
        batch_size=batch, eval_batch_size=256, lr=1e-5, wd=0.001, epochs=1, report_to="none",
        logs=tmp / "logs", name=f"bench-{concept}", device=device,
        precision="amp" if device.startswith("cuda") else "fp32")
    summary = run_train(cfg)
    epoch = summary["epochs"][0]
    batches = json.loads((Path(summary["run_dir"]) / "params.json").read_text())["batches_per_epoch"]
    step_s = epoch["step_s_median"] if epoch.get("step_s_median") is not None else epoch["epoch_s"] / batches
    return {"step_s": round(step_s, 4), "epoch_s": round(epoch["epoch_s"], 3), "batches": batches}


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


# In order of priority: with --budget-s, the sections left when the time is spent are skipped.
SECTIONS = {"topk": topk_section, "image": image_section, "text": text_section, "eval": eval_section,
            "train": train_section}


class Stopped(BaseException):
    """SIGTERM arrived (gpu.sh's `timeout`): raised wherever the section is, so that its
    temporary folder (up to ~12 GB for train) is removed on the way out. Not an Exception: a
    section's own error handling must not take it for a failure and go on."""


def _stop(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # the clean-up runs once, uninterrupted
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_argv(argv)
    except ValueError as e:
        print(f"gpu_bench: {e}", file=sys.stderr)
        return 2
    from fklip.io import atomic_output
    if not cfg.cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_bench: a dry run on the CPU runs the Triton kernel in its interpreter: set TRITON_INTERPRET=1 in the environment (Triton reads it when it is first imported, which importing fklip already does through open_clip)", file=sys.stderr)
        return 2
    if cfg.cuda and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    logging.basicConfig(level=logging.WARNING)
    env = environment(cfg.device)
    report = {"benchmark": "gpu_bench", "device": cfg.device, "model": cfg.model, "weights": "random",
              **{key: env[key] for key in ("gpu", "torch", "cuda", "python", "date")}, "command": " ".join(sys.argv)}
    with contextlib.suppress(ImportError):
        import triton

        report["triton"] = triton.__version__
    report = {**report, **_earlier_sections(cfg.json_out)}
    report["commands"] = [*report.get("commands", []), report.pop("command")]

    def save() -> None:
        if cfg.json_out is not None:  # so a run cut short still leaves the finished sections
            with atomic_output(cfg.json_out) as tmp:
                tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")

    signal.signal(signal.SIGTERM, _stop)
    failed, stopped, begun = False, False, time.perf_counter()
    ran = [n for n in SECTIONS if n in cfg.sections]  # the whole merged report is in --json-out
    for name in ran:
        started = time.perf_counter()
        if cfg.budget_s is not None and started - begun > cfg.budget_s:
            report[name] = {"skipped": f"the time budget of {cfg.budget_s:.0f} s was spent"}
            continue
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report[name] = {"error": f"started at {started_at} and never finished: the process was stopped "
                                 "(a timeout?) or died"}
        try:
            save()
            with tempfile.TemporaryDirectory(prefix=f"fklip-gpu-{name}-", ignore_cleanup_errors=True) as tmp:
                try:
                    report[name] = SECTIONS[name](cfg, Path(tmp))
                except Exception as e:  # noqa: BLE001 (one broken section must not hide the others' figures)
                    failed = True
                    traceback.print_exc()
                    report[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        except Stopped as e:  # the temporary folder is gone: say so, and stop
            report[name] = {"error": f"started at {started_at} and never finished: the process was stopped ({e}, "
                                     "a time limit?); its temporary folder was removed"}
            stopped = True
        report[name]["section_s"] = round(time.perf_counter() - started, 1)
        if cfg.cuda:
            torch.cuda.empty_cache()
        save()
        if stopped:
            break
    print(json.dumps({k: v for k, v in report.items() if k not in SECTIONS or k in ran}))
    return 128 + signal.SIGTERM if stopped else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
