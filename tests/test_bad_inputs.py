"""The catalogue of bad inputs and faults (issue 14), each run through the CLI as a user would.

Every case asserts the exit code, the one line on stderr, and that every file under the test's
folder is as it was (SHA-256 of each, hidden files included): inputs untouched, no output and no
leftover. The kinds: outputs that would replace inputs or each other, existing outputs, write
failures (read-only or full disk, a parent that is a file), two runs on one output, leftovers of
killed runs, the NaN stop, resuming a finished run, click's usage errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fklip.cli import cli
from fklip.io import claim
from tests.conftest import HANG_S, write_lines
from tests.test_predict import make_case

# ---------------------------------------------------------------- helpers


def snapshot(root) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too): relative path -> SHA-256 or "dir"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def fklip(*args, env=None, limit_file_bytes=None) -> subprocess.CompletedProcess:
    """`python -m fklip ARGS` in a subprocess; `limit_file_bytes` caps the size of any file it
    writes (RLIMIT_FSIZE: writes beyond fail with EFBIG, as on a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, "-m", "fklip", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})),
                          preexec_fn=limit if limit_file_bytes else None)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(stderr: str, *expected: str) -> str:
    """The single `fklip: error:` line (progress bars and log lines aside), checked to hold each
    expected fragment; no traceback, no click usage block."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines()
             if ln.startswith(("fklip: error", "Traceback", "Usage:", "Error:", "Try "))]
    assert len(lines) == 1 and lines[0].startswith("fklip: error: "), stderr
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def refused(root, args, *expected, code=2) -> str:
    """Run in-process; it must exit `code` with one error line and change nothing under `root`."""
    before = snapshot(root)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output, result.exception)
    line = one_line(result.output, *expected)
    assert snapshot(root) == before, args
    return line


def predict_args(folder, **outputs):
    args = ["predict", "--image-feats", folder / "img.jsonl", "--text-feats", folder / "txt.jsonl",
            "--text-standard-path", folder / "val_queries.jsonl", "--image-standard-path", folder / "val_images.jsonl"]
    defaults = {"output_texts": folder / "out" / "t.jsonl", "output_images": folder / "out" / "i.jsonl",
                "text_out_path": folder / "out" / "t.json", "image_out_path": folder / "out" / "i.json"}
    for name, path in {**defaults, **outputs}.items():
        args += [f"--{name.replace('_', '-')}", path]
    return args


@pytest.fixture
def case(tmp_path):
    make_case(tmp_path, n_img=40, n_txt=30, dim=8)
    return tmp_path


def _mount(folder, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only_folder(folder):
    """A folder nothing can be written into: a read-only tmpfs where we may mount one (root), else
    a folder without write permission (which binds every user but root)."""
    if os.geteuid() == 0:
        if not _mount(folder, "ro,size=64k"):
            pytest.skip("root without the right to mount a read-only tmpfs: no read-only folder to test with")
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


# ---------------------------------------------------------------- 1. outputs never replace inputs


def test_an_output_never_replaces_an_input(case, tiny_checkpoint, small_demo):
    """Each output path equal to an input (directly, through a symbolic link, or a hard link) is
    refused before any work, naming both flags."""
    refused(case, predict_args(case, output_texts=case / "txt.jsonl"), "--output-texts", "is also the input --text-feats")
    refused(case, predict_args(case, text_out_path=case / "val_queries.jsonl"),
            "--text-out-path", "is also the input --text-standard-path")
    (case / "link.jsonl").symlink_to(case / "img.jsonl")
    refused(case, predict_args(case, output_images=case / "link.jsonl"), "is also the input --image-feats")
    os.link(case / "val_images.jsonl", case / "hard.json")
    refused(case, predict_args(case, image_out_path=case / "hard.json"), "is also the input --image-standard-path")
    refused(case, predict_args(case, output_images=case / "out" / "t.jsonl"), "are the same file")
    refused(case, predict_args(case, output_images=case / "sub" / ".." / "out" / "t.jsonl"), "are the same file")

    queries = case / "queries.jsonl"
    queries.write_bytes(small_demo.val_queries.read_bytes())
    refused(case, ["extract", "--extract-text-feats", "--text-data", queries, "--resume", tiny_checkpoint,
                   "--text-feat-output-path", queries], "--text-feat-output-path", "is also the input --text-data")
    eval_args = ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                 queries, "--output-dir", case / "e1"]
    assert invoke(*eval_args).exit_code == 0
    refused(case, eval_args, "already holds", "test_txts_predictions.jsonl", "pass --overwrite")
    # an eval output that is an input (its queries named like the predictions file)
    preds = case / "evalout" / "test_txts_predictions.jsonl"
    preds.parent.mkdir()
    preds.write_bytes(queries.read_bytes())
    refused(case, ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                   preds, "--output-dir", case / "evalout", "--overwrite"], "is also the input --text-data")


def test_existing_outputs_need_overwrite(case):
    assert invoke(*predict_args(case)).exit_code == 0
    first = snapshot(case)
    refused(case, predict_args(case), "--output-texts", "exists; pass --overwrite")
    again = invoke(*predict_args(case), "--overwrite")
    assert again.exit_code == 0, again.output
    assert snapshot(case) == first  # the same results, replaced whole, no leftovers


def test_data_demo_replaces_only_its_own_dataset(tmp_path):
    out = tmp_path / "d"
    small = ["--train", 8, "--val", 4, "--kb", 8, "--size", 32]
    assert invoke("data", "demo", "--out", out, *small).exit_code == 0
    same = invoke("data", "demo", "--out", out, *small)
    assert same.exit_code == 0 and "left as it is" in same.output
    refused(tmp_path, ["data", "demo", "--out", out, *small[:-1], 48], "other settings", "size 32 (asked 48)",
            "--overwrite")
    assert invoke("data", "demo", "--out", out, *small[:-1], 48, "--overwrite").exit_code == 0
    assert json.loads((out / "demo.json").read_text())["config"]["size"] == 48
    assert not (out / "fashiongen" / "val" / "val.32.npz").exists()  # replaced whole, nothing stale
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        refused(tmp_path, ["data", "demo", "--out", mine, *small, *extra], "holds no demo dataset")


def test_export_and_train_overwrite_never_remove_an_input(tmp_path, tiny_checkpoint, small_demo):
    out = tmp_path / "exp"
    assert invoke("export", tiny_checkpoint, "--out", out).exit_code == 0
    inside = out / "texts.jsonl"
    inside.write_bytes(small_demo.val_queries.read_bytes())
    refused(tmp_path, ["export", tiny_checkpoint, "--out", out, "--overwrite", "--parity-texts", inside],
            "would remove the input --parity-texts")
    run = tmp_path / "logs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.json").write_text("{}")
    weights = run / "checkpoints" / "init.pt"  # weights to start from (not a training checkpoint)
    weights.write_bytes(tiny_checkpoint.read_bytes())
    refused(tmp_path, ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
                       "--resume", weights, "--logs", tmp_path / "logs", "--name", "r", "--overwrite"],
            "would remove the run folder", "--resume")


def test_overwrite_never_takes_what_fklip_did_not_make(tmp_path, tiny_checkpoint, small_demo):
    """--overwrite replaces an earlier output of the same command, never files beside it."""
    small = ["--train", 8, "--val", 4, "--kb", 8, "--size", 32]
    out = tmp_path / "d"
    assert invoke("data", "demo", "--out", out, *small).exit_code == 0
    (out / "fashiongen" / "val" / "val.32.img_feat.jsonl").write_text("my features\n")  # extract's default name
    refused(tmp_path, ["data", "demo", "--out", out, *small[:-1], 48, "--overwrite"],
            "holds files that are not the demo dataset", "val.32.img_feat.jsonl")
    exp = tmp_path / "exp"
    assert invoke("export", tiny_checkpoint, "--out", exp).exit_code == 0
    (exp / "notes.txt").write_text("mine")
    refused(tmp_path, ["export", tiny_checkpoint, "--out", exp, "--overwrite"], "holds files the export did not write",
            "notes.txt")
    refused(tmp_path, ["extract", "--engine", "onnx", "--engine-dir", exp, "--extract-text-feats", "--text-data",
                       small_demo.val_queries, "--text-feat-output-path", exp / "manifest.json", "--overwrite"],
            "is also the input --engine-dir")
    logs = tmp_path / "logs"
    (logs / "mine").mkdir(parents=True)
    (logs / "mine" / "thesis.txt").write_text("mine")
    train = ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images, "--logs", logs]
    for extra in ([], ["--overwrite"]):
        refused(tmp_path, [*train, "--name", "mine", *extra], "is not an fklip run folder", "thesis.txt")
    for name in (".", "..", "a/b"):
        refused(tmp_path, [*train, "--name", name, "--overwrite"], "--name: expected a folder name")


def test_a_folder_output_cannot_be_the_working_folder(tmp_path):
    (tmp_path / "here").mkdir()
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fklip", "data", "demo", "--out", ".", "--train", "8", "--val",
                             "4", "--kb", "8", "--size", "32"], cwd=tmp_path / "here", capture_output=True,
                            text=True, timeout=HANG_S, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 2
    one_line(result.stderr, "--out . is the current folder")
    assert snapshot(tmp_path) == before


def test_eval_writes_the_failure_json_as_predict_does(tmp_path, tiny_checkpoint, small_demo):
    gold = [json.loads(line) for line in small_demo.val_gold.read_text().splitlines()]
    extra = write_lines(tmp_path / "gold.jsonl", [*gold, {"image_id": "not-an-image", "item_ids": [gold[0]["item_ids"][0]]}])
    out = tmp_path / "e"
    result = invoke("eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                    small_demo.val_queries, "--image-standard-path", extra, "--output-dir", out)
    assert result.exit_code == 2
    one_line(result.output, "gold key 'not-an-image' has no prediction", "fashion_image_output.json")
    assert json.loads((out / "fashion_image_output.json").read_text())["errorDetail"] == "not-an-image"
    assert (out / "test_txts_predictions.jsonl").is_file() and not (out / "metrics.json").exists()


def test_an_interrupted_commit_puts_every_output_back(tmp_path, monkeypatch):
    import fklip.io

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # a moved aside, the new a in place; then Ctrl-C while b is moved aside
            raise KeyboardInterrupt
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with fklip.io.OutputSet([a, b]) as outputs:
            outputs.path(a).write_text("new a")
            outputs.path(b).write_text("new b")
            monkeypatch.setattr(fklip.io.os, "replace", replace)
    monkeypatch.undo()
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# ---------------------------------------------------------------- 3. write failures


def test_read_only_output_folder(case, tiny_checkpoint, small_demo):
    with read_only_folder(case / "ro") as ro:
        refused(case, predict_args(case, output_texts=ro / "t.jsonl"), "cannot write", "read-only" if os.geteuid() == 0
                else "permission denied")
        refused(case, ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                       small_demo.val_queries, "--output-dir", ro / "e"], "cannot write")
        refused(case, ["data", "demo", "--out", ro / "demo", "--train", 8, "--val", 4, "--kb", 8, "--size", 32],
                "cannot write")


def test_output_parent_is_a_file(case, tiny_checkpoint, small_demo):
    (case / "afile").write_text("x")
    refused(case, predict_args(case, output_texts=case / "afile" / "t.jsonl"), "afile is a file, not a folder")
    refused(case, ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                   small_demo.val_queries, "--output-dir", case / "afile" / "e"], "is a file")
    refused(case, ["extract", "--extract-text-feats", "--text-data", small_demo.val_queries, "--resume",
                   tiny_checkpoint, "--text-feat-output-path", case / "afile" / "t.jsonl"], "is a file, not a folder")


def _full_disk_run(tmp_path, args_for, need: int):
    """Run `args_for(folder)` with too little room for its outputs: a tmpfs of a quarter of `need`
    bytes where we may mount one, else a per-file size limit. One line, exit 2, nothing left."""
    disk = tmp_path / "disk"
    small = max(4096, need // 4)
    mounted = os.geteuid() == 0 and _mount(disk, f"size={small}")
    try:
        if not mounted:
            disk.mkdir(exist_ok=True)
        before = snapshot(tmp_path)
        result = fklip(*args_for(disk), limit_file_bytes=None if mounted else small)
        assert result.returncode == 2, result.stderr
        line = one_line(result.stderr, "cannot write", "nothing was written")
        assert ".fklip-" not in line  # the output's own path, never a staging name
        assert snapshot(tmp_path) == before  # no half-written outputs, no temporaries, no claims
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_leaves_nothing(tmp_path, tiny_checkpoint, small_demo):
    make_case(tmp_path, n_img=300, n_txt=300, dim=8)
    ok = tmp_path / "roomy"
    assert invoke(*predict_args(tmp_path, **{k: ok / n for k, n in (("output_texts", "t.jsonl"), (
        "output_images", "i.jsonl"), ("text_out_path", "t.json"), ("image_out_path", "i.json"))})).exit_code == 0
    need = sum(p.stat().st_size for p in ok.iterdir())
    _full_disk_run(tmp_path, lambda d: predict_args(tmp_path, **{k: d / n for k, n in (
        ("output_texts", "t.jsonl"), ("output_images", "i.jsonl"), ("text_out_path", "t.json"),
        ("image_out_path", "i.json"))}), need)
    eval_args = ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                 small_demo.val_queries, "--save-features", "jsonl"]
    assert invoke(*eval_args, "--output-dir", tmp_path / "e").exit_code == 0
    need = sum(p.stat().st_size for p in (tmp_path / "e").iterdir())
    _full_disk_run(tmp_path, lambda d: [*eval_args, "--output-dir", d / "e"], need)


def test_full_disk_while_training_names_the_checkpoint(tmp_path, small_demo):
    disk = tmp_path / "disk"
    mounted = os.geteuid() == 0 and _mount(disk, "size=1m")  # room for the logs, not for a 28 MB checkpoint
    try:
        result = fklip("train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
                       "--logs", disk, "--name", "r", "--epochs", 1, "--batch-size", 4, "--report-to", "none",
                       limit_file_bytes=None if mounted else 1 << 20)
        assert result.returncode == 2, result.stderr
        one_line(result.stderr, "cannot write", "epoch_1.pt")
        assert not [p for p in snapshot(disk) if p.endswith(".tmp.pt") or "fklip-claim" in p]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------- 4. two runs, one output


def test_a_claimed_output_stops_a_second_run(case, tiny_checkpoint, small_demo):
    """While one process holds an output (as a running fklip does), another fklip writing it
    stops at once, whatever the command."""
    with claim(case / "out" / "t.jsonl"):
        refused(case, predict_args(case), "is being written by another fklip process")
    with claim(case / "exp"):
        refused(case, ["export", tiny_checkpoint, "--out", case / "exp"], "is being written by another fklip")
    with claim(case / "logs" / "r"):
        refused(case, ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
                       "--logs", case / "logs", "--name", "r", "--epochs", 1, "--batch-size", 4],
                "is being written by another fklip process")
    assert invoke(*predict_args(case)).exit_code == 0  # released: the claim files are gone too
    assert not [p for p in snapshot(case) if "fklip-claim" in p]


def test_two_trainings_with_one_name_do_not_mix(tmp_path, small_demo):
    args = ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
            "--logs", tmp_path, "--name", "same", "--epochs", 2, "--batch-size", 4, "--warmup", 1,
            "--report-to", "none"]
    procs = [subprocess.Popen([sys.executable, "-m", "fklip", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
             for _ in range(2)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    one_line(loser, "same")  # "being written by another fklip process" or, if it came second, "already holds a run"
    records = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


# ---------------------------------------------------------------- 5. leftovers and dead ends


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs_are_removed(case, tiny_checkpoint, small_demo):
    from fklip.io import _HOST

    dead, alive = _dead_pid(), os.getpid()
    out = case / "out"
    out.mkdir()
    stale = out / f".t.jsonl.fklip-{_HOST}-{dead}-abc123.tmp.jsonl"
    live = out / f".t.jsonl.fklip-{_HOST}-{alive}-abc124.tmp.jsonl"
    stale.write_text("half")
    live.write_text("in progress")
    assert invoke(*predict_args(case)).exit_code == 0
    assert not stale.exists() and live.exists()
    partial = case / f".exp.fklip-{_HOST}-{dead}-abc125.partial"
    (partial / "sub").mkdir(parents=True)
    legacy = case / f".exp.partial-{dead}"
    legacy.mkdir()
    assert invoke("export", tiny_checkpoint, "--out", case / "exp").exit_code == 0
    assert not partial.exists() and not legacy.exists()
    train = ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
             "--logs", case / "logs", "--name", "r", "--epochs", 2, "--batch-size", 4, "--report-to", "none",
             "--save-most-recent"]
    assert invoke(*train, "--stop-after", 1).exit_code == 0
    ckpts = case / "logs" / "r" / "checkpoints"
    (ckpts / f".epoch_2.pt.fklip-{_HOST}-{dead}-abc126.tmp.pt").write_bytes(b"half")  # killed while saving
    result = invoke(*train, "--resume", ckpts / "epoch_latest.pt")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"]


def test_nan_stop_and_finished_resume_say_what_to_do(tmp_path, small_demo, monkeypatch):
    import fklip.losses

    args = ["train", "--train-data", small_demo.train_queries, "--train-img", small_demo.train_images,
            "--logs", tmp_path, "--name", "nan", "--epochs", 1, "--batch-size", 4, "--report-to", "none"]
    real = fklip.losses.ContrastiveLoss.forward
    monkeypatch.setattr(fklip.losses.ContrastiveLoss, "forward", lambda self, *a: real(self, *a) * float("nan"))
    stopped = invoke(*args)
    assert stopped.exit_code == 2
    assert "--resume" not in one_line(stopped.output, "before the first checkpoint", "--overwrite")
    again = refused(tmp_path, args, "wrote no checkpoint", "--overwrite")  # the folder keeps its logs
    assert "--resume" not in again
    monkeypatch.undo()
    done = invoke(*args, "--overwrite")
    assert done.exit_code == 0, done.output
    finished = invoke(*args, "--resume", tmp_path / "nan" / "checkpoints" / "epoch_1.pt")
    assert finished.exit_code == 0 and "nothing to train" in finished.output and "larger --epochs" in finished.output


# ---------------------------------------------------------------- 2. one reader per file kind, one set of rules


def test_duplicates_and_broken_rows_are_refused_everywhere(case, tiny_checkpoint, small_demo):
    """The same file is judged the same by every command that reads it."""
    queries = [json.loads(line) for line in (case / "val_queries.jsonl").read_text().splitlines()]
    dup_queries = write_lines(case / "dup_q.jsonl", [*queries, {**queries[0], "item_ids": queries[1]["item_ids"]}])
    images = [json.loads(line) for line in (case / "val_images.jsonl").read_text().splitlines()]
    dup_images = write_lines(case / "dup_i.jsonl", [*images, images[0]])
    refused(case, predict_args(case) + ["--text-standard-path", dup_queries], "duplicate query_id")
    refused(case, predict_args(case) + ["--image-standard-path", dup_images], "duplicate image_id")
    refused(case, ["data", "inspect", dup_queries], "duplicate query_id")
    refused(case, ["data", "inspect", dup_images], "duplicate image_id")
    demo_gold = [json.loads(line) for line in small_demo.val_gold.read_text().splitlines()]
    eval_gold = write_lines(case / "eval_gold.jsonl", [*demo_gold, demo_gold[-1]])
    refused(case, ["eval", "--resume", tiny_checkpoint, "--image-data", small_demo.val_images, "--text-data",
                   small_demo.val_queries, "--image-standard-path", eval_gold, "--output-dir", case / "e"],
            "duplicate image_id")
    train = [json.loads(line) for line in small_demo.train_queries.read_text().splitlines()]
    dup_train = write_lines(case / "dup_train.jsonl", [*train, train[0]])
    refused(case, ["train", "--train-data", dup_train, "--train-img", small_demo.train_images, "--logs",
                   case / "logs", "--name", "r"], "duplicate query_id")
    feats = (case / "img.jsonl").read_text().splitlines()
    zero = json.loads(feats[3])
    (case / "zero.jsonl").write_text("\n".join([*feats[:3], json.dumps({**zero, "feature": [0.0] * 8}),
                                                 *feats[4:]]) + "\n")
    refused(case, predict_args(case) + ["--image-feats", case / "zero.jsonl"], "zero.jsonl", "only zeros on 1 line: 4")


# ---------------------------------------------------------------- 6. messages


def test_inputs_that_are_not_files_are_named_so(case, tiny_checkpoint):
    (case / "adir").mkdir()
    refused(case, predict_args(case) + ["--text-feats", case / "adir"], "adir: is a directory")
    refused(case, ["extract", "--extract-text-feats", "--text-data", "/dev/null", "--resume", tiny_checkpoint,
                   "--text-feat-output-path", case / "t.jsonl"], "/dev/null: is not a regular file")


def test_a_nan_image_names_the_archive_and_the_id(case, tiny_checkpoint, small_demo):
    with np.load(small_demo.val_images) as npz:
        images = {key: npz[key] for key in npz.files}
    bad = list(images)[2]
    images[bad] = np.full_like(images[bad], np.nan)
    np.savez(case / "nan.npz", **images)
    refused(case, ["extract", "--extract-image-feats", "--image-data", case / "nan.npz", "--resume", tiny_checkpoint,
                   "--image-feat-output-path", case / "f.jsonl"],
            "nan.npz", f"image '{bad}' gives non-finite features (its pixels hold NaN or inf)")


def test_a_pickle_that_runs_code_names_trust_checkpoint(case, tiny_model):
    import torch

    class Shell:
        def __reduce__(self):
            return os.system, (f"echo pwned > {case / 'PWNED'}",)

    torch.save({"epoch": 1, "state_dict": tiny_model.state_dict(), "args": Shell()}, case / "evil.pt")
    line = refused(case, ["data", "inspect", case / "evil.pt"], "--trust-checkpoint")
    assert "not a PyTorch checkpoint" not in line and not (case / "PWNED").exists()


def test_inspect_checks_every_file(case, small_demo):
    (case / "bad.jsonl").write_text("{oops\n")
    before = snapshot(case)
    result = fklip("data", "inspect", small_demo.val_queries, case / "bad.jsonl", case / "img.jsonl")
    assert result.returncode == 2 and snapshot(case) == before
    assert "val queries" in result.stdout and "features, JSON lines, 40 rows" in result.stdout  # the good ones
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("fklip: error:")]
    assert len(errors) == 2 and "bad.jsonl, line 1: malformed JSON" in errors[0] and "1 of 3 files are bad" in errors[1]


# ---------------------------------------------------------------- 7. models that look alike


def test_a_plain_state_dict_says_which_activation_it_got(case, tiny_model, small_demo):
    import torch

    torch.save(tiny_model.state_dict(), case / "plain.pt")
    result = fklip("extract", "--extract-text-feats", "--text-data", small_demo.val_queries, "--resume",
                   case / "plain.pt", "--model", "fklip-tiny", "--text-feat-output-path", case / "t.jsonl")
    assert result.returncode == 0, result.stderr
    assert "plain state dict does not record its activation" in result.stderr


# ---------------------------------------------------------------- 6. click's usage errors


@pytest.mark.parametrize("args, expected", [
    (["train", "--no-such-flag"], "No such option '--no-such-flag'; see `fklip train --help`"),
    (["predict", "--image-feats"], "Option '--image-feats' requires an argument"),
    (["data", "demo"], "Missing option '--out'; see `fklip data demo --help`"),
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option '--bogus'"),
    (["eval", "--top-k", "ten"], "'ten' is not a valid integer"),
])
def test_usage_errors_are_one_line(tmp_path, args, expected):
    result = fklip(*args)
    assert result.returncode == 2
    one_line(result.stderr, expected)
    assert result.stdout == ""
