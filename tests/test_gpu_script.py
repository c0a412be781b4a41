"""benchmarks/gpu.sh, gpu_checks.py and gpu_bench.py cannot run in CI (no GPU); their plumbing can."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import HANG_S, ROOT

# the scripts import this checkout's fklip, engines and export, as gpu.sh has them do
SCRIPT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
              "TRITON_INTERPRET": "1"}  # the dry runs: the kernel in Triton's interpreter


def test_gpu_checks_dry_run_on_cpu():
    """The whole script at a small size; the top-k check runs the fused kernel (in Triton's
    interpreter here: 260 x 260, about 10 s, partial tiles both ways), never "auto", and every row
    says which top-k method ran."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "--device", "cpu",
                        "--n", "260", "--eval-size", "12", "--fklip-timeout-s", str(HANG_S // 10)],
                       capture_output=True, text=True, timeout=HANG_S, env=SCRIPT_ENV, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["topk"]["sampled_rows_equal_reference"]
    assert report["topk"]["method"] == "fused"
    assert report["eval"]["runs"]["cpu"]["rc"] == 0
    assert {run["topk_method"] for run in report["eval"]["runs"].values()} == {"torch"}  # float32, "auto"


def test_gpu_checks_refuse_cuda_without_a_gpu():
    env = dict(SCRIPT_ENV, CUDA_VISIBLE_DEVICES="")  # no GPU visible, wherever this runs
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py")], capture_output=True,
                       text=True, timeout=HANG_S, env=env, check=False)
    assert r.returncode == 3 and "no CUDA device" in r.stderr


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=False).returncode == 0


def test_gpu_script_refuses_an_unknown_mode_before_doing_anything(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "everything"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 2 and "expected all, checks, bench, towers or end-to-end, got 'everything'" in r.stderr
    assert not (tmp_path / "out").exists()


def _limits(script: str, mode: str) -> list[int]:
    """The time limits of the steps one call of gpu.sh MODE would start, read from the script."""
    if mode == "checks":
        return [int(x) for x in re.findall(r'^\s*step "(?:pytest \(CUDA\)|gpu_checks)" (\d+)', script, re.M)]
    name = {"towers": "TOWER_SECTIONS", "end-to-end": "END_TO_END_SECTIONS"}[mode]
    sections = re.search(rf'^{name}="([^"]*)"', script, re.M).group(1).split()
    return [int(section.split(":")[1]) for section in sections]


def test_gpu_script_limits_add_up_within_one_call():
    """checks, towers and end-to-end each fit one call: their limits add up within the deadline
    with time left for the set-up (wheels, the open_clip import); `bench` is the last two, two calls.
    eval's own limit on each `fklip eval` lets both of them end inside the section's limit."""
    from benchmarks.gpu_bench import SECTION_NAMES, GpuBenchConfig
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    deadline = int(re.search(r"GPU_TOTAL_S:-(\d+)", script).group(1))
    assert deadline < 300  # the whole call under 5 minutes
    for mode in ("checks", "towers", "end-to-end"):
        limits = _limits(script, mode)
        assert len(limits) >= 2 and sum(limits) <= deadline - 20, (mode, limits)
    sections = dict(s.split(":") for s in re.search(r'^TOWER_SECTIONS="([^"]*)"', script, re.M).group(1).split()
                    + re.search(r'^END_TO_END_SECTIONS="([^"]*)"', script, re.M).group(1).split())
    assert tuple(sections) == SECTION_NAMES  # every section, in gpu_bench's order of priority
    assert 2 * GpuBenchConfig().eval_timeout_s + 30 <= int(sections["eval"])


def test_gpu_bench_config_is_built_once_from_the_flags():
    """gpu_bench's sections read one frozen GpuBenchConfig: defaults, --small's sizes, then the
    flags given; a bad value names its flag."""
    import dataclasses

    from benchmarks.gpu_bench import SMALL, GpuBenchConfig, config_from_argv
    assert config_from_argv([]) == GpuBenchConfig()
    cfg = config_from_argv(["--small", "--device", "cpu", "--images", "5", "--sections", "eval", "topk"])
    assert (cfg.images, cfg.kb_size, cfg.repeats, cfg.sections, cfg.cuda) == (5, SMALL["kb_size"], 1, ("eval", "topk"),
                                                                              False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.images = 3
    with pytest.raises(ValueError, match="--kb-size: expected a positive integer, got 0"):
        config_from_argv(["--kb-size", "0"])


# gpu.sh's limits are sized for an H100 (285 s in all, 45-80 s a section, 90 s an eval). On a CPU,
# loaded or not, a step must stop only if it hangs: a deadline of HANG_S, a fifth of it a section.
# The dry run takes under a minute on 2 idle cores.
SLOW_OK = {"GPU_TOTAL_S": str(HANG_S),
           "GPU_BENCH_SECTIONS": " ".join(f"{s}:{HANG_S // 5}" for s in ("topk", "image", "text", "eval", "train"))}


def _gpu_sh(mode: str, out, **env) -> subprocess.CompletedProcess:
    """benchmarks/gpu.sh on the CPU: gpu_bench.py's dry run (--device cpu --small, fklip-tiny)
    through the script's own step runner; this interpreter's python3 first on PATH."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OUT": str(out),
           "TRITON_INTERPRET": "1",
           "GPU_BENCH_ARGS": f"--device cpu --small --model fklip-tiny --eval-timeout-s {HANG_S // 10}", **env}
    # the script's own deadline (at most GPU_TOTAL_S) comes first
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), mode], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=int(env.get("GPU_TOTAL_S", 285)) + HANG_S // 10, check=False)


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    """Every section of gpu_bench.py at tiny sizes on the CPU (the Triton kernel interpreted), each
    in its own process as gpu.sh runs them, merged into one JSON object."""
    r = _gpu_sh("bench", tmp_path, **SLOW_OK)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.txt", "gpu_bench.err", "gpu_bench.json", "gpu_bench.txt"]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert len(report["commands"]) == 5 and all(f"--sections {s}" in c for s, c in zip(
        ("topk", "image", "text", "eval", "train"), report["commands"]))
    assert all("error" not in report[s] for s in ("image", "text", "topk", "eval", "train"))
    assert all(row["min_cos"] >= 0.99999 for row in report["image"]["rows"].values())
    for kind in ("captions", "concept prompts"):
        assert report["text"][kind]["cut_vs_full"]["max_abs_diff"] < 1e-5
        assert all(row["min_cos"] >= 0.99999 for row in report["text"][kind]["rows"].values())
    assert report["topk"]["grid_equal_reference"] == {"fused": True, "torch": True}
    assert {name: row["method"] for name, row in report["topk"]["rows"].items()} == {
        "torch.mm + torch.topk per chunk (baseline)": "plain", "matmul only (no selection)": None,
        "fklip torch path": "torch", "fklip fused (default tiles)": "fused"}
    assert all("ms" in row for row in report["topk"]["rows"].values())
    rows = report["eval"]["rows"]
    baseline, *runs = rows.values()
    assert baseline["seconds"] > 0 and all(row["rc"] == 0 and row["x"] > 0 for row in runs)
    assert all(row["topk_method"] == "torch" for row in runs)  # fklip eval: float32 features, "auto"
    assert len({row["mean_recall"] for row in runs}) == 1  # --fused ranks as the default
    assert all(row["timings_s"] for row in runs)
    refresh = report["train"]["refresh"]
    assert refresh["kb_images"] == 32 and refresh["open_clip_encode_only_s (baseline)"] > 0
    assert all(s["batches"] >= 1 and s["step_s"] > 0 for s in report["train"]["steps"].values())
    assert "gpu.sh: gpu_bench train: exit 0" in (tmp_path / "gpu.txt").read_text()


def test_gpu_script_records_steps_stopped_or_skipped(tmp_path):
    """A section past its limit is stopped, removes its temporary folder and is recorded as
    unfinished in the JSON; a step whose whole limit is not left before the deadline is skipped
    and said to be, even with most of it left; the exit code is 1."""
    # a million repeats of 24 images: the section cannot end on any machine, and it records its
    # start about 2 s in (after the imports), so 60 s leave a loaded machine 30 times that
    scratch = tmp_path / "scratch"  # the sections' temporary folders
    scratch.mkdir()
    r = _gpu_sh("bench", tmp_path / "stopped", GPU_BENCH_SECTIONS="image:60", TMPDIR=str(scratch),
                GPU_BENCH_ARGS="--device cpu --model fklip-tiny --images 24 --image-batch 8 --repeats 1000000")
    assert r.returncode == 1
    report = json.loads((tmp_path / "stopped" / "gpu_bench.json").read_text())
    assert "never finished: the process was stopped (SIGTERM" in report["image"]["error"]
    assert "its temporary folder was removed" in report["image"]["error"]
    assert "gpu.sh: gpu_bench image: exit 124 after" in (tmp_path / "stopped" / "gpu.txt").read_text()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("fklip-gpu-")]

    # 1,000 s left of 1,200 needed: under the old rule (half the limit left) this one started
    r = _gpu_sh("bench", tmp_path / "late", GPU_TOTAL_S="1000", GPU_BENCH_SECTIONS="image:1200")
    assert r.returncode == 1
    said = (tmp_path / "late" / "gpu.txt").read_text()
    assert "gpu.sh: gpu_bench image skipped" in said and "it needs up to 1200 s" in said
    assert not (tmp_path / "late" / "gpu_bench.json").exists()  # nothing ran
