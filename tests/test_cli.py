import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fklip.cli import PENDING, FklipGroup, _pending_command, cli
from tests.conftest import run_fklip, write_lines

COMMANDS = ["train", "export", "extract", "predict", "eval", "bench", "data", "demo"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].strip().splitlines()]
    assert sorted(listed) == sorted(COMMANDS)
    for name in COMMANDS + ["data demo", "data inspect", "data models"]:
        sub = invoke(*name.split(), "--help")
        assert sub.exit_code == 0 and "Usage:" in sub.output, name


@pytest.mark.parametrize("name", sorted(PENDING) or ["later"])
def test_pending_commands_say_so_and_exit_3(name):
    what, issue = PENDING.get(name, ("something a later release adds", 99))  # none pending: a stand-in
    group = FklipGroup()
    group.add_command(_pending_command(name, what, issue))
    result = CliRunner().invoke(group, [name, "--model", "ViT-B-32"])
    assert result.exit_code == 3
    assert f"`fklip {name}`" in result.output and "not available" in result.output
    assert f"issue {issue}" in result.output


def test_python_dash_m_is_the_same_cli():
    result = run_fklip("--version")
    assert result.returncode == 0 and "fklip, version" in result.stdout
    result = run_fklip("bench", "--images", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_data_demo_and_inspect(tmp_path):
    out = tmp_path / "d"
    result = invoke("data", "demo", "--out", str(out), "--train", "12", "--val", "6", "--kb", "10",
                    "--size", "32", "--encoding", "uint8_hwc")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["config"]["size"] == 32 and manifest["config"]["encoding"] == "uint8_hwc"
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "demo.json")
    assert len(files) == 10
    result = invoke("data", "inspect", *map(str, files))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "image archive" in text and "uint8_hwc, 32x32" in text
    for what in ("concept fathers", "train queries with phrases", "concept queries", "val queries",
                 "val images"):
        assert what in text


def test_inspect_checks_every_file_and_knows_feature_files(tmp_path):
    """Every path is checked: a summary on stdout per good file, one error line per bad one (the
    same rules as the commands, through the same readers), then a count, and exit code 2."""
    from fklip.data.features import write_features

    rng = np.random.default_rng(0)
    m = rng.standard_normal((3, 4)).astype(np.float32)
    write_features(tmp_path / "img.jsonl", ["94", "95", "96"], m, id_field="image_id")
    write_features(tmp_path / "txt.npy", [10, 11, 12], m, id_field="query_id", fmt="npy", dtype="float16")
    gold = write_lines(tmp_path / "gold.jsonl", [{"query_id": 10, "item_ids": ["94"]}])
    good = [tmp_path / "img.jsonl", tmp_path / "txt.npy", tmp_path / "txt.ids.jsonl", gold]
    m[1] = 0
    write_features(tmp_path / "zero.npy", [1, 2, 3], m + 1, id_field="query_id", fmt="npy")
    np.save(tmp_path / "zero.npy", m)  # a broken extraction's matrix
    (tmp_path / "dir.jsonl").mkdir()
    bad = {
        write_lines(tmp_path / "q.jsonl", [{"query_id": 10, "query_text": "a", "item_ids": ["94"]},
                                           {"query_id": "10", "query_text": "b", "item_ids": ["95"]}]):
            'q.jsonl: bad val queries file: line 2: duplicate query_id "10" (first on line 1 as 10',
        write_lines(tmp_path / "i.jsonl", [{"image_id": "94", "item_ids": [10]}, {"image_id": "94", "item_ids": [11]}]):
            'i.jsonl: bad val images file: line 2: duplicate image_id "94" (first on line 1)',
        write_lines(tmp_path / "t.jsonl", [{**TRAIN_LINE, "query_id": 3}, {**TRAIN_LINE, "query_id": 3}]):
            "t.jsonl: bad train queries file: line 2: duplicate query_id 3 (first on line 1)",
        tmp_path / "zero.npy": "zero.npy: bad features file: only zeros on 1 0-based row: 1",
        tmp_path / "dir.jsonl": "dir.jsonl: is a directory",
        "/dev/null": "/dev/null: is not a regular file (a character device)",
    }
    result = run_fklip("data", "inspect", *map(str, good[:2]), *map(str, bad), *map(str, good[2:]))
    assert result.returncode == 2, result.stderr
    out = result.stdout.strip().splitlines()
    assert out == [f"{tmp_path / 'img.jsonl'}: features, JSON lines, 3 rows, dim 4, float32, id field image_id",
                   f"{tmp_path / 'txt.npy'}: features, .npy with txt.ids.jsonl, 3 rows, dim 4, float16, "
                   "id field query_id",
                   f"{tmp_path / 'txt.ids.jsonl'}: ids file of .npy features, for txt.npy, 3 ids, dim 4, float16, "
                   "id field query_id",
                   f"{gold}: text-to-image gold, 1 records"]
    err = result.stderr.strip().splitlines()
    assert len(err) == len(bad) + 1 and all(line.startswith("fklip: error: ") for line in err), result.stderr
    for line, expected in zip(err, bad.values()):
        assert expected in line, (expected, line)
    assert err[-1].startswith(f"fklip: error: {len(bad)} of {len(good) + len(bad)} files are bad: ")


TRAIN_LINE = {"query_text": "a", "item_ids": ["1"], "phrases": [], "match_phrases": []}


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    bad_json = write_lines(tmp_path / "q.jsonl", [{"query_id": 1, "query_text": "x", "item_ids": []},
                                                  "{oops"])
    arr = tmp_path / "a.npz"
    np.savez(arr, good=np.zeros((3, 8, 8), np.float32), bad=np.zeros((3, 8), np.float32))
    junk = tmp_path / "c.pt"
    junk.write_bytes(b"\x00" * 10)
    unknown = write_lines(tmp_path / "u.jsonl", [{"foo": 1}])
    cases = [
        (["data", "inspect", str(bad_json)], "q.jsonl, line 2: malformed JSON"),
        (["data", "inspect", str(arr)], "key 'bad'"),
        (["data", "inspect", str(junk)], "not a PyTorch checkpoint"),
        (["data", "inspect", str(unknown)], "cannot tell the format"),
        (["data", "inspect", str(tmp_path / "none.npz")], "no such file"),
        (["data", "demo", "--out", str(tmp_path / "x"), "--size", "3"], "--size"),
        (["demo", "--out", str(tmp_path / "y"), "--batch-size", "0"], "--batch-size"),
        (["demo", "--out", str(tmp_path / "y"), "--device", "tpu"], "--device"),
    ]
    if not torch.cuda.is_available():
        cases.append((["demo", "--out", str(tmp_path / "y"), "--device", "cuda"], "no CUDA device"))
    for args, expected in cases:
        result = run_fklip(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fklip: error: "), result.stderr
        assert expected in lines[0], (expected, lines[0])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-written


def test_inspect_checkpoint_and_trust_flag(tmp_path, tiny_model, tiny_spec):
    from fklip.model import save_checkpoint

    save_checkpoint(tmp_path / "m.pt", tiny_model, tiny_spec, epoch=2)
    result = invoke("data", "inspect", str(tmp_path / "m.pt"))
    assert result.exit_code == 0
    assert "fklip checkpoint, model fklip-tiny" in result.output and "epoch 2" in result.output
    assert "activation quick_gelu" in result.output
    torch.save({"epoch": 1, "state_dict": tiny_model.state_dict(), "args": np.dtype("float32").type},
               tmp_path / "p.pt")
    refused = run_fklip("data", "inspect", str(tmp_path / "p.pt"))
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr
    trusted = run_fklip("data", "inspect", "--trust-checkpoint", str(tmp_path / "p.pt"))
    assert trusted.returncode == 0 and "original checkpoint" in trusted.stdout
    # a file that does not record its activation: the one chosen, and a warning line on stderr
    assert "activation quick_gelu" in trusted.stdout
    (warning,) = [line for line in trusted.stderr.splitlines() if "WARNING" in line]
    assert f"{tmp_path / 'p.pt'}: a {{\"epoch\", \"state_dict\"}} checkpoint (the original's, PAI) does not " \
           "record its architecture or activation; built the tensor shapes' ViT with QuickGELU" in warning


def test_models_lists_tiny_and_aliases():
    result = invoke("data", "models")
    names = result.output.split()
    assert {"fklip-tiny", "ViT-B-32", "ViT-B-32-quickgelu", "ViT-L-14", "ViT-B/32"} <= set(names)


def test_one_process_commands_refuse_to_run_under_torchrun(tmp_path, monkeypatch):
    """N copies of extract, predict, export, bench, data or demo would each do all the work and
    write the same files N times: under torchrun's WORLD_SIZE > 1 they refuse before doing
    anything; train and eval shard their work and are let through."""
    from click.testing import CliRunner

    from fklip.cli import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for args in (["extract", "--extract-image-feats", "--image-data", "x.npz"], ["predict"], ["demo"],
                 ["data", "demo", "--out", str(tmp_path / "d")], ["export", "x.pt", "--out", str(tmp_path / "e")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"`fklip {args[0]}` runs in one process, and this is one of 2" in result.output
        assert "only eval and train run under torchrun" in result.output
    assert not list(tmp_path.iterdir())
    # eval gets past the check (to its own flag errors)
    result = CliRunner().invoke(cli, ["eval"])
    assert result.exit_code == 2 and "runs in one process" not in result.output
    # asking for help is never refused
    monkeypatch.setattr(sys, "argv", ["fklip", "extract", "--help"])
    result = CliRunner().invoke(cli, ["extract", "--help"])
    assert result.exit_code == 0 and "Usage: cli extract" in result.output
