"""Images/s and texts/s of each engine and precision against open_clip eager fp32, on the CPU.

    python benchmarks/bench_engines.py [--model ViT-B-32] [--images 128] [--texts 256] [--batch 32]
                                       [--repeats 3] [--threads 2] [--json-out PATH]

A model with random weights (seeded) is saved as an fklip checkpoint and exported into a temp
folder with `export.pipeline.run_export` (fp32 with --int8: 7-bit int8 weights for the image
tower, uint8 weights for the text tower; and fp16). A second folder holds the same fp32 graphs
with onnxruntime's default 8-bit int8 weights, for comparison. Inputs: demo garments drawn at
the model's image size (`fklip.data.garments`), CLIP-normalised float32, and demo captions
(`fklip.data.demo.caption_and_phrases`) tokenised by the fklip tokenizer.

* baseline: open_clip eager fp32, `model.encode_image` / `model.encode_text` over the full
  context (77 tokens) + F.normalize, as open_clip users run it, in the same process and run;
* torch runner fp32 (and --torch-precisions amp bf16: ~8x slower than fp32 on CPUs without
  bf16 instructions), torch.compile (--no-compile to skip);
* onnx runner fp32, fp16 (--no-onnx-fp16 to skip), int8 (export --int8), int8 with 8-bit weights.

The runners cut each text batch after its last end token (the towers are causal), so short
captions run over ~20 positions instead of 77. Torch and onnxruntime intra-op threads are set to
--threads. Every backend is warmed up (a full pass for torch.compile, which specialises on
shapes), then --repeats rounds run every backend in turn (images, then texts); figures are
medians over rounds. A run during which other processes used more than --max-other of the CPUs
(from /proc/stat) is retaken after --wait seconds, at most --retries times. Cosines are per
sample against the baseline's fp32 embeddings. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BASELINE = "open_clip eager fp32"


@dataclass
class Backend:
    """One engine and precision: its encode functions and what it measured."""

    name: str
    encode_images: Callable[[np.ndarray], np.ndarray]
    encode_texts: Callable[[np.ndarray], np.ndarray]
    full_warmup: bool = False  # torch.compile: specialises on each new shape
    seconds: dict = field(default_factory=lambda: {"images": [], "texts": []})
    other: dict = field(default_factory=lambda: {"images": [], "texts": []})
    retaken: dict = field(default_factory=lambda: {"images": 0, "texts": 0})
    emb: dict = field(default_factory=dict)  # modality -> (N, D) from the first round


def build_inputs(image_size: int, tokenizer, n_images: int, n_texts: int, seed: int):
    """(N, 3, S, S) CLIP-normalised demo garments and (M, context) int64 ids of demo captions."""
    from fklip.data.archive import normalized_from_pixels
    from fklip.data.demo import caption_and_phrases, sample_garment
    from fklip.data.garments import draw_garment

    rng = np.random.default_rng(seed)
    pixels = np.stack([normalized_from_pixels(draw_garment(sample_garment(rng), image_size, rng)[0])
                       for _ in range(n_images)])
    captions = [caption_and_phrases(sample_garment(rng), rng)[0] for _ in range(n_texts)]
    return pixels, tokenizer(captions).numpy(), captions


def make_exports(ckpt: Path, tmp: Path, onnx_fp16: bool) -> tuple[dict[str, Path], dict]:
    """{"fp32", "fp16", "int8", "int8-8bit"} export folders ("int8" is the fp32 folder, which holds
    the --int8 graphs, when they passed their tolerance; "int8-8bit" holds onnxruntime's default
    8-bit int8 weights for comparison), and what building them took."""
    from export.manifest import MANIFEST_NAME, file_entry
    from export.onnx_export import ExportError
    from export.pipeline import run_export
    from export.quantize import TOWER_RECIPES, int8_cpu_from_onnx
    from fklip.config import ExportConfig

    folders, facts = {"fp32": tmp / "export"}, {}
    started = time.perf_counter()
    try:
        manifest = run_export(ExportConfig(checkpoint=ckpt, out=folders["fp32"], int8=True))
        facts["int8_parity"] = {t: manifest["int8"][t]["parity"]["random"] for t in ("image", "text")}
    except ExportError as e:  # --int8 outside its tolerance: measured without it, and said so
        facts["int8_export_error"] = str(e)
        manifest = run_export(ExportConfig(checkpoint=ckpt, out=folders["fp32"], force=True))
    facts["export_fp32_int8_s"] = round(time.perf_counter() - started, 1)
    if onnx_fp16:
        started = time.perf_counter()
        folders["fp16"] = tmp / "export-fp16"
        run_export(ExportConfig(checkpoint=ckpt, out=folders["fp16"], precision="fp16"))
        facts["export_fp16_s"] = round(time.perf_counter() - started, 1)

    # the fp32 graphs (hard links) with onnxruntime's default 8-bit int8 weights as the int8 pair
    cpu = folders["int8-8bit"] = tmp / "export-int8-8bit"
    cpu.mkdir()
    has_int8 = manifest["int8"] is not None
    manifest["int8"] = dict(manifest["int8"] or {})
    for tower in ("image", "text"):
        os.link(folders["fp32"] / f"{tower}.onnx", cpu / f"{tower}.onnx")
        dst = cpu / f"{tower}.int8.onnx"
        info = int8_cpu_from_onnx(folders["fp32"] / f"{tower}.onnx", dst, "int8-8bit")
        manifest["int8"][tower] = {**file_entry(dst), **info}
    (cpu / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    facts["int8_recipes"] = dict(TOWER_RECIPES)
    if has_int8:
        folders["int8"] = folders["fp32"]
    return folders, facts


def machine_cpu_seconds() -> float:
    """CPU seconds used by everything on the machine (busy and steal), from /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except OSError:
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def one_pass(encode: Callable, x: np.ndarray, batch: int) -> tuple[float, float, np.ndarray]:
    """Wall seconds for all of `x` in batches, the share of the CPUs other processes used
    meanwhile (0.5: one of two cores busy), and the (N, D) embeddings."""
    machine, own, start = machine_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    parts = [encode(x[i:i + batch]) for i in range(0, len(x), batch)]
    wall = time.perf_counter() - start
    other = (machine_cpu_seconds() - machine) - (sum(os.times()[:2]) - own)
    return wall, max(0.0, other / (wall * (os.cpu_count() or 1))), np.concatenate(parts)


def measure(backends: list[Backend], inputs: dict[str, np.ndarray], batch: int, repeats: int,
            max_other: float, retries: int, wait_s: float) -> None:
    """Warm up, then `repeats` rounds of every backend in turn; fills each Backend's figures."""
    for b in backends:
        for modality, x in inputs.items():
            fn = b.encode_images if modality == "images" else b.encode_texts
            if b.full_warmup:
                one_pass(fn, x, batch)
            else:
                fn(x[:batch])
    for _ in range(repeats):
        for modality, x in inputs.items():
            for b in backends:
                fn = b.encode_images if modality == "images" else b.encode_texts
                for attempt in range(retries + 1):
                    seconds, share, emb = one_pass(fn, x, batch)
                    if share <= max_other or seconds < 1.0 or attempt == retries:
                        break
                    b.retaken[modality] += 1
                    time.sleep(wait_s)
                b.seconds[modality].append(seconds)
                b.other[modality].append(share)
                b.emb.setdefault(modality, emb)


def cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (got.astype(np.float64) * ref).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)


def summary(backends: list[Backend], counts: dict[str, int]) -> dict:
    """{backend: {images_per_s, images_x, images_min_cos, ..., texts_...}} against the baseline."""
    base = backends[0]
    out = {}
    for b in backends:
        row = {}
        for modality, n in counts.items():
            per_s = n / statistics.median(b.seconds[modality])
            base_per_s = n / statistics.median(base.seconds[modality])
            cos = cosines(b.emb[modality], base.emb[modality])
            row.update({f"{modality}_per_s": round(per_s, 2), f"{modality}_x": round(per_s / base_per_s, 3),
                        f"{modality}_min_cos": round(float(cos.min()), 6),
                        f"{modality}_mean_cos": round(float(cos.mean()), 6),
                        f"{modality}_s": [round(s, 3) for s in b.seconds[modality]],
                        f"{modality}_other_cpu": round(max(b.other[modality]), 3),
                        f"{modality}_retaken": b.retaken[modality]})
        out[b.name] = row
    return out


def environment(threads: int) -> dict:
    import onnx
    import onnxruntime
    import open_clip

    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": threads,
            "isa": sorted(f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                                   "avx_vnni", "avx512_bf16", "amx_bf16")),
            "torch": str(torch.__version__), "torch_threads": torch.get_num_threads(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other",
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "open_clip": str(open_clip.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-precisions", nargs="+", default=["fp32"], choices=["fp32", "amp", "bf16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runner")
    parser.add_argument("--no-onnx-fp16", action="store_true", help="skip the fp16 export")
    parser.add_argument("--max-other", type=float, default=0.10,
                        help="retake a run if other processes used more than this share of the CPUs")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait before a retake")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from engines.base import RunnerConfig, build_runner
    from fklip.model import ModelSpec, build_model, build_tokenizer, save_checkpoint

    spec = ModelSpec.from_name(args.model)
    torch.manual_seed(args.seed)
    model = build_model(spec)  # random weights, fp32, eval
    pixels, ids, _ = build_inputs(spec.image_size, build_tokenizer(spec), args.images, args.texts, args.seed)
    lengths = ids.argmax(1) + 1  # (M,) positions up to each caption's end token

    @torch.no_grad()
    def eager_images(x: np.ndarray) -> np.ndarray:
        return F.normalize(model.encode_image(torch.from_numpy(x)), dim=-1).numpy()

    @torch.no_grad()
    def eager_texts(x: np.ndarray) -> np.ndarray:
        return F.normalize(model.encode_text(torch.from_numpy(x)), dim=-1).numpy()  # (B, 77)

    tmp = Path(tempfile.mkdtemp(prefix="fklip-bench-engines-"))
    try:
        ckpt = tmp / f"{args.model}.pt"
        save_checkpoint(ckpt, model, spec)
        setup_started = time.perf_counter()
        folders, facts = make_exports(ckpt, tmp, not args.no_onnx_fp16)
        configs = {f"torch {p}": RunnerConfig("torch", checkpoint=ckpt, precision=p, threads=args.threads)
                   for p in args.torch_precisions}
        if not args.no_compile:
            configs["torch fp32 compile"] = RunnerConfig("torch", checkpoint=ckpt, compile=True,
                                                         threads=args.threads)
        configs["onnx fp32"] = RunnerConfig("onnx", engine_dir=folders["fp32"], threads=args.threads)
        if "fp16" in folders:
            configs["onnx fp16"] = RunnerConfig("onnx", engine_dir=folders["fp16"], threads=args.threads)
        if "int8" in folders:
            configs["onnx int8 (export --int8)"] = RunnerConfig("onnx", engine_dir=folders["int8"], int8=True,
                                                                threads=args.threads)
        configs["onnx int8, 8-bit weights"] = RunnerConfig("onnx", engine_dir=folders["int8-8bit"],
                                                           int8=True, threads=args.threads)
        with contextlib.ExitStack() as stack:
            runners = {name: stack.enter_context(build_runner(cfg)) for name, cfg in configs.items()}
            backends = [Backend(BASELINE, eager_images, eager_texts)]
            backends += [Backend(name, r.encode_images, r.encode_texts, full_warmup=configs[name].compile)
                         for name, r in runners.items()]
            inputs = {"images": pixels, "texts": ids}
            started = time.perf_counter()
            measure(backends, inputs, args.batch, args.repeats, args.max_other, args.retries, args.wait)
            facts.update(setup_s=round(started - setup_started, 1),
                         measure_s=round(time.perf_counter() - started, 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = summary(backends, {"images": len(pixels), "texts": len(ids)})
    env = environment(args.threads)
    print(f"{args.model}, random weights; {len(pixels)} demo images ({spec.image_size} px), "
          f"{len(ids)} demo captions ({int(lengths.min())}-{int(lengths.max())} tokens, median "
          f"{int(np.median(lengths))}); batch {args.batch}; {args.threads} threads; median of "
          f"{args.repeats}; {env['cpu']} ({env['cpus']} CPUs)")
    print(f"{'backend':<30}{'img/s':>8}{'x':>7}{'min cos':>10}{'mean cos':>10}"
          f"{'text/s':>9}{'x':>7}{'min cos':>10}{'mean cos':>10}{'other':>7}{'retaken':>8}")
    for name, r in results.items():
        other = max(r["images_other_cpu"], r["texts_other_cpu"])
        print(f"{name:<30}{r['images_per_s']:>8.2f}{r['images_x']:>7.2f}{r['images_min_cos']:>10.6f}"
              f"{r['images_mean_cos']:>10.6f}{r['texts_per_s']:>9.1f}{r['texts_x']:>7.2f}"
              f"{r['texts_min_cos']:>10.6f}{r['texts_mean_cos']:>10.6f}{other:>6.0%}"
              f"{r['images_retaken'] + r['texts_retaken']:>8}")
    print("x: against the baseline in this run; other: the largest share of the CPUs other processes "
          "used during a kept run")
    best = max((n for n in results if n != BASELINE and results[n]["images_min_cos"] >= 0.999),
               key=lambda n: results[n]["images_x"], default=None)
    result = {"benchmark": "engines_cpu", "model": args.model, "weights": "random", "seed": args.seed,
              "n_images": len(pixels), "n_texts": len(ids), "image_size": spec.image_size,
              "text_tokens": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                              "max": int(lengths.max())},
              "batch": args.batch, "repeats": args.repeats, "baseline": BASELINE,
              "best_images_min_cos_0_999": best, "results": results, **facts, **env}
    line = json.dumps(result)
    print(line)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
