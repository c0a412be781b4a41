"""`fklip eval` and `fklip extract` with `--engine`: the same outputs as torch, and clear errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from export.manifest import ExportManifest
from fklip.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-export") / "tiny"
    result = invoke("export", tiny_checkpoint, "--out", out, "--int8")
    assert result.exit_code == 0, result.output
    return out


def _eval(demo, out, *engine):
    return invoke("eval", "--image-data", demo.val_images, "--text-data", demo.val_queries,
                  "--image-standard-path", demo.val_gold, "--output-dir", out, "--img-batch-size", 5,
                  *engine)


def test_eval_through_onnx_equals_torch(small_demo, tiny_checkpoint, export_dir, tmp_path):
    torch_run = _eval(small_demo, tmp_path / "torch", "--resume", tiny_checkpoint)
    onnx_run = _eval(small_demo, tmp_path / "onnx", "--engine", "onnx", "--engine-dir", export_dir)
    checked = _eval(small_demo, tmp_path / "checked", "--engine", "onnx", "--engine-dir", export_dir,
                    "--resume", tiny_checkpoint)
    for result in (torch_run, onnx_run, checked):
        assert result.exit_code == 0, result.output
    for name in ("test_txts_predictions.jsonl", "test_imgs_predictions.jsonl", "fashion_text_output.json"):
        assert (tmp_path / "torch" / name).read_text() == (tmp_path / "onnx" / name).read_text()
    metrics = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert metrics["checkpoint"]["engine"] == "onnx"
    assert metrics["checkpoint"]["engine_dir"] == str(export_dir)


def test_eval_with_fused_towers(small_demo, tiny_checkpoint, tmp_path):
    """--fused (export.towers with SDPA attention) ranks as the open_clip modules do."""
    plain = _eval(small_demo, tmp_path / "plain", "--resume", tiny_checkpoint)
    fused = _eval(small_demo, tmp_path / "fused", "--resume", tiny_checkpoint, "--fused")
    for result in (plain, fused):
        assert result.exit_code == 0, result.output
    for name in ("test_txts_predictions.jsonl", "test_imgs_predictions.jsonl", "fashion_text_output.json"):
        assert (tmp_path / "plain" / name).read_text() == (tmp_path / "fused" / name).read_text()
    assert json.loads((tmp_path / "fused" / "metrics.json").read_text())["checkpoint"]["fused"] is True


def test_extract_through_onnx_and_int8(small_demo, tiny_checkpoint, export_dir, tmp_path):
    from fklip.data.features import read_features

    feats = {}
    for name, engine in (("torch", ["--resume", tiny_checkpoint]),
                         ("onnx", ["--engine", "onnx", "--engine-dir", export_dir]),
                         ("int8", ["--engine", "onnx", "--engine-dir", export_dir, "--int8"])):
        result = invoke("extract", "--extract-image-feats", "--image-data", small_demo.val_images,
                        "--extract-text-feats", "--text-data", small_demo.val_queries,
                        "--image-feat-output-path", tmp_path / f"{name}.img.jsonl",
                        "--text-feat-output-path", tmp_path / f"{name}.txt.jsonl", *engine)
        assert result.exit_code == 0, result.output
        feats[name] = {k: read_features(tmp_path / f"{name}.{k}.jsonl") for k in ("img", "txt")}
    manifest = ExportManifest.read(export_dir)
    for kind in ("img", "txt"):
        ref = feats["torch"][kind]
        for name, section in (("onnx", "towers"), ("int8", "int8")):
            got = feats[name][kind]
            assert got.ids == ref.ids
            cos = (got.matrix * ref.matrix).sum(axis=1)
            tol = getattr(manifest, section)["image" if kind == "img" else "text"].parity.tolerance
            assert cos.min() >= tol.min_cosine
            assert np.abs(got.matrix - ref.matrix).max() <= tol.max_abs
        assert np.abs(feats["onnx"][kind].matrix - ref.matrix).max() < 1e-5


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "onnx"], "--engine onnx needs --engine-dir"),
    (["--engine", "torch"], "--engine torch needs --resume"),
    (["--engine", "onnx", "--engine-dir", "EXPORT", "--precision", "bf16"], "--precision bf16: the onnx engine runs the graphs as exported (fp32)"),
    (["--engine", "onnx", "--engine-dir", "EXPORT", "--compile"], "--compile applies to --engine torch"),
    (["--resume", "CKPT", "--int8"], "--int8"),
    (["--resume", "CKPT", "--fused", "--precision", "amp"], "--fused runs weights in one dtype"),
    (["--engine", "onnx", "--engine-dir", "EXPORT", "--fused"], "--fused applies to --engine torch"),
    (["--engine", "onnx", "--engine-dir", "EXPORT", "--truncation", "openai"], "--truncation openai"),
    (["--engine", "onnx", "--engine-dir", "EXPORT", "--resume", "OTHER"], "is not the checkpoint"),
    (["--engine", "onnx", "--engine-dir", "NOWHERE"], "NOWHERE"),
])
def test_engine_flag_errors(args, message, small_demo, tiny_checkpoint, export_dir, tmp_path, tiny_model, tiny_spec):
    from fklip.model import save_checkpoint

    other = tmp_path / "other.pt"
    save_checkpoint(other, tiny_model, tiny_spec, epoch=3)  # same weights, another file
    swap = {"EXPORT": export_dir, "CKPT": tiny_checkpoint, "OTHER": other, "NOWHERE": tmp_path / "NOWHERE"}
    result = _eval(small_demo, tmp_path / "out", *[swap.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
