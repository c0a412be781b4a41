"""Training throughput on CPU: samples/s of `fklip train` with and without the concept loss.

For each model (fklip-tiny at 64 px, ViT-B-32 at 224 px, random weights) it generates a demo
dataset at the model's image size and runs one epoch of `fklip train` twice: contrastive only,
and with --is-concept --is-data-concept (data and KB concepts, 10 slots). The epoch time excludes
the knowledge refresh and the validation pass; the refresh is reported on its own.

    python benchmarks/bench_train.py [--steps 6] [--batch-size 32] [--models fklip-tiny ViT-B-32]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SIZES = {"fklip-tiny": 64, "ViT-B-32": 224}


def run(model: str, steps: int, batch: int, concept: bool, data, logs: Path) -> dict:
    from fklip.config import TrainConfig
    from fklip.train import run_train

    cfg = TrainConfig(
        train_data=data.train_queries, train_img=data.train_images, model=model,
        txt_id_filename=data.concept_queries, kb_txt_id_filename=data.kb_concept_queries,
        concept_fathers=data.concept_fathers, kb_concept_fathers=data.kb_concept_fathers,
        img_data_sets=(data.kb_images,), is_concept=concept, is_data_concept=concept, warmup=2,
        batch_size=batch, eval_batch_size=64, lr=1e-5, wd=0.001, epochs=1, report_to="none",
        logs=logs, name=f"{model}-{'concept' if concept else 'contrastive'}")
    t0 = time.perf_counter()
    summary = run_train(cfg)
    total = time.perf_counter() - t0
    epoch_s = summary["epochs"][0]["epoch_s"]
    batches = json.loads((Path(summary["run_dir"]) / "params.json").read_text())["batches_per_epoch"]
    return {"samples_per_s": batches * batch / epoch_s, "batches": batches, "epoch_s": epoch_s,
            "total_s": total}


def main() -> None:
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=list(SIZES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            # products have 1..3 views (2 on average): about `steps` full batches
            data = generate_demo(DemoDataConfig(out=Path(tmp) / model, seed=0, size=SIZES[model],
                                                train=max(args.steps * args.batch_size // 2, 8), val=4, kb=64))

            for concept in (False, True):  # warm-up: first-step costs (kernel selection per shape)
                run(model, args.steps, args.batch_size, concept, data, Path(tmp) / f"warmup-{concept}")
            for concept in (False, True):
                name = f"{model} {'contrastive + concept' if concept else 'contrastive only'}"
                r = run(model, args.steps, args.batch_size, concept, data, Path(tmp) / "logs")
                results[name] = r
    base = {m: results[f"{m} contrastive only"]["samples_per_s"] for m in args.models}
    print(f"fklip train throughput, CPU, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} steps, fp32")
    for name, r in results.items():
        model = name.split()[0]
        print(f"  {name:<36} {r['samples_per_s']:8.1f} samples/s  ({r['samples_per_s'] / base[model]:.2f}x of "
              f"contrastive only)")
    print(json.dumps({"benchmark": "train", "results": results, "batch_size": args.batch_size,
                      "steps": args.steps, "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                      "platform": platform.platform(),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
