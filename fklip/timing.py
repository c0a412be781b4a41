"""How fklip times things: the benchmark discipline shared by `fklip bench` (engines/bench.py),
engines/measure.py and the scripts in benchmarks/. Warm up, synchronise the device around each
timed run, interleave rounds of the variants compared (so load from other processes hits them
alike), take medians, record the CPU load of other processes and the environment.

Only torch and the standard library are imported: what is measured (encoders, exact top-k and
their baselines) is in engines/measure.py.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")


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


@dataclass
class Timings:
    """What `measure_variants` measured, per variant: the seconds of each kept run, the share of
    the CPUs other processes used during it, how many runs were retaken, and the error of each
    variant whose warm-up raised (with `keep_going`; such a variant has no runs)."""

    seconds: dict[Hashable, list[float]]
    other: dict[Hashable, list[float]]
    retaken: dict[Hashable, int]
    errors: dict[Hashable, str]

    def median(self, name: Hashable) -> float:
        return statistics.median(self.seconds[name])


def measure_variants(variants: Mapping[Hashable, Callable[[], object]], repeats: int,
                     device: str | torch.device = "cpu", max_other: float = 1.0, retries: int = 0,
                     wait_s: float = 0.0, settle_s: float = 0.0, warmup: int = 1,
                     warmups: Mapping[Hashable, Callable[[], object]] | None = None,
                     keep_going: bool = False) -> Timings:
    """Warm every variant up (`warmup` untimed runs of it, or of its own `warmups[name]`), then
    `repeats` rounds of all variants in turn, each run synchronised on `device` and started after
    `settle_s` seconds idle. A run during which other processes took more than `max_other` of the
    CPUs is discarded and retaken after `wait_s` (at most `retries` times; the last try is kept
    whatever the load; runs under a second are never retaken, as /proc/stat counts in ticks of
    10 ms). With `keep_going`, a variant that raises (warming up or timed) is left out with its
    error kept: a tile configuration a compiler rejects must not stop the others."""
    timings = Timings({}, {}, {}, {})
    kept = dict(variants)

    def failed(name: Hashable, e: Exception) -> None:
        if not keep_going:
            raise e
        timings.errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
        for figures in (timings.seconds, timings.other, timings.retaken):
            figures.pop(name, None)
        del kept[name]

    for name, run in list(kept.items()):
        warm = (warmups or {}).get(name, run)
        try:
            for _ in range(warmup):
                warm()
            sync(device)
        except Exception as e:  # noqa: BLE001 (raised again unless asked to keep going)
            failed(name, e)
            continue
        timings.seconds[name], timings.other[name], timings.retaken[name] = [], [], 0
    for _ in range(repeats):
        for name, run in list(kept.items()):
            try:
                seconds, share, retakes = timed_quietly(run, device, max_other, retries, wait_s, settle_s)
            except Exception as e:  # noqa: BLE001 (raised again unless asked to keep going)
                failed(name, e)
                continue
            timings.retaken[name] += retakes
            timings.seconds[name].append(seconds)
            timings.other[name].append(share)
    return timings


def timed_median(run: Callable[[], object], device: str | torch.device = "cpu", repeats: int = 1,
                 warmup: int = 1) -> tuple[float, object]:
    """Median seconds of `repeats` synchronised runs of `run` after `warmup` untimed ones
    (`measure_variants` of one variant), and the last run's result."""
    last: list = [None]
    timings = measure_variants({"run": lambda: last.__setitem__(0, run())}, repeats, device, warmup=warmup)
    return timings.median("run"), last[0]


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
