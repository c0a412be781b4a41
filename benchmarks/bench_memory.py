"""Memory of exact top-k against a gallery far larger than the chunks: it is set by the chunks.

Writes a memory-mapped float16 gallery of N random unit vectors (1,000,000 x 512 = 1 GiB by
default) and searches Q queries against it with `fklip.retrieval.topk_chunked`, reporting the
anonymous resident memory of the process before and at its peak during the search, the time, and the time extrapolated to
100,000 queries (the cost is linear in the queries).

    python benchmarks/bench_memory.py [--n 1000000] [--queries 2000] [--dim 512]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fklip.timing import timed_median


def anon_rss_mib() -> float:
    """Anonymous resident memory (RssAnon): what the process allocated, without the page cache
    of the memory-mapped gallery, which the kernel can drop at any time."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler(threading.Thread):
    """Samples RssAnon every 20 ms in the background; `.peak` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = anon_rss_mib(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, anon_rss_mib())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, anon_rss_mib())


def main() -> None:
    from fklip.retrieval import topk_chunked

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--query-chunk", type=int, default=2048)
    ap.add_argument("--gallery-chunk", type=int, default=32768)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gallery.npy"
        gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.n, args.dim))
        for start in range(0, args.n, 65536):  # written in blocks: never the whole gallery in memory
            block = rng.standard_normal((min(65536, args.n - start), args.dim), dtype=np.float32)
            gallery[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        gallery.flush()
        del gallery
        gallery = np.load(path, mmap_mode="r")
        queries = torch.from_numpy(np.array(gallery[:args.queries], dtype=np.float32))
        before = anon_rss_mib()
        sampler = PeakSampler()
        sampler.start()
        seconds, (values, indices) = timed_median(  # once, no warm-up: the peak of a first search
            lambda: topk_chunked(queries, gallery, 10, query_chunk=args.query_chunk,
                                 gallery_chunk=args.gallery_chunk), warmup=0)
        after = sampler.stop()
        assert torch.equal(indices[:, 0], torch.arange(args.queries))  # each query finds itself first
    gallery_mib = args.n * args.dim * 2 / 2**20
    chunk_mib = args.query_chunk * args.gallery_chunk * 4 / 2**20
    print(f"{args.queries} x {args.n} x {args.dim} (float16 memmap gallery, {gallery_mib:.0f} MiB), "
          f"chunks {args.query_chunk} x {args.gallery_chunk} ({chunk_mib:.0f} MiB of float32 scores)")
    print(f"  time {seconds:.1f} s; extrapolated to 100,000 queries: {seconds * 100_000 / args.queries / 60:.1f} min")
    print(f"  anonymous resident memory {before:.0f} MiB before the search, peak {after:.0f} MiB during it "
          f"(+{after - before:.0f} MiB)")
    print(json.dumps({"benchmark": "memory", "n": args.n, "queries": args.queries, "dim": args.dim,
                      "seconds": seconds, "anon_rss_mib_before": before, "anon_rss_mib_peak": after,
                      "gallery_mib": gallery_mib, "score_chunk_mib": chunk_mib,
                      "threads": torch.get_num_threads(),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
