"""`fklip predict` end to end on FashionGen-val-sized JSON-lines features, against the original.

The original eval/predict_evaluate.py (spec 4.2) parses every line with json.loads, computes each
query's scores with a matrix product, then builds (id, score) tuples for every candidate and sorts
them with Python's stable sort. That is timed on a subset of queries and extrapolated linearly
(its cost is per query; the matrix product, done on a GPU there, is not counted). fklip's whole command is timed in full: parsing, exact top-k both ways,
writing predictions and scores.

    python benchmarks/bench_predict.py [--n 32528] [--dim 512] [--subset 300]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fklip.timing import cpu_facts, timed, timed_median


def make_files(folder: Path, n: int, dim: int, seed: int = 0) -> dict:
    from fklip.data.features import write_features
    from fklip.io import write_jsonl

    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    # captions correlated with their image, so recall is not trivially zero
    txt = img + 2.0 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    image_ids = [str(100000 + i) for i in range(n)]
    query_ids = list(range(n))
    paths = {"img": folder / "imgs.img_feat.jsonl", "txt": folder / "texts.txt_feat.jsonl",
             "queries": folder / "val_queries.jsonl", "images": folder / "val_images.jsonl"}
    write_features(paths["img"], image_ids, img, id_field="image_id")
    write_features(paths["txt"], query_ids, txt, id_field="query_id")
    write_jsonl(paths["queries"], ({"query_id": q, "query_text": "", "item_ids": [i]}
                                   for q, i in zip(query_ids, image_ids)))
    write_jsonl(paths["images"], ({"image_id": i, "item_ids": [q]} for q, i in zip(query_ids, image_ids)))
    return paths


def _read_features(path: Path) -> tuple[list, torch.Tensor]:
    """The original's reading: json.loads on every line, the features into one tensor."""
    ids, rows = [], []
    with open(path) as f:
        for line in f:
            obj = json.loads(line)
            ids.append(obj["query_id"] if "query_id" in obj else obj["image_id"])
            rows.append(obj["feature"])
    return ids, torch.tensor(rows, dtype=torch.float32)


def _sort_each(g_ids: list, scores: list[list[float]], top_k: int) -> None:
    """The original's per-query tuple sort over every candidate."""
    for row in scores:
        pairs = sorted(zip(g_ids, row), key=lambda x: x[1], reverse=True)
        _ = [gid for gid, _ in pairs[:top_k]]


def original_algorithm(paths: dict, subset: int, top_k: int = 10) -> dict:
    """The original's steps, timed: json parsing of both files, then per-query tuple sorts."""
    parse_s, feats = timed_median(lambda: {name: _read_features(paths[name]) for name in ("img", "txt")}, warmup=0)
    per_query = {}
    for name, (q_name, g_name) in {"t2i": ("txt", "img"), "i2t": ("img", "txt")}.items():
        _, q = feats[q_name]
        g_ids, g = feats[g_name]
        scores = (q[:subset] @ g.T).tolist()  # the product, in one go (on the GPU in the original)
        per_query[name] = timed(lambda: _sort_each(g_ids, scores, top_k))[0] / subset  # timed: the sorts
    return {"parse_s": parse_s, "per_query_s": per_query, "queries": len(feats["txt"][0]),
            "images": len(feats["img"][0])}


def fklip_predict(paths: dict, out: Path) -> float:
    cmd = [sys.executable, "-m", "fklip", "predict", "--image-feats", str(paths["img"]),
           "--text-feats", str(paths["txt"]), "--top-k", "10",
           "--output-images", str(out / "imgs_pred.jsonl"), "--output-texts", str(out / "txts_pred.jsonl"),
           "--text-standard-path", str(paths["queries"]), "--image-standard-path", str(paths["images"]),
           "--text-out-path", str(out / "text.json"), "--image-out-path", str(out / "image.json")]
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32528)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--subset", type=int, default=300, help="queries per direction timed for the original")
    args = ap.parse_args()
    cpu = cpu_facts()["cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_s, paths = timed_median(lambda: make_files(folder, args.n, args.dim), warmup=0)
        fklip_s = fklip_predict(paths, folder / "out")
        scores = {name: json.loads((folder / "out" / f"{name}.json").read_text())["scoreJson"]
                  for name in ("text", "image")}
        orig = original_algorithm(paths, min(args.subset, args.n))
    orig_sort_s = sum(orig["per_query_s"][d] * args.n for d in ("t2i", "i2t"))
    orig_total_s = orig["parse_s"] + orig_sort_s
    rows = [("write features (fklip, both files)", make_s),
            ("fklip predict, whole command", fklip_s),
            ("original: json.loads parsing", orig["parse_s"]),
            (f"original: tuple sorts, {args.subset} queries/direction x {args.n} extrapolated", orig_sort_s),
            ("original: total (estimate)", orig_total_s)]
    print(f"{args.n} x {args.n} x {args.dim}, top-10 both ways, {torch.get_num_threads()} threads, {cpu}")
    for name, secs in rows:
        print(f"  {name:<72} {secs:9.1f} s")
    print(f"  speed-up of fklip predict over the original: {orig_total_s / fklip_s:.1f}x")
    print(json.dumps({
        "benchmark": "predict", "n": args.n, "dim": args.dim, "fklip_predict_s": fklip_s,
        "original_parse_s": orig["parse_s"], "original_sort_s_extrapolated": orig_sort_s,
        "original_total_s_estimate": orig_total_s, "speedup": orig_total_s / fklip_s,
        "subset": args.subset, "scores": scores, "threads": torch.get_num_threads(), "cpu": cpu,
        "torch": str(torch.__version__), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))


if __name__ == "__main__":
    main()
