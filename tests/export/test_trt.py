"""TensorRT export: profiles, engine keys and cache layout, the runner's input handling.

Everything above the "Needs TensorRT and a CUDA GPU" line runs without TensorRT; the tests below
it build real engines from tiny ONNX graphs and skip cleanly where TensorRT or CUDA is missing.
"""

import hashlib
import json
import re
import sys
import time
import types

import numpy as np
import pytest
import torch

from engines.trt_runner import (
    TORCH_DTYPES,
    TRT_DTYPE_NAMES,
    TrtRunner,
    batch_slices,
    image_input,
    text_input,
    trt_manifest,
)
from export import trt as export_trt
from export.manifest import MANIFEST_FORMAT, MANIFEST_VERSION
from export.profiles import (
    ShapeRange,
    profiles_as_dict,
    profiles_for,
    profiles_from_dict,
)
from export.specs import EOT_TOKEN, image_tower_spec, random_inputs, text_tower_spec
from export.trt import (
    KEY_FIELDS,
    device_facts,
    engine_cache_key,
    engine_paths,
    engine_record,
    format_build_config,
    load_or_build_engine,
    rebuild_reason,
    require_tensorrt,
    timing_cache_path,
)
from fklip.config import EncodeConfig
from fklip.data.archive import normalized_from_pixels, pixels_from_normalized
from fklip.errors import (
    ConfigError,
    DataError,
    FklipError,
    MissingDependencyError,
    NotAvailableError,
)
from tests.conftest import HANG_S

FACTS = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "trt_version": "10.9.0.34"}


# ---- ShapeRange and profiles -------------------------------------------------------------------

def test_shape_range_normalises_and_contains():
    r = ShapeRange([1, 3], [4, 3], [8, 3])
    assert r.min == (1, 3) and r.opt == (4, 3) and r.max == (8, 3)
    assert r.contains((1, 3)) and r.contains((8, 3)) and not r.contains((9, 3))
    assert not r.contains((4, 3, 1))


@pytest.mark.parametrize("lo, mid, hi, expected", [
    ((1, 3), (2, 3), (4, 3, 1), "different ranks (2, 2, 3)"),
    ((2, 3), (1, 3), (4, 3), "axis 0: expected min <= opt <= max, got 2, 1, 4"),
    ((1, 3), (4, 3), (2, 3), "axis 0: expected min <= opt <= max, got 1, 4, 2"),
    ((0, 3), (1, 3), (2, 3), "min has dimensions that are not integers >= 1: [0]"),
    ((1, 3), (1.5, 3), (2, 3), "opt has dimensions that are not integers >= 1: [1.5]"),
    ((), (), (), "a shape has no axes"),
])
def test_shape_range_rejects(lo, mid, hi, expected):
    with pytest.raises(ConfigError) as e:
        ShapeRange(lo, mid, hi)
    assert expected in str(e.value)


def test_shape_range_collects_every_problem():
    with pytest.raises(ConfigError, match="2 problems") as e:
        ShapeRange((0, 1), (1, 5), (1, 4))
    assert "min has dimensions" in str(e.value) and "max has dimensions" not in str(e.value)


def test_shape_range_dict_round_trip_and_errors():
    r = ShapeRange((1, 1), (8, 77), (32, 77))
    assert ShapeRange.from_dict(json.loads(json.dumps(r.as_dict()))) == r
    with pytest.raises(DataError, match=r"profile: expected an object with keys max, min, opt, got \['max', 'min'\]"):
        ShapeRange.from_dict({"min": [1], "max": [2]})
    with pytest.raises(DataError, match="lists of integers"):
        ShapeRange.from_dict({"min": [1], "opt": ["2"], "max": [2]})
    with pytest.raises(DataError, match=r"profiles\['ids'\]: .*axis 0"):
        profiles_from_dict({"ids": {"min": [3], "opt": [2], "max": [4]}})
    with pytest.raises(DataError, match="expected an object mapping"):
        profiles_from_dict({})


def test_profiles_for_the_image_tower():
    profiles = profiles_for(image_tower_spec(224, 512), opt_batch=8, max_batch=32)
    assert profiles == {"pixels": ShapeRange((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}
    profiles = profiles_for(image_tower_spec(224, 512, uint8_input=True), opt_batch=8, max_batch=8)
    assert profiles == {"pixels": ShapeRange((1, 224, 224, 3), (8, 224, 224, 3), (8, 224, 224, 3))}


def test_profiles_for_the_text_tower():
    profiles = profiles_for(text_tower_spec(77, 512), opt_batch=64, max_batch=256)
    assert profiles == {"text_ids": ShapeRange((1, 1), (64, 77), (256, 77))}
    assert profiles_from_dict(json.loads(json.dumps(profiles_as_dict(profiles)))) == profiles


@pytest.mark.parametrize("opt, hi, flags", [
    (0, 8, ["--opt-batch"]),
    (16, 8, ["--max-batch: expected at least --opt-batch (16), got 8"]),
    (0, 0, ["--opt-batch", "--max-batch"]),
    (True, 8, ["--opt-batch"]),
])
def test_profiles_for_names_the_bad_flag(opt, hi, flags):
    with pytest.raises(ConfigError) as e:
        profiles_for(text_tower_spec(77, 512), opt_batch=opt, max_batch=hi)
    for flag in flags:
        assert flag in str(e.value)


# ---- Keys, layout, reuse -----------------------------------------------------------------------

def _key_args(**changes):
    args = dict(FACTS, precision="fp16", profiles=profiles_for(text_tower_spec(77, 512), 64, 256),
                onnx_sha256="ab" * 32)
    args.update(changes)
    return args


def test_cache_key_is_stable_readable_and_safe():
    key = engine_cache_key(**_key_args())
    assert key == engine_cache_key(**_key_args())
    assert re.fullmatch(r"nvidia-h100-80gb-hbm3-sm90-trt10\.9\.0\.34-fp16-[0-9a-f]{12}", key), key
    # Recomputed from JSON (what engine.json holds) and in another dict order: the same key.
    profiles = profiles_from_dict(json.loads(json.dumps(profiles_as_dict(_key_args()["profiles"]))))
    assert engine_cache_key(**_key_args(profiles=dict(reversed(profiles.items())))) == key
    odd = engine_cache_key(**_key_args(gpu_name="GeForce RTX 4090 / Ti?", trt_version="11.0.0rc1+cuda13"))
    assert re.fullmatch(r"[a-z0-9.\-]+", odd), odd


@pytest.mark.parametrize("change", [
    {"gpu_name": "NVIDIA H200"},
    {"gpu_name": "nvidia h100 80gb hbm3"},  # same slug, different name: the hash tells them apart
    {"compute_capability": "8.9"},
    {"trt_version": "10.9.0.35"},
    {"precision": "bf16"},
    {"onnx_sha256": "ac" * 32},
    {"profiles": {"text_ids": ShapeRange((1, 1), (32, 77), (256, 77))}},  # only opt differs
    {"profiles": {"text_ids": ShapeRange((1, 1), (64, 77), (512, 77))}},
])
def test_cache_key_changes_with_every_part(change):
    assert engine_cache_key(**_key_args(**change)) != engine_cache_key(**_key_args())


def test_engine_layout(tmp_path):
    plan, record = engine_paths(tmp_path, "k1", "image")
    assert plan == tmp_path / "engines" / "k1" / "image.plan"
    assert record == tmp_path / "engines" / "k1" / "engine.json"
    h100 = tmp_path / "engines" / "timing-nvidia-h100-80gb-hbm3-sm90-trt10.9.0.34.cache"
    assert timing_cache_path(tmp_path, FACTS) == h100
    # one per GPU and TensorRT version: TensorRT refuses another device's cache
    assert timing_cache_path(tmp_path, dict(FACTS, gpu_name="NVIDIA H200", trt_version="11.0.1")) == \
        tmp_path / "engines" / "timing-nvidia-h200-sm90-trt11.0.1.cache"


def _expected(**facts):
    profiles = profiles_for(image_tower_spec(224, 512), 8, 32)
    return engine_record("image", "fp32", profiles, "cd" * 32, dict(FACTS, **facts))


def _write_engine(tmp_path, expected, plan_bytes=b"plan", **record_changes):
    plan, record = engine_paths(tmp_path, expected["key"], "image")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(plan_bytes)
    record.write_text(json.dumps({**expected, "plan_bytes": len(plan_bytes), **record_changes}))
    return plan, record


def test_rebuild_reason(tmp_path):
    expected = _expected()
    plan, record = engine_paths(tmp_path, expected["key"], "image")
    assert rebuild_reason(plan, record, expected) == f"no engine at {plan}"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan")
    assert rebuild_reason(plan, record, expected) == f"no engine.json beside {plan}"
    record.write_text("{not json")
    assert "is unreadable" in rebuild_reason(plan, record, expected)
    record.write_text("[]")
    assert "not a JSON object" in rebuild_reason(plan, record, expected)
    _write_engine(tmp_path, expected)
    assert rebuild_reason(plan, record, expected) is None
    plan.write_bytes(b"plan, truncated or replaced")
    assert "bytes" in rebuild_reason(plan, record, expected)


@pytest.mark.parametrize("field", KEY_FIELDS)
def test_rebuild_when_any_recorded_part_differs(tmp_path, field):
    expected = _expected()
    plan, record = _write_engine(tmp_path, expected, **{field: "something else"})
    assert rebuild_reason(plan, record, expected) == f"{record} records a different {field}"


def test_load_or_build_reuses_and_rebuilds(tmp_path, monkeypatch):
    builds = []

    def build(onnx_path, engine_path, profiles, cache_path, workspace_bytes=None, log=None):
        builds.append((onnx_path, engine_path, cache_path))
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(b"engine for " + str(onnx_path).encode())
        return {"build_seconds": 0.0}

    monkeypatch.setattr(export_trt, "engine_from_onnx", build)
    profiles = profiles_for(image_tower_spec(224, 512), 8, 32)
    args = (tmp_path, "image", tmp_path / "image.onnx", "cd" * 32, "fp32", profiles)

    plan, key, built = load_or_build_engine(*args, FACTS)
    assert built and plan == engine_paths(tmp_path, key, "image")[0] and plan.is_file()
    assert builds == [(tmp_path / "image.onnx", plan, timing_cache_path(tmp_path, FACTS))]
    record = json.loads(plan.with_name("engine.json").read_text())
    assert {k: record[k] for k in KEY_FIELDS} == _expected() and record["plan_bytes"] == plan.stat().st_size
    assert record["build"] == {"build_seconds": 0.0}

    assert load_or_build_engine(*args, FACTS) == (plan, key, False)
    assert len(builds) == 1

    # Another TensorRT version: a new engine under its own key; the old one stays.
    plan2, key2, built2 = load_or_build_engine(*args, dict(FACTS, trt_version="10.10.0.1"))
    assert built2 and key2 != key and plan.is_file() and plan2.is_file()
    assert builds[-1][2] == timing_cache_path(tmp_path, dict(FACTS, trt_version="10.10.0.1")) != builds[0][2]

    # A record that no longer matches (edited, or from another build) is not trusted.
    record_path = plan.with_name("engine.json")
    record_path.write_text(json.dumps({**record, "precision": "fp16"}))
    assert load_or_build_engine(*args, FACTS) == (plan, key, True)
    assert len(builds) == 3 and json.loads(record_path.read_text())["precision"] == "fp32"


def test_concurrent_builds_of_one_engine_build_it_once(tmp_path, monkeypatch):
    """Two callers wanting the same engine at once (ranks under torchrun): one builds, the other
    waits on the lock and then loads what the first built."""
    import threading

    builds, started = [], threading.Event()

    def build(onnx_path, engine_path, profiles, cache_path, workspace_bytes=None, log=None):
        builds.append(engine_path)
        started.set()
        time.sleep(0.5)  # long enough for the other caller to reach the lock
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(b"engine")
        return {"build_seconds": 0.5}

    monkeypatch.setattr(export_trt, "engine_from_onnx", build)
    profiles = profiles_for(image_tower_spec(224, 512), 8, 32)
    args = (tmp_path, "image", tmp_path / "image.onnx", "cd" * 32, "fp32", profiles, FACTS)
    results = []
    first = threading.Thread(target=lambda: results.append(load_or_build_engine(*args)))
    first.start()
    assert started.wait(HANG_S)
    results.append(load_or_build_engine(*args))  # blocks until the first build is done
    first.join()
    assert len(builds) == 1
    assert sorted(built for _, _, built in results) == [False, True]
    assert results[0][:2] == results[1][:2]


def test_a_filesystem_without_locks_still_builds(tmp_path, monkeypatch, caplog):
    """flock fails on NFS without lockd and on some FUSE mounts: the build goes on, unlocked."""
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    built = []

    def build(onnx_path, engine_path, profiles, cache_path, workspace_bytes=None, log=None):
        built.append(engine_path)
        engine_path.write_bytes(b"engine")
        return {}

    monkeypatch.setattr(export_trt, "engine_from_onnx", build)
    profiles = profiles_for(image_tower_spec(224, 512), 8, 32)
    with caplog.at_level("WARNING", logger="export.trt"):
        plan, _, was_built = load_or_build_engine(tmp_path, "image", tmp_path / "image.onnx", "cd" * 32, "fp32",
                                                  profiles, FACTS)
    assert was_built and built == [plan] and plan.is_file()
    assert "no build lock here" in caplog.text and "No locks available" in caplog.text


def test_building_without_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    profiles = profiles_for(image_tower_spec(224, 512), 8, 32)
    with pytest.raises(MissingDependencyError, match='pip install "fklip.trt."'):
        load_or_build_engine(tmp_path, "image", tmp_path / "image.onnx", "cd" * 32, "fp32", profiles, FACTS)


def test_require_tensorrt_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(MissingDependencyError) as e:
        require_tensorrt()
    message = str(e.value)
    assert "\n" not in message and 'pip install "fklip[trt]"' in message and "CUDA GPU" in message


def test_require_tensorrt_too_old(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(MissingDependencyError, match=r"needs TensorRT >= 10, found 8\.6\.1"):
        require_tensorrt()


def test_device_facts_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the GPU check comes first
    with pytest.raises(NotAvailableError) as e:
        device_facts()
    assert str(e.value) == "--trt needs a CUDA GPU; torch.cuda.is_available() is False"


def test_format_build_config():
    text = format_build_config({"TensorRT": "10.9", "Flags": ["TF32", "REFIT"], "Pools": {"WORKSPACE": 1.5}})
    assert text.splitlines() == [f"    {'TensorRT':22} | 10.9", f"    {'Flags':22} | [TF32, REFIT]",
                                 f"    {'Pools':22} | WORKSPACE: 1.5"]


# ---- The runner without TensorRT ---------------------------------------------------------------

S, D, CONTEXT = 8, 4, 16


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_tiny_export(folder, uint8_input=False, ids_dtype="int32", opt_batch=2, max_batch=3):
    """An export folder with two tiny graphs and their numpy oracles (what `fklip export` writes,
    in the manifest's format). Image: mean over space, a (3, D) projection, L2 norm. Text: the
    embedding of each row's largest id (the end token, as CLIP pools), L2 norm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    proj = rng.standard_normal((3, D)).astype(np.float32)
    table = rng.standard_normal((EOT_TOKEN + 1, D)).astype(np.float32)

    def l2_nodes(x, out):
        return [helper.make_node("Mul", [x, x], [x + "_sq"]),
                helper.make_node("ReduceSum", [x + "_sq", "axis1"], [x + "_ss"], keepdims=1),
                helper.make_node("Sqrt", [x + "_ss"], [x + "_n"]),
                helper.make_node("Div", [x, x + "_n"], [out])]

    def save(name, nodes, inp, out, inits):
        inits = inits + [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
        graph = helper.make_graph(nodes, name, [inp], [out], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / f"{name}.onnx"))

    if uint8_input:
        image_in = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["image_batch", S, S, 3])
        first = [helper.make_node("Cast", ["pixels"], ["pf"], to=TensorProto.FLOAT),
                 helper.make_node("ReduceMean", ["pf"], ["mean"], axes=[1, 2], keepdims=0)]
        image_shape = ["image_batch", S, S, 3]
    else:
        image_in = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["image_batch", 3, S, S])
        first = [helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[2, 3], keepdims=0)]
        image_shape = ["image_batch", 3, S, S]
    image_out = helper.make_tensor_value_info("image_emb", TensorProto.FLOAT, ["image_batch", D])
    nodes = first + [helper.make_node("MatMul", ["mean", "proj"], ["feat"])] + l2_nodes("feat", "image_emb")
    save("image", nodes, image_in, image_out, [numpy_helper.from_array(proj, "proj")])

    ids_type = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}[ids_dtype]
    text_in = helper.make_tensor_value_info("text_ids", ids_type, ["text_batch", "text_length"])
    text_out = helper.make_tensor_value_info("text_emb", TensorProto.FLOAT, ["text_batch", D])
    nodes = [helper.make_node("Cast", ["text_ids"], ["idf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["idf"], ["maxf"], axes=[1], keepdims=0),
             helper.make_node("Cast", ["maxf"], ["maxi"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "maxi"], ["tok"], axis=0)] + l2_nodes("tok", "text_emb")
    save("text", nodes, text_in, text_out, [numpy_helper.from_array(table, "table")])

    def tower(name, inp, out, batch):
        return {"file": f"{name}.onnx", "sha256": hashlib.sha256((folder / f"{name}.onnx").read_bytes()).hexdigest(),
                "inputs": [inp], "outputs": [{"name": out, "dtype": "float32", "shape": [batch, D]}],
                "batch_axis": batch}

    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "model": {"name": "tiny", "embed_dim": D, "image_size": S, "context_length": CONTEXT,
                  "truncation": "error"},
        "precision": "fp32",
        "towers": {
            "image": tower("image", {"name": "pixels", "dtype": "uint8" if uint8_input else "float32",
                                     "shape": image_shape}, "image_emb", "image_batch"),
            "text": tower("text", {"name": "text_ids", "dtype": ids_dtype,
                                   "shape": ["text_batch", "text_length"]}, "text_emb", "text_batch"),
        },
        "profile": {"opt_batch": opt_batch, "max_batch": max_batch},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))

    def image_oracle(model_input):  # in the graph's own encoding
        x = model_input.astype(np.float32)
        return _l2((x.mean(axis=(1, 2)) if uint8_input else x.mean(axis=(2, 3))) @ proj)

    def text_oracle(ids):
        return _l2(table[ids.max(axis=1)])

    return folder, image_oracle, text_oracle


def test_tiny_export_graphs_match_their_oracles(tmp_path):
    import onnxruntime as ort

    for uint8_input, ids_dtype in ((False, "int32"), (True, "int64")):
        folder, image_oracle, text_oracle = write_tiny_export(tmp_path, uint8_input, ids_dtype)
        spec = image_tower_spec(S, D, uint8_input=uint8_input)
        pixels = random_inputs(spec, 5, seed=1)
        ids = random_inputs(text_tower_spec(CONTEXT, D, ids_dtype), 6, seed=2)
        image = ort.InferenceSession(str(folder / "image.onnx"), providers=["CPUExecutionProvider"])
        text = ort.InferenceSession(str(folder / "text.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(image.run(None, {"pixels": pixels})[0], image_oracle(pixels), atol=1e-5)
        np.testing.assert_allclose(text.run(None, {"text_ids": ids})[0], text_oracle(ids), atol=1e-6)


def test_runner_reads_the_manifest_and_needs_tensorrt_to_enter(tmp_path, monkeypatch):
    folder, _, _ = write_tiny_export(tmp_path, uint8_input=True, ids_dtype="int64")
    runner = TrtRunner(EncodeConfig("trt", engine_dir=folder))
    assert (runner.backend, runner.embed_dim, runner.image_size, runner.context_length) == ("trt", D, S, CONTEXT)
    assert runner.image_encoding == "uint8_hwc" and runner.max_batch == 3 and runner.device == "cuda"
    m = runner.manifest
    assert m.folder == folder and m.graph_path("image") == folder / "image.onnx"
    assert m.graph_path("text") == folder / "text.onnx"
    assert runner.specs["text"].max_length == CONTEXT and runner.specs["text"].input.dtype == "int64"
    assert runner.specs["image"].max_length is None and runner.plans == {}
    with pytest.raises(FklipError, match="inside a `with` block"):
        runner.encode_texts(np.zeros((1, 4), np.int64))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match='pip install "fklip.trt."'), runner:
        pass


def test_manifest_problems_are_collected(tmp_path):
    with pytest.raises(ConfigError, match="--engine trt needs --engine-dir"):
        TrtRunner(EncodeConfig("trt"))
    folder, _, _ = write_tiny_export(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["precision"] = "fp8"
    manifest["profile"]["opt_batch"] = 4  # > max_batch 3
    manifest["towers"]["image"]["inputs"][0]["shape"] = ["image_batch", 3, S, S + 1]
    manifest["towers"]["text"]["inputs"][0]["dtype"] = "float32"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="4 problems") as e:
        trt_manifest(folder)
    for part in ("precision: expected one of", "profile.opt_batch: expected 1..max_batch (3), got 4",
                 "towers.image.inputs[0]: expected float32", "towers.text.inputs[0]: expected int32 or int64"):
        assert part in str(e.value)
    del manifest["towers"]["text"]["batch_axis"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="towers.text.batch_axis: expected str, got None"):
        trt_manifest(folder)
    (folder / "text.onnx").write_bytes(b"changed")
    with pytest.raises(DataError, match="modified after export"):  # the graphs' hashes are checked
        TrtRunner(EncodeConfig("trt", engine_dir=folder))


def test_image_input_converts_between_encodings():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(3, S, S, 3), dtype=np.uint8)
    chw = np.stack([normalized_from_pixels(p) for p in hwc])
    x = image_input(hwc, "float32_chw", S, "cpu")  # uint8 in, float graph
    assert x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_allclose(x.numpy(), chw, atol=1e-5)
    x = image_input(torch.from_numpy(chw), "uint8_hwc", S, "cpu")  # float in, uint8 graph: exact round trip
    assert x.dtype == torch.uint8
    np.testing.assert_array_equal(x.numpy(), hwc)
    np.testing.assert_array_equal(image_input(chw.astype(np.float64), "float32_chw", S, "cpu").numpy(), chw)
    np.testing.assert_array_equal(image_input(hwc, "uint8_hwc", S, "cpu").numpy(), hwc)
    assert pixels_from_normalized(chw[0]).shape == (S, S, 3)
    for bad in (hwc.astype(np.float32), chw[:, :, :-1], chw.astype(np.int32)):
        with pytest.raises(DataError, match=rf"expected float32 \(B, 3, {S}, {S}\) CLIP-normalised or uint8"):
            image_input(bad, "float32_chw", S, "cpu")


def test_text_input_cuts_and_casts():
    ids = np.zeros((3, CONTEXT), np.int64)
    ids[:, 0] = 49406
    ids[0, 1:3], ids[0, 3] = 5, EOT_TOKEN
    ids[1, 1], ids[2, 1:6], ids[2, 6] = EOT_TOKEN, 7, EOT_TOKEN
    x = text_input(torch.from_numpy(ids), CONTEXT, torch.int32)
    assert x.dtype == torch.int32 and tuple(x.shape) == (3, 7) and x.is_contiguous()
    np.testing.assert_array_equal(x.numpy(), ids[:, :7])
    assert tuple(text_input(ids[:0], CONTEXT, torch.int64).shape) == (0, CONTEXT)
    for bad, message in ((np.zeros((2, CONTEXT + 1), np.int64), rf"{CONTEXT + 1} positions, expected 1 to .* {CONTEXT}"),
                         (ids.astype(np.float32), r"expected an integer \(B, L\) array"),
                         (ids[0], r"expected an integer \(B, L\) array"),
                         (ids[:, :0], rf"0 positions, expected 1 to .* {CONTEXT}")):
        with pytest.raises(DataError, match=message):
            text_input(bad, CONTEXT, torch.int32)


def test_batch_slices_and_dtype_tables():
    assert batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert batch_slices(6, 3) == [slice(0, 3), slice(3, 6)] and batch_slices(0, 3) == []
    for dtype in ("float32", "uint8", "int32", "int64", "float16", "bfloat16"):
        assert TORCH_DTYPES[TRT_DTYPE_NAMES[dtype]] == getattr(torch, dtype)


# ---- The --trt step of `fklip export` without TensorRT: engines.trt_build with a stand-in runner

class OnnxAsTrt:
    """The part of TrtRunner that engines.trt_build uses, running the export's ONNX graphs with
    onnxruntime (image embeddings shifted by `image_shift`) and writing a stand-in plan per tower
    where TrtRunner would build one."""

    def __init__(self, cfg, image_shift: float = 0.0):
        from engines.onnx_runner import OnnxRunner

        self.folder, self.image_shift = cfg.engine_dir, image_shift
        self.inner = OnnxRunner(EncodeConfig("onnx", engine_dir=cfg.engine_dir))
        self.engine_keys, self.plans = {}, {}

    def __enter__(self):
        self.inner.__enter__()
        for tower in ("image", "text"):
            plan = self.folder / "engines" / "stand-in" / f"{tower}.plan"
            plan.parent.mkdir(parents=True, exist_ok=True)
            plan.write_bytes(f"plan of {tower}".encode())
            self.engine_keys[tower], self.plans[tower] = "stand-in", plan
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)

    def encode_images(self, pixels):
        return self.inner.encode_images(pixels) + self.image_shift

    def encode_texts(self, ids):
        return self.inner.encode_texts(ids)


class OracleModel:
    """The PyTorch model of write_tiny_export's graphs, for export.parity's references."""

    def __init__(self, image_oracle, text_oracle):
        self.image_oracle, self.text_oracle = image_oracle, text_oracle

    def encode_image(self, x):
        return torch.from_numpy(self.image_oracle(x.numpy()))

    def encode_text(self, ids):
        return torch.from_numpy(self.text_oracle(ids.numpy()))


def test_build_trt_engines_checks_each_engine_against_pytorch(tmp_path, monkeypatch):
    from engines import trt_build
    from export.manifest import ExportManifest
    from export.onnx_export import ExportError
    from export.pipeline import StagedExport

    folder, image_oracle, text_oracle = write_tiny_export(tmp_path)
    staged = StagedExport(folder, ExportManifest.read(folder), OracleModel(image_oracle, text_oracle),
                          {"image": None, "text": None}, dict(FACTS))
    monkeypatch.setattr(trt_build, "TrtRunner", OnnxAsTrt)
    block = trt_build.build_trt_engines(staged)
    assert block.device == FACTS and list(block.as_dict()) == ["device", "image", "text"]
    for tower, entry in block.engines().items():
        assert list(entry.as_dict()) == ["file", "key", "sha256", "parity"]
        assert entry.file == f"engines/stand-in/{tower}.plan" and entry.key == "stand-in"
        assert entry.sha256 == hashlib.sha256((folder / entry.file).read_bytes()).hexdigest()
        assert entry.parity.passed and entry.parity.random.samples > 0 and entry.parity.real is None
        assert entry.parity.tolerance.min_cosine == 0.99999  # the export's precision, fp32

    monkeypatch.setattr(trt_build, "TrtRunner", lambda cfg: OnnxAsTrt(cfg, image_shift=0.05))
    with pytest.raises(ExportError, match=r"--trt: engines are outside tolerance; nothing was written: "
                                          r"2 problems: image engine: random inputs: min cosine"):
        trt_build.build_trt_engines(staged)


def test_export_trt_runs_the_engines_step_in_the_staging_folder(tiny_checkpoint, tmp_path, monkeypatch):
    """`fklip export --trt`: the CLI passes engines.trt_build's step to run_export, which runs it
    before the swap: the engines and the "trt" block land in --out, or nothing changes."""
    from click.testing import CliRunner

    from engines import trt_build
    from export import pipeline
    from export.manifest import ExportManifest
    from fklip.cli import cli

    monkeypatch.setattr(pipeline, "_trt_preflight", lambda: dict(FACTS))
    monkeypatch.setattr(trt_build, "TrtRunner", OnnxAsTrt)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out), "--trt"])
    assert r.exit_code == 0, r.output
    assert "trt  image engines/stand-in/image.plan: random min cos" in r.output
    m = ExportManifest.read(out)
    assert m.trt.device == FACTS and m.trt.text.file == "engines/stand-in/text.plan"
    assert (out / m.trt.text.file).read_bytes() == b"plan of text"
    assert list(json.loads((out / "manifest.json").read_text())) == [
        "format", "version", "created", "model", "precision", "uint8_input", "opset", "profile", "towers",
        "int8", "trt", "source", "versions", "machine"]

    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(trt_build, "TrtRunner", lambda cfg: OnnxAsTrt(cfg, image_shift=0.05))
    r = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out), "--trt", "--overwrite",
                                 "--precision", "fp16"])
    assert r.exit_code == 2 and "--trt: engines are outside tolerance" in r.output
    assert (out / "manifest.json").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="cfg.trt needs build_engines"):
        from fklip.config import ExportConfig

        pipeline.run_export(ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path / "other", trt=True))


# ---- Needs TensorRT and a CUDA GPU -------------------------------------------------------------

def _needs_trt():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")


@pytest.mark.parametrize("uint8_input, ids_dtype", [(False, "int32"), (True, "int64")])
def test_trt_runner_matches_the_oracle_and_reuses_engines(tmp_path, uint8_input, ids_dtype):
    _needs_trt()
    folder, image_oracle, text_oracle = write_tiny_export(tmp_path, uint8_input, ids_dtype, max_batch=3)
    hwc = np.random.default_rng(1).integers(0, 256, size=(7, S, S, 3), dtype=np.uint8)  # 7 > max batch
    chw = np.stack([normalized_from_pixels(p) for p in hwc])
    ids = random_inputs(text_tower_spec(CONTEXT, D, ids_dtype), 8, seed=3)
    expected_image = image_oracle(hwc if uint8_input else chw)
    cfg = EncodeConfig("trt", engine_dir=folder, device="cuda")
    with TrtRunner(cfg) as runner:
        assert runner.built == {"image": True, "text": True}
        for pixels in (hwc, chw, torch.from_numpy(chw).cuda(), torch.from_numpy(hwc).cuda()):
            emb = runner.encode_images(pixels)
            assert emb.dtype == np.float32 and emb.shape == (7, D)
            np.testing.assert_allclose(emb, expected_image, atol=1e-5)
        np.testing.assert_allclose(runner.encode_texts(ids), text_oracle(ids), atol=1e-6)
        np.testing.assert_allclose(runner.encode_texts(torch.from_numpy(ids[:1]).cuda()), text_oracle(ids[:1]),
                                   atol=1e-6)
        assert runner.encode_images(hwc[:0]).shape == (0, D)
        keys = dict(runner.engine_keys)
    (cache,) = (folder / "engines").glob("timing-*.cache")
    assert cache.stat().st_size > 0
    for tower, key in keys.items():
        record = json.loads((folder / "engines" / key / "engine.json").read_text())
        assert record["tower"] == tower and record["build"]["build_seconds"] > 0
    with TrtRunner(cfg) as runner:
        assert runner.built == {"image": False, "text": False} and runner.engine_keys == keys
        np.testing.assert_allclose(runner.encode_images(hwc), expected_image, atol=1e-5)


def test_engine_from_onnx_reports_parser_and_profile_errors(tmp_path):
    _needs_trt()
    from export.trt import engine_from_onnx

    folder, _, _ = write_tiny_export(tmp_path)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    profiles = profiles_for(text_tower_spec(CONTEXT, D), 2, 4)
    with pytest.raises(DataError, match="broken.onnx: TensorRT's ONNX parser failed"):
        engine_from_onnx(bad, tmp_path / "x.plan", profiles, tmp_path / "timing.cache")
    with pytest.raises(DataError, match="no such ONNX file"):
        engine_from_onnx(tmp_path / "missing.onnx", tmp_path / "x.plan", profiles, tmp_path / "timing.cache")
    with pytest.raises(ConfigError, match="'pixels' has no shape range"):
        engine_from_onnx(folder / "image.onnx", tmp_path / "x.plan", profiles, tmp_path / "timing.cache")
    wrong = {"pixels": ShapeRange((1, 3, S, S + 1), (2, 3, S, S + 1), (4, 3, S, S + 1))}
    with pytest.raises(ConfigError, match=r"differs on the fixed axes \[3\]"):
        engine_from_onnx(folder / "image.onnx", tmp_path / "x.plan", wrong, tmp_path / "timing.cache")
    assert not (tmp_path / "x.plan").exists()
    report = engine_from_onnx(folder / "text.onnx", tmp_path / "t.plan", profiles, tmp_path / "timing.cache",
                              workspace_bytes=1 << 28)
    assert (tmp_path / "t.plan").stat().st_size == report["engine_bytes"] > 0
    config = report["builder_config"]
    assert config["Strongly typed"] is True and config["Flags"] is not None and "TF32" not in config["Flags"]
    assert config["Memory pools (MiB)"] is not None and config["Memory pools (MiB)"]["WORKSPACE"] == 256.0
    assert report["profiles"] == profiles_as_dict(profiles)
