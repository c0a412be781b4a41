"""benchmarks/gpu.sh and gpu_checks.py cannot run in CI (no GPU); their plumbing can."""

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
