"""The typed export manifest: the JSON layout kept key for key, older and hand-written manifests
read, malformed fields collected, files verified. Hand-written documents; no export is run."""

import copy
import json

import pytest

from export.manifest import (
    MANIFEST_NAME,
    ExportManifest,
    Int8Entry,
    ParityFigures,
    ParityReport,
    TowerEntry,
    sha256_of,
)
from export.specs import Tolerance, image_tower_spec, text_tower_spec
from fklip.errors import ConfigError, DataError

FIGURES = {"samples": 9, "min_cosine": 0.9999981, "mean_cosine": 0.9999993, "max_abs": 2.1e-06, "non_finite": 0}


def _parity(**extra):
    return {"random": FIGURES, "real": {**FIGURES, "samples": 20},
            "tolerance": {"min_cosine": 0.99999, "max_abs": 0.0001}, "passed": True, **extra}


def _tower(name, inputs, batch):
    return {"file": f"{name}.onnx", "sha256": "ab" * 32, "bytes": 1234, "inputs": inputs,
            "outputs": [{"name": f"{name}_emb", "dtype": "float32", "shape": [batch, 64]}], "batch_axis": batch,
            "export_s": 1.234, "opset": 17, "precision": "fp32",
            "parity": _parity(validator="onnxruntime CPUExecutionProvider", check_s=0.5)}


def _int8(name, recipe):
    return {"file": f"{name}.int8.onnx", "sha256": "cd" * 32, "bytes": 456, "quantize_s": 0.25, "recipe": recipe,
            "ops": ["MatMul", "Gemm"], "nodes_excluded": [], "weight_type": "int8", "weight_bits": 7,
            "per_channel": True, "reduce_range": True, "activations": "uint8, per tensor, dynamic",
            "kernel_on_avx2": "u8s8", "parity": {**_parity(validator="onnxruntime CPUExecutionProvider"),
                                                 "tolerance": {"min_cosine": 0.995, "max_abs": 0.05}}}


def _engine(name):
    return {"file": f"engines/k1/{name}.plan", "key": "k1", "sha256": "ef" * 32, "parity": _parity()}


def full_manifest() -> dict:
    """What `fklip export --int8 --trt` writes, key for key."""
    return {
        "format": "fklip-export", "version": 1, "created": "2025-01-02T03:04:05+00:00",
        "model": {"name": "fklip-tiny", "embed_dim": 64, "image_size": 64, "context_length": 77,
                  "truncation": "original", "activation": "quick_gelu"},
        "precision": "fp32", "uint8_input": False, "opset": 17, "profile": {"opt_batch": 8, "max_batch": 32},
        "towers": {"image": _tower("image", [{"name": "pixels", "dtype": "float32",
                                              "shape": ["image_batch", 3, 64, 64]}], "image_batch"),
                   "text": _tower("text", [{"name": "text_ids", "dtype": "int32",
                                            "shape": ["text_batch", "text_length"]}], "text_batch")},
        "int8": {"image": _int8("image", "int8-7bit"), "text": _int8("text", "uint8")},
        "trt": {"device": {"gpu_name": "NVIDIA H100", "compute_capability": "9.0", "trt_version": "10.9.0.34",
                           "cuda": "12.4", "device_index": 0},
                "image": _engine("image"), "text": _engine("text")},
        "source": {"checkpoint": "/runs/tiny/epoch_2.pt", "sha256": "12" * 32, "format": "fklip", "epoch": None},
        "versions": {"fklip": "0.1.0", "torch": "2.5.1"},
        "machine": {"platform": "Linux", "processor": "x86_64"},
    }


def test_a_full_manifest_round_trips_byte_for_byte():
    doc = full_manifest()
    text = json.dumps(doc, indent=2) + "\n"  # what fklip.io.write_json writes
    m = ExportManifest.from_dict(json.loads(text))
    assert m.to_json() == text and m.as_dict() == doc
    assert m.model.activation == "quick_gelu" and m.profile.opt_batch == 8 and m.source.epoch is None
    image = m.towers["image"]
    assert image.input.dtype == "float32" and image.output.shape == ("image_batch", 64) and image.bytes == 1234
    assert image.parity.tolerance == Tolerance(0.99999, 0.0001) and image.parity.validator.startswith("onnxruntime")
    assert list(image.parity.figures()) == ["random", "real"] and image.parity.real.samples == 20
    assert m.int8["text"].recipe == "uint8" and m.int8["text"].ops == ("MatMul", "Gemm")
    assert m.trt.engines()["text"].file == "engines/k1/text.plan" and m.trt.device["device_index"] == 0
    assert m.spec("image") == image_tower_spec(64, 64)
    assert m.spec("text") == text_tower_spec(77, 64, "int32")


def test_objects_built_by_the_exporter_write_the_same_layout():
    doc = full_manifest()
    entry = doc["towers"]["text"]
    spec = text_tower_spec(77, 64, "int32")
    parity = ParityReport(random=ParityFigures(**FIGURES), real=ParityFigures(**{**FIGURES, "samples": 20}),
                          tolerance=Tolerance(0.99999, 0.0001), passed=True)
    built = TowerEntry(file="text.onnx", sha256="ab" * 32, bytes=1234, inputs=spec.inputs, outputs=spec.outputs,
                       batch_axis=spec.batch_axis, export_s=1.234, opset=17, precision="fp32",
                       parity=ParityReport(**{**vars(parity), "validator": "onnxruntime CPUExecutionProvider",
                                              "check_s": 0.5}))
    assert json.dumps(built.as_dict()) == json.dumps(entry)
    q = doc["int8"]["image"]
    info = {k: v for k, v in q.items() if k not in ("file", "sha256", "bytes", "parity")}
    int8 = Int8Entry(file=q["file"], sha256=q["sha256"], bytes=q["bytes"], **info)  # as export.quantize gives them
    assert json.dumps(int8.as_dict()) == json.dumps({k: v for k, v in q.items() if k != "parity"})


def test_older_and_hand_written_manifests_load():
    """Only what a runner needs is required; keys later versions added are None when absent and
    stay absent when written back."""
    doc = full_manifest()
    del doc["model"]["activation"]
    minimal = {"format": "fklip-export", "version": 1, "model": doc["model"], "profile": {"max_batch": 4},
               "towers": {t: {k: doc["towers"][t][k] for k in ("file", "sha256", "inputs", "outputs")}
                          for t in ("image", "text")}}
    m = ExportManifest.from_dict(copy.deepcopy(minimal))
    assert m.model.activation is None and m.precision is None and m.source is None and m.int8 is None
    assert m.towers["image"].parity is None and m.towers["image"].batch_axis is None and m.profile.opt_batch is None
    assert m.as_dict() == {**minimal, "int8": None, "trt": None}  # always written, as null when absent
    with pytest.raises(DataError, match="towers.text.batch_axis: expected str, got None"):
        m.spec("text")
    doc["towers"]["image"]["parity"].pop("real")  # an export without --parity-images
    doc["trt"]["image"]["profiles"] = {"pixels": {}}  # keys this fklip does not know are ignored
    m = ExportManifest.from_dict(doc)
    assert m.towers["image"].parity.real is None and list(m.towers["image"].parity.figures()) == ["random"]


def test_malformed_fields_are_collected_into_one_error():
    doc = full_manifest()
    doc["model"]["embed_dim"] = "64"
    doc["model"]["activation"] = "relu"
    doc["towers"]["image"]["sha256"] = None
    doc["towers"]["text"]["inputs"] = [{"name": "text_ids"}]
    doc["towers"]["text"]["parity"]["passed"] = "yes"
    doc["int8"]["text"] = {"file": "text.int8.onnx"}
    doc["profile"]["max_batch"] = 0
    doc["source"]["epoch"] = "2"
    with pytest.raises(DataError) as e:
        ExportManifest.from_dict(doc, "out/manifest.json")
    message = str(e.value)
    assert message.startswith("out/manifest.json: malformed manifest; re-export: 8 problems: ")
    for part in ('"model.embed_dim" should be int, got \'64\'', '"model.activation" should be one of gelu, quick_gelu',
                 '"towers.image.sha256" should be a string',
                 '"towers.text.inputs" should list {"name", "dtype", "shape"} objects',
                 '"towers.text.parity.passed" should be bool'):
        assert part in message
    for missing, expected in (("model", 'no "model" object'), ("towers", 'no "towers" object')):
        broken = full_manifest()
        del broken[missing]
        with pytest.raises(DataError, match=expected):
            ExportManifest.from_dict(broken)


def _write_folder(tmp_path) -> ExportManifest:
    doc = full_manifest()
    for section, suffix in (("towers", ".onnx"), ("int8", ".int8.onnx")):
        for tower in ("image", "text"):
            path = tmp_path / f"{tower}{suffix}"
            path.write_bytes(f"{tower}{suffix} graph".encode())
            doc[section][tower].update(sha256=sha256_of(path), bytes=path.stat().st_size)
    return ExportManifest.from_dict(doc)


def test_write_then_read_verifies_the_files(tmp_path):
    written = _write_folder(tmp_path)
    assert written.write(tmp_path) == tmp_path / MANIFEST_NAME
    assert (tmp_path / MANIFEST_NAME).read_text() == written.to_json()
    m = ExportManifest.read(tmp_path)
    assert m == written and m.folder == tmp_path and m.graph_path("text", int8=True) == tmp_path / "text.int8.onnx"
    graphs = m.graphs(int8=True)
    assert graphs["image"].file == "image.int8.onnx" and graphs["image"].inputs == m.towers["image"].inputs
    assert graphs["image"].parity.tolerance.min_cosine == 0.995
    (tmp_path / "text.onnx").write_bytes(b"edited")
    with pytest.raises(DataError, match=r"text\.onnx was modified after export"):
        ExportManifest.read(tmp_path)
    ExportManifest.read(tmp_path, verify=False)  # presence only
    ExportManifest.read(tmp_path, int8=True)  # the int8 pair is untouched
    (tmp_path / "image.int8.onnx").unlink()
    with pytest.raises(DataError, match=r"image\.int8\.onnx \(image tower\) is listed in manifest.json but missing"):
        ExportManifest.read(tmp_path, int8=True, verify=False)


def test_int8_graphs_must_exist_when_asked_for(tmp_path):
    import dataclasses

    dataclasses.replace(_write_folder(tmp_path), int8=None).write(tmp_path)
    with pytest.raises(ConfigError, match=r"--int8: the export in .* has no int8 graphs; re-export with"):
        ExportManifest.read(tmp_path, int8=True)
