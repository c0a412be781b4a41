"""`fklip bench` on fklip-tiny at tiny sizes, in process; its config, plan and top-k figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engines.base import BACKENDS
from fklip.cli import cli
from fklip.config import (
    BENCH_DEFAULTS,
    ENGINES,
    BenchConfig,
    bench_combo_problem,
)
from fklip.errors import ConfigError, MissingDependencyError
from fklip.precision import BENCH as BENCH_PRECISIONS
from tests.conftest import run_fklip

TINY = ["bench", "--model", "fklip-tiny", "--images", "8", "--texts", "12", "--batch", "4", "--repeats", "1",
        "--topk-queries", "64", "--topk-gallery", "1000", "--k", "5"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    result = invoke(*TINY, "--json-out", str(out))
    assert result.exit_code == 0, result.output
    return result, out


def test_last_line_is_the_json_result(tiny_run):
    result, _ = tiny_run
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert {"benchmark", "model", "device", "baseline", "results", "skipped", "topk", "environment"} <= set(report)
    assert report["model"] == "fklip-tiny" and report["device"] == "cpu"
    assert report["baseline"]["name"] == "open_clip eager fp32"
    env = report["environment"]
    for key in ("cpu", "torch", "onnxruntime", "open_clip", "date", "command"):
        assert env[key], key
    assert env["command"].startswith("fklip bench ") and "--model fklip-tiny" in env["command"]
    for tower, n in (("image", 8), ("text", 12)):
        figures = report["results"][tower]
        assert set(figures) == {"baseline", "torch", "onnx"}
        assert set(figures["torch"]) == {"fp32"} and set(figures["onnx"]) == {"fp32", "int8"}
        assert figures["baseline"]["x"] == 1.0
        for entry in (figures["baseline"], figures["torch"]["fp32"], *figures["onnx"].values()):
            assert entry["items_per_s"] > 0 and entry["x"] > 0
        for entry in (figures["baseline"], figures["torch"]["fp32"], figures["onnx"]["fp32"]):
            assert entry["min_cos"] >= 0.99999, (tower, entry)
        assert figures["onnx"]["int8"]["min_cos"] >= 0.99
    skipped = {(s["engine"], s["precision"]) for s in report["skipped"]}
    assert skipped == {("torch", "int8"), ("trt", None)}  # trt: every precision, it needs CUDA
    topk = report["topk"]
    assert (topk["queries"], topk["gallery"], topk["dim"], topk["k"]) == (64, 1000, 512, 5)
    assert topk["values_equal"] and topk["fklip_queries_per_s"] > 0 and topk["x"] > 0
    # the table comes first: every backend, the skipped pairs, the top-k rows
    table = "\n".join(lines[:-1])
    for text in ("open_clip eager fp32 (baseline)", "torch fp32", "onnx fp32", "onnx int8",
                 "skipped: int8 is onnx-only", "fklip topk_chunked", "values equal"):
        assert text in table, text


def test_json_out_holds_the_line_and_nothing_else_is_left(tiny_run):
    result, out = tiny_run
    assert out.read_text() == result.stdout.strip().splitlines()[-1] + "\n"
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left


def test_bad_flags_fail_in_one_line_naming_the_flag(tmp_path):
    out = tmp_path / "b.json"
    cases = [
        (["--images", "0"], "--images: expected a positive integer"),
        (["--repeats", "0"], "--repeats"),
        (["--engine", "nope"], "--engine: expected one of torch, onnx, trt, got 'nope'"),
        (["--precision", "fp64"], "--precision: expected one of"),
        (["--engine", "torch", "--precision", "int8"], "--precision int8"),
        (["--engine", "trt"], "--engine trt"),
        (["--topk-gallery", "5", "--k", "10"], "--k 10 is larger than --topk-gallery 5"),
        (["--device", "tpu"], "--device"),
        (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
        (["--checkpoint", str(tmp_path / "none.pt")], "--checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device"))
    for args, expected in cases:
        result = CliRunner().invoke(cli, [*TINY, *args, "--json-out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fklip: error: "), (args, result.stderr)
        assert expected in lines[0], (expected, lines[0])
        assert result.stdout == "" and not out.exists(), args  # nothing measured, nothing written


def test_bad_flag_as_a_user_sees_it():
    result = run_fklip("bench", "--engine", "torch", "--precision", "int8")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "int8 is onnx-only" in result.stderr


def test_config_defaults_follow_the_device():
    cpu, cuda = BenchConfig(), BenchConfig(device="cuda:1")
    assert (cpu.batch, cpu.images, cpu.texts, cpu.precisions) == (32, 64, 128, ("fp32", "int8"))
    assert cuda.topk_gallery == BENCH_DEFAULTS["cuda"]["topk_gallery"] == 1_000_000
    assert cpu.model_name == "ViT-B-32" and BenchConfig(model="fklip-tiny").model_name == "fklip-tiny"
    assert BenchConfig(images=5).images == 5
    assert (cpu.fused, cpu.cuda_graphs, cuda.fused, cuda.cuda_graphs) == (False, False, True, True)
    assert BenchConfig(device="cuda", fused=False).fused is False
    with pytest.raises(ConfigError, match="--images: .*; --texts: "):  # every problem, in one error
        BenchConfig(images=0, texts=-1)
    with pytest.raises(AttributeError):
        cpu.batch = 3


def test_every_engine_and_precision_pair_has_an_answer():
    assert set(ENGINES) == set(BACKENDS)
    runnable = {(e, p, d) for e in ENGINES for p in BENCH_PRECISIONS for d in ("cpu", "cuda")
                if bench_combo_problem(e, p, d) is None}
    assert runnable == {("torch", "fp32", "cpu"), ("torch", "amp", "cpu"), ("torch", "bf16", "cpu"),
                        ("onnx", "fp32", "cpu"), ("onnx", "fp16", "cpu"), ("onnx", "int8", "cpu"),
                        ("torch", "fp32", "cuda"), ("torch", "amp", "cuda"), ("torch", "fp16", "cuda"),
                        ("torch", "bf16", "cuda"), ("onnx", "fp32", "cuda"), ("onnx", "fp16", "cuda"),
                        ("trt", "fp32", "cuda"), ("trt", "fp16", "cuda"), ("trt", "bf16", "cuda")}


def _has_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_plan_on_cuda_skips_default_engines_and_refuses_asked_ones(monkeypatch):
    """Planning touches no GPU: what a CUDA machine without TensorRT or onnxruntime-gpu gets."""
    from engines import bench

    monkeypatch.setattr("export.trt.require_tensorrt", lambda: (_ for _ in ()).throw(
        MissingDependencyError('the TensorRT backend needs tensorrt: pip install "fklip[trt]"')))
    runs, skipped = bench.plan_bench(BenchConfig(device="cuda"))
    assert runs[:4] == [("torch", "fp32"), ("torch", "amp"), ("torch", "fp16"), ("torch", "bf16")]
    assert {s["engine"] for s in skipped} >= {"trt"} and all(s["reason"] for s in skipped)
    with pytest.raises(MissingDependencyError, match="fklip\\[trt\\]"):
        bench.plan_bench(BenchConfig(device="cuda", engines=("torch", "trt")))
    if not _has_cuda_provider():
        with pytest.raises(MissingDependencyError, match="--engine onnx --device cuda"):
            bench.plan_bench(BenchConfig(device="cuda", engines=("onnx",)))
    with pytest.raises(ConfigError, match="--precision int8: no engine here runs it"):
        bench.plan_bench(BenchConfig(device="cuda", precisions=("int8",)))


def test_int8_outside_its_tolerance_is_measured_without_it(monkeypatch, tmp_path):
    """make_exports redoes the fp32 export without --int8, and says why."""
    from engines.measure import make_exports
    from export.onnx_export import ExportError

    calls = []

    def fake_export(cfg, build_engines=None):
        calls.append((cfg.precision, cfg.int8, cfg.overwrite, cfg.trt, cfg.max_batch))
        if cfg.int8:
            raise ExportError("--int8: quantised graphs are outside tolerance; nothing was written")
        return {}

    monkeypatch.setattr("engines.measure.run_export", fake_export)
    folders, facts = make_exports(tmp_path / "m.pt", tmp_path, ["fp16"], int8=True, batch=512)
    assert calls == [("fp32", True, False, False, 512), ("fp32", False, True, False, 512),
                     ("fp16", False, False, False, 512)]
    assert set(folders) == {"fp32", "fp16"} and "outside tolerance" in facts["int8_export_error"]


def test_topk_figures_check_the_values():
    from engines.measure import bench_topk, features, plain_topk
    from fklip.retrieval import topk_reference

    queries, gallery = features(300, 32, 0), features(5000, 32, 1)
    values, _ = plain_topk(queries, gallery, 7)
    assert torch.equal(values + 0.0, topk_reference(queries, gallery, 7)[0])
    report = bench_topk(100, 3000, 64, 10, repeats=1)
    assert report["values_equal"] and report["values_max_abs_diff"] == 0.0 and report["x"] > 0
    assert len(report["fklip_s"]) == len(report["plain_s"]) == 1


def test_measure_variants_warms_up_interleaves_and_keeps_going():
    """One discipline for every harness: warm-ups untimed, rounds in turn, a variant that raises
    (warming up or timed) left out with its error when asked to keep going, and raised otherwise."""
    from fklip.timing import measure_variants, timed_median

    calls: list[str] = []

    def fails_on(n: int, name: str):
        def run() -> None:
            calls.append(name)
            if calls.count(name) == n:
                raise RuntimeError(f"{name} broke")
        return run

    variants = {"a": lambda: calls.append("a"), "warm-up fails": fails_on(1, "w"), "b": lambda: calls.append("b"),
                "second round fails": fails_on(3, "s")}
    timings = measure_variants(variants, 3, warmups={"b": lambda: calls.append("b warm")}, keep_going=True)
    assert calls == ["a", "w", "b warm", "s", "a", "b", "s", "a", "b", "s", "a", "b"]
    assert set(timings.seconds) == set(timings.other) == set(timings.retaken) == {"a", "b"}
    assert len(timings.seconds["a"]) == 3 and timings.median("b") >= 0
    assert timings.errors == {"warm-up fails": "RuntimeError: w broke", "second round fails": "RuntimeError: s broke"}
    with pytest.raises(RuntimeError, match="w2 broke"):
        measure_variants({"warm-up fails": fails_on(1, "w2")}, 1)

    results = iter(range(10))
    seconds, last = timed_median(lambda: next(results), repeats=3, warmup=2)
    assert last == 4 and seconds >= 0  # 2 warm-ups, 3 timed runs: the last result


def test_import_fklip_loads_no_onnx():
    code = ("import sys, fklip, fklip.cli, fklip.config, fklip.timing; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'engines', 'export') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_cuda_inputs_are_uint8_pixels_and_the_baseline_takes_them(tiny_model, tiny_spec, monkeypatch):
    """What a CUDA run feeds (checked on the CPU): uint8 pixels, repeated past the unique draws,
    normalised by the baseline on its device like the float32 inputs."""
    from engines import bench
    from engines.measure import cosines, open_clip_backend
    from fklip.data.archive import normalized_from_pixels

    cfg = BenchConfig(model="fklip-tiny", images=5, texts=7)
    inputs = bench._inputs(tiny_spec, cfg, cuda=True)
    assert inputs["images"].dtype == np.uint8 and inputs["images"].shape == (5, 64, 64, 3)
    assert inputs["texts"].shape == (7, 77)
    monkeypatch.setattr(bench, "MAX_UNIQUE", 2)
    repeated = bench._inputs(tiny_spec, BenchConfig(model="fklip-tiny", images=5, texts=3), cuda=False)
    assert np.array_equal(repeated["images"][4], repeated["images"][0])  # drawn 2, repeated cyclically
    uint8 = open_clip_backend(tiny_model, image_encoding="uint8_hwc").encode_images(inputs["images"])
    float32 = open_clip_backend(tiny_model).encode_images(normalized_from_pixels(inputs["images"]))
    assert cosines(uint8, float32).min() >= 0.99999


def test_fused_torch_engine_is_measured_and_recorded():
    """--fused runs the torch engine on fklip's towers: same embeddings as open_clip's modules."""
    result = invoke(*TINY, "--engine", "torch", "--fused")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch_engine"] == {"fp32": {"fused": True, "cuda_graphs": False, "compile": False}}
    assert "--fused" in report["environment"]["command"]
    for tower in ("image", "text"):
        assert report["results"][tower]["torch"]["fp32"]["min_cos"] >= 0.99999
