"""Exact top-k in both retrieval directions against the bare matrix products (issue 3).

    python benchmarks/bench_retrieval.py [--n 20000] [--dim 512] [--k 10] [--repeats 3]

Random L2-normalised float32 features, `n` texts x `n` images x `dim`, top-k text->image and
image->text. Every variant runs once to warm up, then `repeats` rounds run all variants one after
another (so load from other processes hits them alike), and each figure is the median over rounds.
On a shared machine, a run during which other processes used more than --max-other of the CPUs
(measured from /proc/stat) is retaken after --wait seconds, at most --retries times; the table
shows how many runs were retaken and the largest share of other load among the runs kept.

* bare, full: `torch.mm(text, image.T, out=...)` and the image->text product, into a preallocated
  (n, n) buffer: no selection at all;
* bare, tiled: the same tile matmuls `topk_chunked` issues (`tile_sizes`), in both directions,
  into one reused buffer; the baseline is the faster of the two bare figures;
* fklip both ways: `topk_both_ways`, one matmul per tile for both directions;
* fklip two calls: `topk_chunked` text->image plus `topk_chunked` image->text;
* plain torch: per direction, chunked `torch.topk` on each score chunk plus a merge, no tie rule.

Before timing, the results are checked: both-ways equals the two calls bitwise, and the plain
topk agrees on the values (its indices may differ only among tied scores). Prints a table, then
one JSON line with every figure, ratio and the environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from engines.measure import features, plain_topk
from fklip.retrieval import SCORE_TILE, tile_sizes, topk_both_ways, topk_chunked
from fklip.timing import cpu_facts, measure_variants


def bare_full(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """Both directions as one full product each, into a preallocated (n, n) buffer."""
    torch.mm(a, b.T, out=out)
    torch.mm(b, a.T, out=out)


def bare_tiled(a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor) -> None:
    """The tile matmuls of two `topk_chunked` calls (default chunks, so one gallery chunk up to
    65,536 rows), with no selection."""
    for queries, gallery in ((a, b), (b, a)):
        tile_q, tile_g = tile_sizes(len(queries), len(gallery))
        for q0 in range(0, len(queries), tile_q):
            query = queries[q0:q0 + tile_q]
            for g0 in range(0, len(gallery), tile_g):
                rows = gallery[g0:g0 + tile_g]
                torch.mm(query, rows.T, out=buffer[:len(query) * len(rows)].view(len(query), len(rows)))


def check(text: torch.Tensor, image: torch.Tensor, k: int) -> dict:
    """Exactness at the benchmark size: both-ways vs two calls (bitwise), and plain topk vs fklip
    (values bitwise; indices in rows without ties inside the top k + 1)."""
    both = topk_both_ways(text, image, k)
    two = (topk_chunked(text, image, k), topk_chunked(image, text, k))
    identical = all(torch.equal(x[1], y[1]) and torch.equal(x[0].view(torch.int32), y[0].view(torch.int32))
                    for x, y in zip(both, two))
    plain_values_equal, plain_index_rows_differ = True, 0
    for (values, indices), (queries, gallery) in zip(both, ((text, image), (image, text))):
        plain_values, plain_indices = plain_topk(queries, gallery, k)
        plain_values_equal &= torch.equal(plain_values + 0.0, values)
        plain_index_rows_differ += int((plain_indices != indices).any(dim=1).sum())
    return {"both_ways_equals_two_calls": identical, "plain_topk_values_equal": plain_values_equal,
            "plain_topk_rows_with_other_indices": plain_index_rows_differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="texts and images (each)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-other", type=float, default=0.05,
                        help="retake a run if other processes used more than this share of the CPUs")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--wait", type=float, default=20.0, help="seconds to wait before a retake")
    args = parser.parse_args()
    device = torch.device(args.device)
    text, image = features(args.n, args.dim, 0, device), features(args.n, args.dim, 1, device)
    k = args.k

    exact = check(text, image, k)
    full_out = torch.empty(args.n, args.n, device=device)  # (n, n) float32
    tile_buffer = torch.empty(SCORE_TILE[0] * SCORE_TILE[1], device=device)
    variants = {
        "bare, full products": lambda: bare_full(text, image, full_out),
        "bare, tiled products": lambda: bare_tiled(text, image, tile_buffer),
        "fklip topk_both_ways": lambda: topk_both_ways(text, image, k),
        "fklip topk_chunked x2": lambda: (topk_chunked(text, image, k), topk_chunked(image, text, k)),
        "plain torch topk x2": lambda: (plain_topk(text, image, k), plain_topk(image, text, k)),
    }
    timings = measure_variants(variants, args.repeats, device, args.max_other, args.retries, args.wait)
    times, other, discarded = timings.seconds, timings.other, timings.retaken
    median = {name: timings.median(name) for name in times}
    baseline_name = min(("bare, full products", "bare, tiled products"), key=median.__getitem__)
    baseline = median[baseline_name]

    print(f"{args.n} texts x {args.n} images x {args.dim}, top-{k} both directions, float32, "
          f"{args.device}, {torch.get_num_threads()} threads; median of {args.repeats}; score "
          "tiles {} x {}".format(*tile_sizes(args.n, args.n)))
    print(f"{'variant':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'x baseline':>12}"
          f"{'other CPU':>11}{'retaken':>9}")
    for name, t in times.items():
        mark = "  <- baseline" if name == baseline_name else ""
        print(f"{name:<24}{median[name]:>10.3f}{min(t):>9.3f}{max(t):>9.3f}"
              f"{median[name] / baseline:>12.3f}{max(other[name]):>10.1%}{discarded[name]:>9}{mark}")
    print("other CPU: the largest share of the CPUs that other processes used during a kept run")
    print("exactness: " + ", ".join(f"{key} = {value}" for key, value in exact.items()))

    keys = {"bare, full products": "bare_full", "bare, tiled products": "bare_tiled",
            "fklip topk_both_ways": "fklip_both_ways", "fklip topk_chunked x2": "fklip_two_calls",
            "plain torch topk x2": "plain_topk"}
    result = {
        "benchmark": "retrieval_topk_both_directions",
        "n_text": args.n, "n_image": args.n, "dim": args.dim, "k": k, "dtype": "float32",
        "repeats": args.repeats, "score_tile_cap": list(SCORE_TILE),
        "tiles": list(tile_sizes(args.n, args.n)),
        "median_s": {keys[name]: round(v, 4) for name, v in median.items()},
        "all_s": {keys[name]: [round(x, 4) for x in t] for name, t in times.items()},
        "baseline": keys[baseline_name],
        "ratio_to_baseline": {keys[name]: round(v / baseline, 4) for name, v in median.items()},
        **exact,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "device": args.device if device.type != "cuda" else torch.cuda.get_device_name(device),
        **cpu_facts(), "python": platform.python_version(),
        "other_cpu_share": {keys[name]: [round(x, 3) for x in v] for name, v in other.items()},
        "retaken": {keys[name]: v for name, v in discarded.items()}, "max_other": args.max_other,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
