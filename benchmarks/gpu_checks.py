"""GPU checks that CI cannot run: exact top-k at 1,000,000 x 1,000,000, `fklip eval --device cuda`
against the CPU, and the torch engine's CUDA paths against the CPU. Prints one JSON line.

    python benchmarks/gpu_checks.py [--n 1000000] [--dim 512] [--k 10] [--method fused] [--eval-size 64]
    python benchmarks/gpu_checks.py --device cpu --n 260      # a dry run here (the kernel interpreted: slow)

Run by benchmarks/gpu.sh on a lent GPU machine (nothing is downloaded; see that script).
Exits non-zero if any check fails; every check's figures are in the JSON line either way. Each
check also prints its own JSON line when it ends, so a run stopped by a timeout keeps the
checks that finished; a check that raises is reported as failed and the others still run.

The top-k check searches with --method "fused" (the Triton kernel; in Triton's interpreter on the
CPU), never "auto": auto falls back to the torch path when the kernel fails, and at 1,000,000 x
1,000,000 that path takes the whole time limit. Every row records the top-k method that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from engines.measure import topk_method
from fklip.timing import environment, timed_median

METHODS = ("fused", "torch")


def check_topk(n: int, dim: int, k: int, device: str = "cuda", method: str = "fused") -> dict:
    """n x n exact top-k both ways on one GPU (fp16 features) with `method`, timed once; a sample
    of rows against the float32 full-row reference on the same device. Features are multiples of
    1/8 in [-0.5, 0.5], so every product is exact in float32 whatever the tiling (and ties are
    frequent: the tie rule is checked too)."""
    from fklip.retrieval import topk_both_ways, topk_reference

    gen = torch.Generator(device=device).manual_seed(0)
    queries = (torch.randint(-4, 5, (n, dim), device=device, generator=gen) / 8).half()  # (n, dim)
    gallery = (torch.randint(-4, 5, (n, dim), device=device, generator=gen) / 8).half()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ran = topk_method(device, queries.dtype, method, k, dim)  # "fused" where the kernel cannot run raises
    took, ((v_qg, i_qg), (v_gq, i_gq)) = timed_median(lambda: topk_both_ways(queries, gallery, k, method=method),
                                                      device, warmup=0)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:256].to(device)
    ref_v, ref_i = topk_reference(queries[rows], gallery, k)
    ok = bool(torch.equal(ref_i, i_qg[rows]) and torch.equal(ref_v, v_qg[rows]))
    ref_v2, ref_i2 = topk_reference(gallery[rows], queries, k)
    ok = ok and bool(torch.equal(ref_i2, i_gq[rows]) and torch.equal(ref_v2, v_gq[rows]))
    return {"n": n, "dim": dim, "k": k, "method": ran, "seconds_both_ways": round(took, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "sampled_rows_equal_reference": ok, "passed": ok}


FKLIP_TIMEOUT_S = 60  # one `fklip` subprocess at most (the demo data, one eval of 64 pairs)


def _fklip(*args: str, timeout_s: float = FKLIP_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m fklip ARGS`; one that runs past `timeout_s` comes back with rc 124."""
    command = [sys.executable, "-m", "fklip", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"stopped after {timeout_s} s")


def check_eval(folder: Path, size: int, device: str = "cuda", timeout_s: float = FKLIP_TIMEOUT_S) -> dict:
    """`fklip eval --device cuda` (torch engine, and --cuda-graphs) against `--device cpu` on the
    demo data with fklip-tiny: same predictions files, metrics within rounding. Each run records
    the top-k method its search took (`fklip eval` searches float32 features with "auto")."""
    data = folder / "data"
    r = _fklip("data", "demo", "--out", str(data), "--size", "64", "--val", str(size), "--train", "8",
               "--kb", "8", timeout_s=timeout_s)
    if r.returncode:
        return {"passed": False, "error": r.stderr[-500:]}
    val = data / "fashiongen" / "val"
    ckpt = folder / "tiny.pt"
    from fklip.model import ModelSpec, build_model, save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec.from_name("fklip-tiny")
    save_checkpoint(ckpt, build_model(spec), spec)
    common = ["eval", "--resume", str(ckpt), "--image-data", str(next(val.glob("*.npz"))),
              "--text-data", str(val / "fashion-gen_val_queries.jsonl")]
    results = {}
    runs = [("cpu", ["--device", "cpu"])]
    if device.startswith("cuda"):
        runs += [("cuda", ["--device", device]), ("cuda_graphs", ["--device", device, "--cuda-graphs"]),
                 ("cuda_fp16", ["--device", device, "--precision", "fp16"])]
    else:  # a dry run of the plumbing on the CPU
        runs += [("cuda", ["--device", "cpu"])]
    for name, extra in runs:
        started = time.perf_counter()
        r = _fklip(*common, "--output-dir", str(folder / name), *extra, timeout_s=timeout_s)
        results[name] = {"rc": r.returncode, "seconds": round(time.perf_counter() - started, 2),
                         "topk_method": topk_method(extra[extra.index("--device") + 1])}
        if r.returncode:
            results[name]["error"] = r.stderr[-500:]
            continue
        results[name]["metrics"] = json.loads((folder / name / "metrics.json").read_text())["mean_recall"]
    ran = all(v["rc"] == 0 for v in results.values())
    # GPU and CPU products round differently, so near-ties may swap: equal files are reported,
    # and the recall of each CUDA run must be within 1 point of the CPU's
    same = ran and all((folder / "cpu" / f).read_text() == (folder / "cuda" / f).read_text()
                       for f in ("test_txts_predictions.jsonl", "test_imgs_predictions.jsonl"))
    close = ran and all(abs(v["metrics"] - results["cpu"]["metrics"]) <= 1.0 for v in results.values())
    return {"runs": results, "cuda_predictions_equal_cpu": same, "passed": close}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--method", default="fused", choices=METHODS,
                        help="the top-k check's method (never auto: it could fall back to the slow path unsaid)")
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (small --n)")
    parser.add_argument("--fklip-timeout-s", type=float, default=FKLIP_TIMEOUT_S,
                        help="each `fklip` subprocess's limit (a dry run on a loaded CPU needs more)")
    args = parser.parse_args()
    if not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_checks: a dry run on the CPU runs the Triton kernel in its interpreter: set TRITON_INTERPRET=1 in the environment (Triton reads it when it is first imported, which importing fklip already does through open_clip)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    env = environment(args.device)
    report = {"benchmark": "gpu_checks", **{key: env[key] for key in ("gpu", "torch", "cuda", "python", "date")},
              "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        checks = {"topk": lambda: check_topk(args.n, args.dim, args.k, args.device, args.method),
                  "eval": lambda: check_eval(Path(tmp), args.eval_size, args.device, args.fklip_timeout_s)}
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                report[name] = check()
            except Exception as e:  # noqa: BLE001 (one broken check must not hide the others' results)
                traceback.print_exc()
                report[name] = {"passed": False, "error": f"{type(e).__name__}: {e}"[:800]}
            report[name]["check_s"] = round(time.perf_counter() - started, 1)
            print(json.dumps({name: report[name]}), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    report["passed"] = all(report[name]["passed"] for name in checks)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
