"""`fklip export`: graph structure, parity against PyTorch, the manifest, and failures that leave
nothing behind. fklip-tiny everywhere; ViT-B-32 (random weights) where its size matters."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_fklip


def _export(checkpoint, out, **kw):
    from export.pipeline import run_export
    from fklip.config import ExportConfig

    return run_export(ExportConfig(checkpoint=checkpoint, out=out, **kw))


def _session(path):
    from export.onnx_export import ort_session

    return ort_session(path)


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, small_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    manifest = _export(tiny_checkpoint, out, int8=True, parity_images=small_demo.val_images,
                       parity_texts=small_demo.val_queries, parity_samples=20)
    return out, manifest


def test_graph_structure(tiny_export, tiny_spec):
    out, _ = tiny_export
    for tower, inp, out_name in (("image", "pixels", "image_emb"), ("text", "text_ids", "text_emb")):
        model = onnx.load(str(out / f"{tower}.onnx"))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        ops = [n.op_type for n in model.graph.node]
        layers = 2  # fklip-tiny: 2 blocks per tower, 2 LayerNorms each, plus pre/post or final
        assert ops.count("LayerNormalization") == 2 * layers + (2 if tower == "image" else 1)
        assert "ReduceMean" not in ops  # LayerNorm not decomposed
        assert "If" not in ops  # TensorRT's parser refuses the If a traced squeeze(1) writes
        assert "Mod" not in ops  # unflatten(-1, ...) traced to a Mod on constants
        (graph_in,), (graph_out,) = model.graph.input, model.graph.output
        assert graph_in.name == inp and graph_out.name == out_name
        in_dims = [d.dim_param or d.dim_value for d in graph_in.type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in graph_out.type.tensor_type.shape.dim]
        if tower == "image":
            assert in_dims == ["image_batch", 3, 64, 64] and out_dims == ["image_batch", 64]
        else:
            assert in_dims == ["text_batch", "text_length"] and out_dims == ["text_batch", 64]
            assert graph_in.type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert graph_out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_manifest_records_files_and_measurements(tiny_export, tiny_checkpoint, small_demo):
    from export.manifest import sha256_of
    from fklip.data.archive import ImageArchive
    from fklip.data.jsonl import read_text_queries

    with ImageArchive(small_demo.val_images) as archive:
        real = {"image": min(20, len(archive)), "text": min(20, len(read_text_queries(small_demo.val_queries)))}

    out, manifest = tiny_export
    text = (out / "manifest.json").read_text()
    on_disk = json.loads(text)
    assert text == manifest.to_json() and on_disk == manifest.as_dict()
    assert on_disk["format"] == "fklip-export" and on_disk["precision"] == "fp32"
    assert on_disk["model"] == {"name": "fklip-tiny", "embed_dim": 64, "image_size": 64,
                                "context_length": 77, "truncation": "original", "activation": "quick_gelu"}
    assert on_disk["source"]["sha256"] == sha256_of(tiny_checkpoint)
    for section in ("towers", "int8"):
        for tower in ("image", "text"):
            entry = on_disk[section][tower]
            assert entry["sha256"] == sha256_of(out / entry["file"])
            parity = entry["parity"]
            assert parity["passed"] and parity["real"]["samples"] == real[tower]
            assert parity["random"]["samples"] > 0
            assert 0.9 < parity["real"]["min_cosine"] <= 1.0
    assert on_disk["towers"]["image"]["parity"]["real"]["min_cosine"] > 0.99999
    assert on_disk["int8"]["image"]["parity"]["tolerance"]["min_cosine"] == 0.995
    assert on_disk["int8"]["image"]["recipe"] == "int8-7bit" and on_disk["int8"]["text"]["recipe"] == "uint8"
    assert {"torch", "onnx", "onnxruntime", "open_clip", "fklip"} <= set(on_disk["versions"])
    assert sorted(p.name for p in out.iterdir()) == ["image.int8.onnx", "image.onnx", "manifest.json",
                                                     "text.int8.onnx", "text.onnx"]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batch_sizes_through_one_graph(tiny_export, tiny_model, batch):
    from export.specs import image_tower_spec, random_inputs, text_tower_spec

    out, _ = tiny_export
    pixels = random_inputs(image_tower_spec(64, 64), batch, seed=batch)
    got = _session(out / "image.onnx").run(None, {"pixels": pixels})[0]
    with torch.no_grad():
        ref = F.normalize(tiny_model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    ids = random_inputs(text_tower_spec(77, 64), batch, seed=batch)
    got = _session(out / "text.onnx").run(None, {"text_ids": ids})[0]
    with torch.no_grad():
        ref = F.normalize(tiny_model.encode_text(torch.from_numpy(ids.astype(np.int64))), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_text_graph_keeps_the_causal_mask(tiny_export):
    """Tokens after the end token must not change the embedding (they would without the mask),
    and a batch cut after its last end token gives the same result as the full context."""
    from export.specs import random_inputs, text_tower_spec

    out, _ = tiny_export
    session = _session(out / "text.onnx")
    ids = random_inputs(text_tower_spec(77, 64), 5, seed=3, length=20)[:4]  # ends before position 19
    cut = ids[:, :int(ids.argmax(1).max()) + 1]
    padded = np.zeros((4, 77), np.int32)
    padded[:, :cut.shape[1]] = cut
    junk = padded.copy()
    junk[:, cut.shape[1]:] = np.random.default_rng(0).integers(1, 40000, size=(4, 77 - cut.shape[1]))
    a, b, c = (session.run(None, {"text_ids": x})[0] for x in (cut, padded, junk))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(b, c, atol=1e-6)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_last_block_at_the_pooled_token_only(tiny_model, attention):
    """The towers run their last block for the pooled token only (ExportBlock.forward_one):
    the class token, or one row per sample under the causal mask; it must equal the whole
    block's output at that token."""
    from export.towers import MASK_VALUE, build_towers

    towers = build_towers(tiny_model, attention=attention)
    image_block, text_block = towers["image"].blocks[-1], towers["text"].blocks[-1]
    assert hasattr(text_block.attn, "q_proj") and not hasattr(towers["text"].blocks[0].attn, "q_proj")
    width = text_block.ln_1.normalized_shape[0]
    x = torch.randn(5, 9, width, generator=torch.Generator().manual_seed(0))
    mask = torch.full((9, 9), MASK_VALUE).triu_(1)
    pool = torch.tensor([8, 0, 3, 5, 1])
    rows = torch.arange(5) * 9 + pool
    with torch.no_grad():
        full_text = text_block(x, mask).flatten(0, 1)[rows]
        one_text = text_block.forward_one(x, rows, mask.index_select(0, pool)[:, None, None, :])
        full_image, one_image = image_block(x)[:, 0], image_block.forward_one(x)
    torch.testing.assert_close(one_text, full_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_image, full_image, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one_text, x.flatten(0, 1)[rows], atol=1e-3)  # the block did something


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_layernorm_and_softmax_fp32(tiny_checkpoint, tmp_path, precision):
    out = tmp_path / precision
    manifest = _export(tiny_checkpoint, out, precision=precision)
    for tower in ("image", "text"):
        assert manifest.towers[tower].parity.passed
        model = onnx.shape_inference.infer_shapes(onnx.load(str(out / f"{tower}.onnx")))
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        types.update({i.name: i.data_type for i in model.graph.initializer})
        reduced = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
        norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
        matmul_types = [types.get(n.input[1]) for n in model.graph.node if n.op_type == "MatMul"]
        assert matmul_types.count(reduced) >= 4  # the transformer's products run reduced


def test_fp16_export_survives_activations_that_overflow_fp16_layernorm(tiny_model, tiny_spec, tmp_path):
    """Residual activations of a few hundred are fine in fp16, but their squares (in a fp16
    LayerNorm's variance) overflow: the export must stay within tolerance, not go NaN."""
    import copy

    from fklip.model import save_checkpoint

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.positional_embedding.mul_(30000.0)
        model.visual.positional_embedding.mul_(30000.0)
    big = model.token_embedding(torch.arange(10)).float() + model.positional_embedding[:10]
    assert big.abs().max() > 300  # (x - mean)^2 > 65504 for these
    ckpt = tmp_path / "big.pt"
    save_checkpoint(ckpt, model, tiny_spec)
    manifest = _export(ckpt, tmp_path / "out", precision="fp16")
    for tower in ("image", "text"):
        assert manifest.towers[tower].parity.random.non_finite == 0
        assert manifest.towers[tower].parity.passed


def test_uint8_input_and_int64_ids(tiny_checkpoint, tiny_model, small_demo, tmp_path):
    from fklip.data.archive import ImageArchive, model_input_from_batch

    out = tmp_path / "u8"
    _export(tiny_checkpoint, out, uint8_input=True, ids_dtype="int64")
    model = onnx.load(str(out / "image.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == \
        ["image_batch", 64, 64, 3]
    assert onnx.load(str(out / "text.onnx")).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    # TensorRT takes uint8 only as a network input into a Cast
    assert {n.op_type for n in model.graph.node if "pixels" in n.input} == {"Cast"}
    with ImageArchive(small_demo.val_images) as archive:
        batch = archive.read_batch(list(archive.ids)[:9])
        encoding = archive.encoding
    if encoding == "float32_chw":
        from fklip.data.archive import pixels_from_normalized

        batch = np.stack([pixels_from_normalized(x) for x in batch])
    got = _session(out / "image.onnx").run(None, {"pixels": batch})[0]
    with torch.no_grad():
        ref = F.normalize(tiny_model.encode_image(model_input_from_batch(batch, "uint8_hwc")), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_check_graph_refuses_what_tensorrt_cannot_parse(tmp_path):
    """check_graph names an If node and a uint8 input that feeds anything but a Cast: the two
    things a traced export wrote that TensorRT's ONNX parser refuses."""
    from onnx import TensorProto, helper

    from export.onnx_export import ExportError, check_graph
    from export.specs import image_tower_spec

    spec = image_tower_spec(8, 4, uint8_input=True)
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["image_batch", 8, 8, 3])
    emb = helper.make_tensor_value_info("image_emb", TensorProto.FLOAT, ["image_batch", 4])
    tail = [helper.make_node("Flatten", ["chw"], ["flat"]),
            helper.make_node("MatMul", ["flat", "proj"], ["image_emb"])]
    inits = [helper.make_tensor("proj", TensorProto.FLOAT, [192, 4], [0.01] * 768)]
    branch = helper.make_graph([helper.make_node("Identity", ["chw"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])

    def write(name, head, extra=()):
        graph = helper.make_graph(head + list(extra) + tail, name, [pixels], [emb], inits)
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    cast_first = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", ["f"], ["chw"], perm=[0, 3, 1, 2])]
    check_graph(write("good", cast_first), spec)  # the shape the exporter now writes
    transpose_first = [helper.make_node("Transpose", ["pixels"], ["t"], perm=[0, 3, 1, 2]),
                       helper.make_node("Cast", ["t"], ["chw"], to=TensorProto.FLOAT)]
    with pytest.raises(ExportError, match="uint8 input 'pixels' feeds a Transpose node"):
        check_graph(write("u8", transpose_first), spec)
    cond = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])),
            helper.make_node("If", ["c"], ["unused"], then_branch=branch, else_branch=branch)]
    with pytest.raises(ExportError, match=r"1 If node\(s\)"):
        check_graph(write("cond", cast_first, cond), spec)


def test_failed_parity_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from export import specs
    from export.onnx_export import ExportError

    out = tmp_path / "out"
    monkeypatch.setitem(specs.TOLERANCES, "fp32", specs.Tolerance(min_cosine=1.5, max_abs=0.0))
    with pytest.raises(ExportError, match="outside its tolerance.*min cosine"):
        _export(tiny_checkpoint, out)
    assert list(tmp_path.iterdir()) == []  # no out folder, no partial folder


def test_earlier_export_kept_unless_forced(tiny_checkpoint, tmp_path, monkeypatch):
    from export import specs
    from export.onnx_export import ExportError
    from fklip.errors import ConfigError

    out = tmp_path / "out"
    first = _export(tiny_checkpoint, out)
    with pytest.raises(ConfigError, match="--overwrite"):
        _export(tiny_checkpoint, out)
    monkeypatch.setitem(specs.TOLERANCES, "fp32", specs.Tolerance(min_cosine=1.5, max_abs=0.0))
    with pytest.raises(ExportError):
        _export(tiny_checkpoint, out, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["created"] == first.created
    monkeypatch.undo()
    second = _export(tiny_checkpoint, out, overwrite=True, precision="fp16")
    assert second.precision == "fp16" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        _export(tiny_checkpoint, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_cli_export_and_errors(tiny_checkpoint, tmp_path):
    out = tmp_path / "cli"
    r = run_fklip("export", str(tiny_checkpoint), "--out", str(out), "--onnx", "--opt-batch", "8",
                  "--max-batch", "32")
    assert r.returncode == 0, r.stderr
    assert "image image.onnx" in r.stdout and "min cos" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["profile"] == {"opt_batch": 8, "max_batch": 32}
    for args, message in ((["--opt-batch", "64", "--max-batch", "8"], "--opt-batch 64 is larger than --max-batch 8"),
                          (["--int8", "--precision", "fp16"], "--int8"),
                          (["--parity-images", str(tmp_path / "none.npz")], "--parity-images"),
                          (["--max-batch", "0"], "--max-batch")):
        bad = tmp_path / "bad"
        r = run_fklip("export", str(tiny_checkpoint), "--out", str(bad), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_trt_without_tensorrt_says_what_is_missing(tiny_checkpoint, tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from fklip.cli import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as where it is missing
    out = tmp_path / "trt"
    r = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out), "--trt"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "fklip[trt]" in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_vit_b_32_export_parity(tmp_path):
    from fklip.model import ModelSpec, build_model, save_checkpoint

    spec = ModelSpec.from_name("ViT-B-32")
    torch.manual_seed(0)
    ckpt = tmp_path / "b32.pt"
    save_checkpoint(ckpt, build_model(spec), spec)
    manifest = _export(ckpt, tmp_path / "b32")
    for tower in ("image", "text"):
        parity = manifest.towers[tower].parity
        assert parity.passed and parity.random.min_cosine > 0.99999
    image = onnx.load(str(tmp_path / "b32" / "image.onnx"), load_external_data=False)
    assert [n.op_type for n in image.graph.node].count("LayerNormalization") == 2 * 12 + 2
