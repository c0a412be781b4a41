"""Benchmark discipline shared by `fklip bench` and the scripts in benchmarks/: warm-up, interleaved
rounds, medians, the CPU load of other processes, the environment; and exact top-k against the
plain `torch.mm` + `torch.topk` a user would write.

Only torch and fklip's core are imported (engines/measure.py times the encoders).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from fklip.retrieval import tile_sizes, topk_chunked
from fklip.retrieval.fused import resolve_method

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")
TOPK_TOLERANCE = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # plain vs fklip values


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_cpu_seconds() -> float:
    """CPU seconds used by everything on the machine (busy and hypervisor steal), from
    /proc/stat; NaN where there is none."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except OSError:
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(run: Callable[[], object], device: str | torch.device = "cpu") -> tuple[float, float]:
    """Wall seconds of one run (synchronised on CUDA), and the share of the machine's CPUs that
    other processes (or the hypervisor) used meanwhile: 0 when idle, 0.5 when one of two cores was busy."""
    sync(device)
    machine, own, start = machine_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    run()
    sync(device)
    wall = time.perf_counter() - start
    other = (machine_cpu_seconds() - machine) - (sum(os.times()[:2]) - own)
    return wall, min(1.0, max(0.0, other / (wall * (os.cpu_count() or 1))))  # ticks of 10 ms: clamp


def timed_quietly(run: Callable[[], object], device: str | torch.device = "cpu", max_other: float = 1.0,
                  retries: int = 0, wait_s: float = 0.0, settle_s: float = 0.0) -> tuple[float, float, int]:
    """`timed(run, device)`, each try after `settle_s` seconds idle, retaken after `wait_s` while
    other processes used more than `max_other` of the CPUs: at most `retries` times, the last try
    kept whatever the load, and runs under a second never retaken (/proc/stat counts in ticks of
    10 ms). Returns (seconds, other processes' CPU share, retakes)."""
    attempt = 0
    while True:
        time.sleep(settle_s)
        seconds, share = timed(run, device)
        if share <= max_other or seconds < 1.0 or attempt >= retries:
            return seconds, share, attempt
        attempt += 1
        time.sleep(wait_s)


def measure_variants(variants: dict[str, Callable[[], object]], repeats: int, device: str | torch.device = "cpu",
                     max_other: float = 1.0, retries: int = 0, wait_s: float = 0.0) -> tuple[dict, dict, dict]:
    """Warm every variant up once, then `repeats` rounds of all variants in turn. A run during
    which other processes took more than `max_other` of the CPUs is discarded and retaken after
    `wait_s` (at most `retries` times; the last try is kept whatever the load; runs under a
    second are never retaken, as /proc/stat counts in ticks of 10 ms).
    Returns {name: [seconds]}, {name: [other processes' CPU share]}, {name: discarded runs}."""
    for run in variants.values():
        run()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    other: dict[str, list[float]] = {name: [] for name in variants}
    discarded = {name: 0 for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            seconds, share, retakes = timed_quietly(run, device, max_other, retries, wait_s)
            discarded[name] += retakes
            times[name].append(seconds)
            other[name].append(share)
    return times, other, discarded


def cpu_facts() -> dict:
    """{"cpu": model name, "cpus": logical CPUs, "isa": the vector extensions that matter here}."""
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
    return {"cpu": cpu, "cpus": os.cpu_count(), "isa": sorted(f for f in flags if f in ISA_FLAGS)}


def _version(*distributions: str) -> str | None:
    """The installed version of the first distribution found (read from metadata: nothing is imported)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(device: str = "cpu", threads: int | None = None, command: str | None = None) -> dict:
    """Machine, GPU, library versions, threads, date and command, for the JSON line."""
    import numpy as np

    env = {**cpu_facts(), "device": device, "gpu": None, "cuda": torch.version.cuda,
           "threads": threads, "torch_threads": torch.get_num_threads(),
           "blas": "mkl" if torch.backends.mkl.is_available() else "other",
           "torch": str(torch.__version__), "open_clip": _version("open_clip_torch"),
           "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"), "onnx": _version("onnx"),
           "tensorrt": _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), "numpy": np.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command}
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(index)
        env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
    return env


# ---- exact top-k against plain torch

def features(n: int, dim: int, seed: int, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, dim) random L2-normalised rows, the same for a seed on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, dtype)


def plain_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual chunked top-k, over the same tiles as `topk_chunked`: `torch.mm` in the
    features' dtype, `torch.topk` per score chunk, concatenate with the running best, topk again.
    No tie rule (topk's order among equal scores is arbitrary)."""
    tile_q, tile_g = tile_sizes(len(queries), len(gallery))
    out_values, out_indices = [], []
    for q0 in range(0, len(queries), tile_q):
        query = queries[q0:q0 + tile_q]
        best_values = best_indices = None
        for g0 in range(0, len(gallery), tile_g):
            values, indices = torch.topk(query @ gallery[g0:g0 + tile_g].T, min(k, len(gallery) - g0), dim=1)
            indices += g0
            if best_values is not None:
                values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
                values, pos = torch.topk(values, k, dim=1)
                indices = indices.gather(1, pos)
            best_values, best_indices = values, indices
        out_values.append(best_values)
        out_indices.append(best_indices)
    return torch.cat(out_values), torch.cat(out_indices)


def bench_topk(n_queries: int, n_gallery: int, dim: int, k: int, repeats: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Queries/s of `topk_chunked` against `plain_topk` on random unit features, measured in turn
    (one warm-up each, median of `repeats`), with the two results' values compared."""
    queries, gallery = features(n_queries, dim, seed, device, dtype), features(n_gallery, dim, seed + 1, device, dtype)
    fklip_values, fklip_indices = topk_chunked(queries, gallery, k)
    plain_values, plain_indices = plain_topk(queries, gallery, k)
    diff = float((plain_values.float() - fklip_values).abs().max())
    variants = {"fklip": lambda: topk_chunked(queries, gallery, k), "plain": lambda: plain_topk(queries, gallery, k)}
    method = resolve_method(queries, gallery, k, len(gallery))  # what topk_chunked runs here
    if method == "fused":  # time the torch path too
        variants["fklip torch path"] = lambda: topk_chunked(queries, gallery, k, method="torch")
    times, other, _ = measure_variants(variants, repeats, device)
    per_s = {name: n_queries / statistics.median(t) for name, t in times.items()}
    return {"queries": n_queries, "gallery": n_gallery, "dim": dim, "k": k, "dtype": str(dtype).split(".")[-1],
            "device": str(device), "baseline": "torch.mm + torch.topk per chunk", "fklip_method": method,
            "fklip_torch_path_queries_per_s": (round(per_s["fklip torch path"], 2)
                                               if "fklip torch path" in per_s else None),
            "fklip_queries_per_s": round(per_s["fklip"], 2), "plain_queries_per_s": round(per_s["plain"], 2),
            "x": round(per_s["fklip"] / per_s["plain"], 3),
            "fklip_s": [round(s, 4) for s in times["fklip"]], "plain_s": [round(s, 4) for s in times["plain"]],
            "values_max_abs_diff": diff, "values_equal": diff <= TOPK_TOLERANCE[dtype],
            "rows_with_other_indices": int((plain_indices != fklip_indices).any(dim=1).sum()),
            "other_cpu": round(max(max(v) for v in other.values()), 3)}
