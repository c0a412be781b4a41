"""benchmarks/gpu.sh, gpu_checks.py and gpu_bench.py cannot run in CI (no GPU); their plumbing can."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_checks_dry_run_on_cpu():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--device", "cpu",
                        "--n", "1500", "--eval-size", "12"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["topk"]["sampled_rows_equal_reference"]
    assert report["eval"]["runs"]["cpu"]["rc"] == 0


def test_gpu_checks_refuse_cuda_without_a_gpu():
    import os

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, wherever this runs
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py")], capture_output=True,
                       text=True, timeout=120, env=env, check=False)
    assert r.returncode == 3 and "no CUDA device" in r.stderr


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=False).returncode == 0


def test_gpu_script_refuses_an_unknown_mode_before_doing_anything(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "everything"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 2 and "expected all, checks or bench, got 'everything'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_bench_dry_run_on_cpu():
    """Every section of gpu_bench.py at tiny sizes on the CPU (the Triton kernel interpreted)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--small",
                        "--model", "fklip-tiny"], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert all("error" not in report[s] for s in ("image", "text", "topk", "eval", "train"))
    assert all(row["min_cos"] >= 0.99999 for row in report["image"]["rows"].values())
    for kind in ("captions", "concept prompts"):
        assert report["text"][kind]["cut_vs_full"]["max_abs_diff"] < 1e-5
        assert all(row["min_cos"] >= 0.99999 for row in report["text"][kind]["rows"].values())
    assert report["topk"]["grid_equal_reference"] == {"fused": True, "torch": True}
    rows = report["eval"]["rows"]
    assert all(row["rc"] == 0 for row in rows.values())
    assert len({row["mean_recall"] for row in rows.values()}) == 1  # --fused ranks as the default
    assert report["train"]["refresh"]["kb_images"] == 32 and report["train"]["steps"]["concept"]["batches"] >= 1
