"""`fklip extract` and `fklip eval` on the demo data with the tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from click.testing import CliRunner

from fklip.cli import cli
from tests.conftest import HANG_S, ROOT, free_port, write_lines

OUTPUTS = ["fashion_image_output.json", "fashion_text_output.json", "metrics.json",
           "test_imgs_predictions.jsonl", "test_txts_predictions.jsonl"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def eval_args(demo, ckpt, out, *extra):
    return ["eval", "--resume", ckpt, "--image-data", demo.val_images, "--text-data", demo.val_queries,
            "--output-dir", out, *extra]


def read_outputs(folder, names=OUTPUTS[:2] + OUTPUTS[3:]):
    return {n: (folder / n).read_text() for n in names}


def test_extract_writes_the_originals_files(tmp_path, small_demo, tiny_checkpoint, tiny_model):
    from fklip.data.archive import ImageArchive, model_input_from_batch
    from fklip.model import Tokenizer

    img_out, txt_out = tmp_path / "img.jsonl", tmp_path / "txt.jsonl"
    result = invoke(["extract", "--extract-image-feats", "--extract-text-feats",
                     "--image-data", small_demo.val_images, "--text-data", small_demo.val_queries,
                     "--img-batch-size", 5, "--text-batch-size", 4, "--resume", tiny_checkpoint,
                     "--image-feat-output-path", img_out, "--text-feat-output-path", txt_out,
                     "--model", "ViT-B-32"])  # ignored: the checkpoint describes itself
    assert result.exit_code == 0, result.output
    images = [json.loads(line) for line in img_out.read_text().splitlines()]
    texts = [json.loads(line) for line in txt_out.read_text().splitlines()]
    queries = [json.loads(line) for line in small_demo.val_queries.read_text().splitlines()]
    with ImageArchive(small_demo.val_images) as archive:
        assert [x["image_id"] for x in images] == archive.ids  # archive order, string ids
        assert list(images[0]) == ["image_id", "feature"] and list(texts[0]) == ["query_id", "feature"]
        pixels = archive.read_batch(archive.ids[:3])
        encoding = archive.encoding
    assert [x["query_id"] for x in texts] == [q["query_id"] for q in queries]  # int ids stay ints
    feats = np.array([x["feature"] for x in images])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(tiny_model.encode_image(model_input_from_batch(pixels, encoding)), dim=-1)
        ref_txt = torch.nn.functional.normalize(tiny_model.encode_text(Tokenizer()([queries[0]["query_text"]])), dim=-1)
    np.testing.assert_allclose(feats[:3], ref_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(texts[0]["feature"], ref_txt[0].numpy(), atol=1e-5)


def test_extract_default_names_and_npy(tmp_path, small_demo, tiny_checkpoint):
    import shutil

    from fklip.data.features import read_features

    archive = tmp_path / "val.64.npz"
    queries = tmp_path / "queries.jsonl"
    shutil.copy(small_demo.val_images, archive)
    shutil.copy(small_demo.val_queries, queries)
    result = invoke(["extract", "--extract-image-feats", "--image-data", archive, "--extract-text-feats",
                     "--text-data", queries, "--resume", tiny_checkpoint])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "val.64.img_feat.jsonl").is_file() and (tmp_path / "queries.txt_feat.jsonl").is_file()
    result = invoke(["extract", "--extract-image-feats", "--image-data", archive, "--resume", tiny_checkpoint,
                     "--format", "npy", "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    f16 = read_features(tmp_path / "val.64.img_feat.npy")
    f32 = read_features(tmp_path / "val.64.img_feat.jsonl")
    assert f16.matrix.dtype == np.float16 and f16.ids == f32.ids
    np.testing.assert_allclose(f16.matrix.astype(np.float32), f32.matrix, atol=2e-3)


def test_extract_flag_errors(tmp_path, small_demo, tiny_checkpoint):
    r = invoke(["extract", "--extract-image-feats", "--resume", tiny_checkpoint])
    assert r.exit_code == 2 and "--extract-image-feats needs --image-data" in r.output
    r = invoke(["extract", "--image-data", small_demo.val_images, "--resume", tiny_checkpoint])
    assert r.exit_code == 2 and "--extract-image-feats is not" in r.output
    r = invoke(["extract", "--extract-text-feats", "--text-data", small_demo.val_queries,
                "--resume", tiny_checkpoint, "--dtype", "float16"])
    assert r.exit_code == 2 and "--dtype float16 needs --format npy" in r.output


def test_eval_equals_extract_then_predict(tmp_path, small_demo, tiny_checkpoint):
    out = tmp_path / "eval"
    result = invoke(eval_args(small_demo, tiny_checkpoint, out, "--image-standard-path", small_demo.val_gold))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["images"] == 12 * 0 + len((out / "test_imgs_predictions.jsonl").read_text().splitlines())
    assert set(metrics["timings_s"]) >= {"load", "encode", "search", "total"}
    assert metrics["environment"]["torch"] and metrics["features"] == "in memory"
    text_score = json.loads((out / "fashion_text_output.json").read_text())
    assert metrics["text_to_image"]["r10"] == text_score["scoreJson"]["r10"]

    feats = tmp_path / "feats"
    assert invoke(["extract", "--extract-image-feats", "--extract-text-feats", "--image-data", small_demo.val_images,
                   "--text-data", small_demo.val_queries, "--resume", tiny_checkpoint,
                   "--image-feat-output-path", feats / "img.jsonl",
                   "--text-feat-output-path", feats / "txt.jsonl"]).exit_code == 0
    pred = tmp_path / "pred"
    result = invoke(["predict", "--image-feats", feats / "img.jsonl", "--text-feats", feats / "txt.jsonl",
                     "--output-images", pred / "test_imgs_predictions.jsonl",
                     "--output-texts", pred / "test_txts_predictions.jsonl",
                     "--text-standard-path", small_demo.val_queries, "--image-standard-path", small_demo.val_gold,
                     "--text-out-path", pred / "fashion_text_output.json",
                     "--image-out-path", pred / "fashion_image_output.json"])
    assert result.exit_code == 0, result.output
    assert read_outputs(pred) == read_outputs(out)


def test_derived_image_gold_equals_the_gold_file(tmp_path, small_demo, tiny_checkpoint):
    """The demo's val images file lists, for each image, the query that lists it."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke(eval_args(small_demo, tiny_checkpoint, a, "--image-standard-path", small_demo.val_gold)).exit_code == 0
    assert invoke(eval_args(small_demo, tiny_checkpoint, b)).exit_code == 0
    assert read_outputs(a) == read_outputs(b)
    assert json.loads((b / "metrics.json").read_text())["counts"]["image_gold"] == "derived from item_ids"


def test_memory_mapped_features_give_the_same_results(tmp_path, small_demo, tiny_checkpoint, monkeypatch):
    import engines.eval as pipeline

    assert invoke(eval_args(small_demo, tiny_checkpoint, tmp_path / "mem")).exit_code == 0
    monkeypatch.setattr(pipeline, "MEMMAP_SHARE", 0.0)
    result = invoke(eval_args(small_demo, tiny_checkpoint, tmp_path / "disk"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "disk" / "metrics.json").read_text())["features"] == "memory-mapped"
    assert read_outputs(tmp_path / "disk") == read_outputs(tmp_path / "mem")
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == OUTPUTS  # scratch files removed


def test_torchrun_two_processes_match_one(tmp_path, small_demo, tiny_checkpoint):
    # batch size 1: every row is computed alone, so sharding cannot change a single float
    args = ["--img-batch-size", "1", "--text-batch-size", "1"]
    assert invoke(eval_args(small_demo, tiny_checkpoint, tmp_path / "one", *args)).exit_code == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "fklip",
           *map(str, eval_args(small_demo, tiny_checkpoint, tmp_path / "two", *args))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_outputs(tmp_path / "two") == read_outputs(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["environment"]["world_size"] == 2


def test_eval_bad_inputs(tmp_path, small_demo, tiny_checkpoint):
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo

    other = generate_demo(DemoDataConfig(out=tmp_path / "d32", size=32, train=8, val=4, kb=8))
    r = invoke(["eval", "--resume", tiny_checkpoint, "--image-data", other.val_images,
                "--text-data", other.val_queries, "--output-dir", tmp_path / "o1"])
    assert r.exit_code == 2 and "images are 32x32 but model fklip-tiny expects 64x64" in r.output
    bad_queries = write_lines(tmp_path / "q.jsonl", [{"query_id": 1, "query_text": "x", "item_ids": ["424242"]}])
    r = invoke(["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images,
                "--text-data", bad_queries, "--output-dir", tmp_path / "o2"])
    assert r.exit_code == 2 and "1 gold ids are not among the images" in r.output and "'424242'" in r.output
    r = invoke(eval_args(small_demo, tmp_path / "none.pt", tmp_path / "o3"))
    assert r.exit_code == 2 and "no such checkpoint" in r.output
    gold = small_demo.val_gold.read_text().splitlines()
    repeated = write_lines(tmp_path / "g.jsonl", [*gold, gold[0]])  # the original: last line wins
    r = invoke(eval_args(small_demo, tiny_checkpoint, tmp_path / "o4", "--image-standard-path", repeated))
    first = json.loads(gold[0])["image_id"]
    assert r.exit_code == 2 and f"g.jsonl: bad val images file: line {len(gold) + 1}: duplicate image_id " \
        f"{json.dumps(first)} (first on line 1)" in r.output, r.output
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_search_runs_on_this_ranks_device_not_the_flags():
    """Under torchrun `--device cuda:0` means cuda:LOCAL_RANK for each rank; the search must go
    there too, not to the flag's device (every rank on GPU 0). One process keeps its own."""
    from engines.eval import rank_search_config
    from fklip.config import SearchConfig
    from fklip.distributed import DistContext

    flag = SearchConfig(device="cuda:0")
    assert rank_search_config(flag, DistContext(rank=3, world_size=4, local_rank=3, device="cuda:3")).device == "cuda:3"
    assert rank_search_config(flag, DistContext(device="cuda:0")) is flag
    on_cpu = SearchConfig(device="cpu")  # a CPU search under torchrun stays on the CPU
    assert rank_search_config(on_cpu, DistContext(rank=1, world_size=2, local_rank=1, device="cuda:1")) is on_cpu


def test_a_nan_image_names_the_archive_and_the_image(tmp_path, small_demo, tiny_checkpoint):
    """An archive member whose float32 pixels are all NaN: one line naming the archive file and
    the image id(s), exit code 2, and nothing written, for `fklip extract` and `fklip eval`."""
    from tests.conftest import run_fklip

    with np.load(small_demo.val_images) as npz:
        images = {key: npz[key] for key in npz.files}
    ids = list(images)
    assert images[ids[0]].dtype == np.float32
    images[ids[2]] = np.full_like(images[ids[2]], np.nan)
    one_bad = tmp_path / "val.64.npz"
    np.savez(one_bad, **images)
    images[ids[5]] = np.full_like(images[ids[5]], np.inf)
    two_bad = tmp_path / "two" / "val.64.npz"
    two_bad.parent.mkdir()
    np.savez(two_bad, **images)

    def error_line(result) -> str:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return next(line for line in result.stderr.splitlines() if "non-finite" in line)

    r = run_fklip("extract", "--extract-image-feats", "--image-data", str(one_bad), "--resume", str(tiny_checkpoint),
                  "--image-feat-output-path", str(tmp_path / "out" / "feats.jsonl"))
    line = error_line(r)
    assert f"{one_bad}: image '{ids[2]}' gives non-finite features (its pixels hold NaN or inf)" in line
    r = run_fklip("eval", "--resume", str(tiny_checkpoint), "--image-data", str(two_bad),
                  "--text-data", str(small_demo.val_queries), "--output-dir", str(tmp_path / "out"))
    line = error_line(r)
    assert (f"{two_bad}: 2 images ('{ids[2]}', '{ids[5]}') give non-finite features "
            "(their pixels hold NaN or inf)") in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two", "val.64.npz"]


def test_plain_encoding_names_non_finite_images(tmp_path, small_demo, tiny_model):
    """fklip.encode (the knowledge refresh's path, through the pipeline) checks,
    and tells NaN pixels from a model that gives NaN on finite ones."""
    import copy

    import pytest

    from fklip.data.archive import ImageArchive
    from fklip.encode import encode_archive
    from fklip.errors import DataError

    with np.load(small_demo.val_images) as npz:
        images = {key: npz[key] for key in npz.files}
    ids = list(images)
    images[ids[1]] = np.full_like(images[ids[1]], np.nan)
    path = tmp_path / "kb.npz"
    np.savez(path, **images)
    with ImageArchive(path) as archive, pytest.raises(
            DataError, match=rf"kb.npz: image '{ids[1]}' gives non-finite features \(its pixels hold NaN or inf\)$"):
        encode_archive(tiny_model, archive, batch_size=4)
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(broken.visual.parameters()).fill_(float("nan"))
    with ImageArchive(small_demo.val_images) as archive, pytest.raises(
            DataError, match=r"images \(.*, \.\.\. \(\d+ more\)\) give non-finite features \(their pixels are all "
                             r"finite: the model gives NaN or inf"):
        encode_archive(broken, archive, batch_size=8)
