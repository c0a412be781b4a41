"""`fklip train` on a small demo dataset with the tiny model (CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fklip.cli import cli
from tests.conftest import HANG_S, ROOT, free_port

SCALARS = {"train/loss", "train/contrastive_loss", "train/concept_loss", "train/concept_weight", "train/lr",
           "train/scale", "train/samples_per_s", "val/loss", "val/t2i_r1", "val/t2i_r5", "val/t2i_r10",
           "val/i2t_r1", "val/i2t_r5", "val/i2t_r10"}
KNOWLEDGE = ["--is-concept", "--is-data-concept", "--is-update"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo

    return generate_demo(DemoDataConfig(out=tmp_path_factory.mktemp("train-demo"), seed=2, size=64,
                                        train=16, val=8, kb=24))


def train_args(demo, logs, name, *extra, epochs=2, batch=8):
    return ["train", "--train-data", demo.train_queries, "--train-img", demo.train_images,
            "--val-data", demo.val_queries, "--val-img", demo.val_images,
            "--txt-id-filename", demo.concept_queries, "--kb-txt-id-filename", demo.kb_concept_queries,
            "--concept-data", demo.concept_queries, "--kb-concept-data", demo.kb_concept_queries,
            "--concept-fathers", demo.concept_fathers, "--kb-concept-fathers", demo.kb_concept_fathers,
            "--img-data-sets", demo.kb_images, "--model", "fklip-tiny", "--batch-size", batch,
            "--eval-batch-size", 16, "--epochs", epochs, "--warmup", 2, "--lr", 1e-3, "--wd", 0.001,
            "--logs", logs, "--name", name, "--save-most-recent", *extra]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def with_train_data(args: list, path) -> list:
    """`args` with --train-data replaced by `path`."""
    args = list(args)
    args[args.index("--train-data") + 1] = path
    return args


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_knowledge_training_logs_checkpoints_and_folder(tmp_path, demo):
    result = invoke(train_args(demo, tmp_path, "run", *KNOWLEDGE))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"]
    params = json.loads((run / "params.json").read_text())
    assert params["is_concept"] and params["model_name"] == "fklip-tiny" and params["batch_size"] == 8
    logged = scalars(run)
    assert SCALARS <= set(logged)
    assert all(0.0 <= w <= 1.0 for w in logged["train/concept_weight"])
    assert all(v == v for v in logged["train/concept_loss"])  # no NaN
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "t2i_r10" in records[0]
    assert all(0 < r["step_s_median"] < r["epoch_s"] for r in records)
    # the checkpoint describes itself and the original's scripts can read it
    raw = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["fklip"]["model_name"] == "fklip-tiny"
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert 0.0 <= float(raw["state_dict"]["module.logit_scale"]) <= 4.6052
    # an existing run folder is never overwritten
    again = invoke(train_args(demo, tmp_path, "run"))
    assert again.exit_code == 2 and "already holds a run" in again.output


@pytest.mark.parametrize("flags", [
    [],                                                             # contrastive only
    ["--is-concept", "--is-data-concept", "--no-use-kb-concepts"],  # + data concepts, refreshed once
    ["--is-concept", "--use-kb-concepts"],                          # + KB concepts only
    ["--is-concept", "--is-data-concept", "--is-update"],           # both, refreshed every epoch
    ["--is-concept", "--is-data-concept", "--no-use-kb-concepts", "--original-indexing"],
    ["--is-concept", "--is-data-concept", "--concept-loss-weight", "0.3"],
])
def test_every_switch_combination_runs(tmp_path, demo, flags):
    result = invoke(train_args(demo, tmp_path, "r", *flags, epochs=1))
    assert result.exit_code == 0, result.output
    logged = scalars(tmp_path / "r")
    assert ("train/concept_loss" in logged) == ("--is-concept" in flags)
    if "0.3" in flags:
        assert all(abs(w - 0.3) < 1e-6 for w in logged["train/concept_weight"])


def test_original_indexing_runs_the_original_concept_loss(tmp_path, demo, monkeypatch):
    """--original-indexing: the original's transposition and its signed prototype weights."""
    import fklip.losses
    import fklip.train.loop

    built = []

    class Spy(fklip.losses.ConceptLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((self.transposed_indexing, self.clamp_negative))

    monkeypatch.setattr(fklip.train.loop, "ConceptLoss", Spy)  # where the loop builds it
    flags = ["--is-concept", "--is-data-concept", "--no-use-kb-concepts"]
    for name, extra in (("fklip", []), ("original", ["--original-indexing"])):
        result = invoke(train_args(demo, tmp_path, name, *flags, *extra, epochs=1))
        assert result.exit_code == 0, result.output
    assert built == [(False, True), (True, False)]


def test_resume_after_epoch_1_ends_with_the_same_weights(tmp_path, demo):
    flags = ["--is-concept", "--is-data-concept"]  # refresh once: the retrieval is restored from the checkpoint
    assert invoke(train_args(demo, tmp_path, "full", *flags, epochs=3)).exit_code == 0
    first = invoke(train_args(demo, tmp_path, "cut", *flags, "--stop-after", 1, epochs=3))
    assert first.exit_code == 0, first.output
    assert not (tmp_path / "cut" / "checkpoints" / "epoch_2.pt").exists()
    resumed = invoke(train_args(demo, tmp_path, "ignored", *flags, "--resume",
                                tmp_path / "cut" / "checkpoints" / "epoch_latest.pt", epochs=3))
    assert resumed.exit_code == 0, resumed.output
    assert not (tmp_path / "ignored").exists()  # the resumed run continues in its own folder
    a, b = weights(tmp_path / "full" / "checkpoints" / "epoch_3.pt"), weights(tmp_path / "cut" / "checkpoints" / "epoch_3.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_weights_do_not_inherit_their_epoch(tmp_path, demo, tiny_model):
    sd = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": sd}, tmp_path / "pai.pt")
    result = invoke(train_args(demo, tmp_path, "p", "--resume", tmp_path / "pai.pt", epochs=1))
    assert result.exit_code == 0, result.output
    assert "epoch 1 " in result.output
    assert (tmp_path / "p" / "checkpoints" / "epoch_1.pt").exists()


def test_knowledge_precision_amp(tmp_path, demo, tiny_model):
    """--knowledge-precision amp encodes the refresh under autocast (bf16 on the CPU): KB features
    close to fp32's but not identical, fp32 weights afterwards; a run records it and trains."""
    from fklip.data.archive import ImageArchive
    from fklip.distributed import DistContext
    from fklip.knowledge import load_vocabulary, refresh_knowledge
    from fklip.model import ModelSpec, build_tokenizer

    vocabs = {"data": (load_vocabulary(demo.concept_queries, demo.concept_fathers),
                       build_tokenizer(ModelSpec.from_name("fklip-tiny")))}
    with ImageArchive(demo.kb_images) as kb:
        fp32, amp = (refresh_knowledge(tiny_model, [(kb, list(kb.ids))], vocabs, DistContext(), 16, "cpu", p)
                     for p in ("fp32", "amp"))
    cosines = (fp32.kb_emb * amp.kb_emb).sum(1)
    assert cosines.min() > 0.99 and not torch.equal(fp32.kb_emb, amp.kb_emb)
    assert fp32.retrieved["data"].shape == amp.retrieved["data"].shape
    assert next(tiny_model.parameters()).dtype == torch.float32
    r = invoke(train_args(demo, tmp_path, "k", *KNOWLEDGE, "--knowledge-precision", "amp", epochs=1))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k" / "params.json").read_text())["knowledge_precision"] == "amp"
    r = invoke(train_args(demo, tmp_path, "l", "--knowledge-precision", "fp16"))
    assert r.exit_code == 2 and "--knowledge-precision" in r.output and not (tmp_path / "l").exists()


def test_bad_inputs(tmp_path, demo):
    r = invoke(train_args(demo, tmp_path, "b", batch=1000))
    assert r.exit_code == 2 and "--batch-size 1000" in r.output and "larger than" in r.output
    r = invoke(train_args(demo, tmp_path, "c", "--is-concept", "--no-use-kb-concepts"))
    assert r.exit_code == 2 and "--is-concept needs concepts" in r.output
    r = invoke(train_args(demo, tmp_path, "d", "--precision", "amp"))
    assert r.exit_code == 2 and "--precision amp needs --device cuda" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query_id": 1}\n')
    r = invoke(with_train_data(train_args(demo, tmp_path, "e"), bad))
    assert r.exit_code == 2 and 'line 1: missing field "query_text"' in r.output
    lines = demo.train_queries.read_text().splitlines()
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("\n".join([*lines, lines[1]]) + "\n")
    r = invoke(with_train_data(train_args(demo, tmp_path, "f"), repeated))
    qid = json.loads(lines[1])["query_id"]
    assert r.exit_code == 2 and f"repeated.jsonl: bad train queries file: line {len(lines) + 1}: duplicate " \
        f"query_id {json.dumps(qid)} (first on line 2)" in r.output, r.output
    assert not any((tmp_path / n).exists() for n in "bcdef")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, demo, monkeypatch):
    assert invoke(train_args(demo, tmp_path, "n", "--stop-after", 1, epochs=2)).exit_code == 0
    latest = tmp_path / "n" / "checkpoints" / "epoch_latest.pt"
    before = latest.read_bytes()
    import fklip.losses

    monkeypatch.setattr(fklip.losses.ContrastiveLoss, "forward", lambda self, i, t, s: (i * t).sum() * float("nan"))
    r = invoke(train_args(demo, tmp_path, "n", "--resume", latest, epochs=2))
    assert r.exit_code == 2 and "the loss is nan at epoch 2" in r.output
    assert latest.read_bytes() == before


def test_two_processes_follow_one_process_with_double_batch(tmp_path, demo):
    flags = ["--is-concept", "--is-data-concept", "--is-update", "--report-to", "tensorboard"]
    one = invoke(train_args(demo, tmp_path, "one", *flags, batch=8))
    assert one.exit_code == 0, one.output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "fklip", "--",  # `--`: torchrun would take --logs
           *map(str, train_args(demo, tmp_path, "two", *flags, batch=4))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    for tag in ("train/loss", "train/contrastive_loss", "train/concept_loss"):
        assert len(a[tag]) == len(b[tag]) > 2
        for x, y in zip(a[tag], b[tag]):
            assert abs(x - y) < 2e-3 * max(1.0, abs(x)), (tag, a[tag], b[tag])
    assert json.loads((tmp_path / "two" / "params.json").read_text())["world_size"] == 2


def test_concept_coverage_is_reported_once(tmp_path, demo, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fklip.train"):
        assert invoke(train_args(demo, tmp_path, "cov", "--is-concept", "--is-data-concept", epochs=2)).exit_code == 0
    reports = [r.getMessage() for r in caplog.records if "candidate phrases not in the vocabulary" in r.getMessage()]
    assert len(reports) == 2  # one line per vocabulary (data, KB), not one per step or epoch
    assert any(r.startswith("data concepts: ") for r in reports) and any(r.startswith("kb concepts: ") for r in reports)


def test_empty_training_file(tmp_path, demo):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = invoke(with_train_data(train_args(demo, tmp_path, "empty"), empty))
    assert r.exit_code == 2 and "the file is empty" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_training_with_a_gradient_scaler_on_cuda(tmp_path, demo):
    r = invoke(train_args(demo, tmp_path, "amp", *KNOWLEDGE, "--precision", "amp", "--device", "cuda", epochs=1))
    assert r.exit_code == 0, r.output
    assert all(v == v for v in scalars(tmp_path / "amp")["train/loss"])


def test_steady_step_time_leaves_out_the_first_step():
    from fklip.train.loop import _steady_step_s

    # steps start at 0 (a slow first step), 5, 6, 8; the epoch ends at 9
    assert _steady_step_s([0.0, 5.0, 6.0, 8.0], 9.0) == 1.0  # the median of 1, 2, 1
    assert _steady_step_s([0.0, 5.0], 6.0) == 1.0
    assert _steady_step_s([0.0], 4.0) is None  # one step: nothing steady to report


def test_batches_read_ahead_train_the_same(tmp_path, demo, monkeypatch):
    """--workers 1 reads the batches in a background thread, two ahead of the step (what CUDA
    runs always do): the same batches in the same order, so the same weights and losses. A
    failing read still stops the run with its own error."""
    import fklip.train.data

    args = ("--is-concept", "--is-data-concept", "--is-update", "--report-to", "tensorboard")
    assert invoke(train_args(demo, tmp_path, "main", *args)).exit_code == 0
    ahead = invoke(train_args(demo, tmp_path, "ahead", *args, "--workers", 1))
    assert ahead.exit_code == 0, ahead.output
    for name in ("contrastive_loss", "concept_loss", "loss"):
        assert scalars(tmp_path / "ahead")[f"train/{name}"] == scalars(tmp_path / "main")[f"train/{name}"]
    a, b = weights(tmp_path / "main" / "checkpoints" / "epoch_2.pt"), weights(tmp_path / "ahead" / "checkpoints" / "epoch_2.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    calls = []
    real = fklip.train.data.TrainSet.batch

    def failing(self, rows, out=None):
        import threading

        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError("the archive's disk went away")
        return real(self, rows, out)

    monkeypatch.setattr(fklip.train.data.TrainSet, "batch", failing)
    broken = invoke(train_args(demo, tmp_path, "broken", "--workers", 1))
    assert broken.exit_code == 2 and "disk went away" in broken.output  # one line, no traceback
    assert calls == ["fklip-batches"] * 3  # read in the background thread
