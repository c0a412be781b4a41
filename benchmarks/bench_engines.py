"""Images/s and texts/s of each engine and precision against open_clip eager fp32, on the CPU.

    python benchmarks/bench_engines.py [--model ViT-B-32] [--images 128] [--texts 256] [--batch 32]
                                       [--repeats 3] [--threads 2] [--json-out PATH]

A model with random weights (seeded) is saved as an fklip checkpoint and exported into a temp
folder with `export.pipeline.run_export` (fp32 with --int8: 7-bit int8 weights for the image
tower, uint8 weights for the text tower; and fp16). A second folder holds the same fp32 graphs
with onnxruntime's default 8-bit int8 weights, for comparison. Inputs: demo garments drawn at
the model's image size (`fklip.data.garments`), CLIP-normalised float32, and demo captions
(`fklip.data.demo_dataset.caption_and_phrases`) tokenised by the fklip tokenizer.

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
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from engines.measure import (
    Backend,
    build_inputs,
    make_exports,
    measure,
    open_clip_backend,
    summary,
    token_lengths,
)
from fklip.io import atomic_output
from fklip.timing import environment

BASELINE = "open_clip eager fp32"


def add_int8_8bit(folders: dict[str, Path], tmp: Path) -> None:
    """A folder with the fp32 graphs (hard links) and onnxruntime's default 8-bit int8 weights as
    the int8 pair, for comparison with the --int8 recipe (folders["int8-8bit"])."""
    import dataclasses

    from export.manifest import TOWER_NAMES, ExportManifest, Int8Entry, file_entry
    from export.quantize import int8_cpu_from_onnx

    manifest = ExportManifest.read(folders["fp32"])
    cpu = folders["int8-8bit"] = tmp / "export-int8-8bit"
    cpu.mkdir()
    int8 = {}
    for tower in TOWER_NAMES:
        os.link(folders["fp32"] / f"{tower}.onnx", cpu / f"{tower}.onnx")
        dst = cpu / f"{tower}.int8.onnx"
        info = int8_cpu_from_onnx(folders["fp32"] / f"{tower}.onnx", dst, "int8-8bit")
        int8[tower] = Int8Entry(**file_entry(dst), **info)
    dataclasses.replace(manifest, int8=int8).write(cpu)


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

    from engines.base import build_runner
    from fklip.config import EncodeConfig
    from fklip.model import ModelSpec, build_model, build_tokenizer, save_checkpoint

    spec = ModelSpec.from_name(args.model)
    torch.manual_seed(args.seed)
    model = build_model(spec)  # random weights, fp32, eval
    pixels, ids, _ = build_inputs(spec.image_size, build_tokenizer(spec), args.images, args.texts, args.seed)
    tokens = token_lengths(ids)

    tmp = Path(tempfile.mkdtemp(prefix="fklip-bench-engines-"))
    try:
        ckpt = tmp / f"{args.model}.pt"
        save_checkpoint(ckpt, model, spec)
        setup_started = time.perf_counter()
        folders, facts = make_exports(ckpt, tmp, ["fp32"] + ["fp16"] * (not args.no_onnx_fp16), int8=True,
                                      batch=args.batch)
        add_int8_8bit(folders, tmp)
        from export.quantize import TOWER_RECIPES

        facts["int8_recipes"] = dict(TOWER_RECIPES)
        configs = {f"torch {p}": EncodeConfig("torch", checkpoint=ckpt, precision=p, threads=args.threads)
                   for p in args.torch_precisions}
        if not args.no_compile:
            configs["torch fp32 compile"] = EncodeConfig("torch", checkpoint=ckpt, compile=True,
                                                         threads=args.threads)
        configs["onnx fp32"] = EncodeConfig("onnx", engine_dir=folders["fp32"], threads=args.threads)
        if "fp16" in folders:
            configs["onnx fp16"] = EncodeConfig("onnx", engine_dir=folders["fp16"], threads=args.threads)
        if "int8" in folders:
            configs["onnx int8 (export --int8)"] = EncodeConfig("onnx", engine_dir=folders["int8"], int8=True,
                                                                threads=args.threads)
        configs["onnx int8, 8-bit weights"] = EncodeConfig("onnx", engine_dir=folders["int8-8bit"],
                                                           int8=True, threads=args.threads)
        with contextlib.ExitStack() as stack:
            runners = {name: stack.enter_context(build_runner(cfg)) for name, cfg in configs.items()}
            backends = [open_clip_backend(model, name=BASELINE)]
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
    env = environment("cpu", args.threads, "python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    print(f"{args.model}, random weights; {len(pixels)} demo images ({spec.image_size} px), "
          f"{len(ids)} demo captions ({tokens['min']}-{tokens['max']} tokens, median "
          f"{tokens['median']:g}); batch {args.batch}; {args.threads} threads; median of "
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
              "text_tokens": tokens,
              "batch": args.batch, "repeats": args.repeats, "baseline": BASELINE,
              "best_images_min_cos_0_999": best, "results": results, **facts, **env}
    line = json.dumps(result)
    print(line)
    if args.json_out is not None:
        with atomic_output(args.json_out) as tmp_out:
            tmp_out.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
