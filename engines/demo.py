"""`fklip demo`: the main job on the embedded demo data, through the commands' own functions.

Steps: generate the dataset (or reuse a complete one made with the same settings), build the
tiny model and save it as an fklip checkpoint, evaluate it (`fklip eval`), train it with the
knowledge losses (`fklip train`), evaluate it again, export it (`fklip export`) and evaluate the
export through the onnx engine (`fklip eval --engine onnx`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.eval import run_eval
from export.pipeline import run_export
from fklip.config import (
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    ExportConfig,
    SearchConfig,
    TrainConfig,
    check_device,
)
from fklip.data.demo_dataset import (
    DemoDataConfig,
    check_demo_out,
    demo_paths,
    generate_demo,
    load_demo_manifest,
)
from fklip.errors import ConfigError
from fklip.model import ModelSpec, build_model, count_parameters, save_checkpoint
from fklip.predict import OUTPUT_NAMES
from fklip.train import run_train

logger = logging.getLogger(__name__)

DEMO_MODEL = "fklip-tiny"


@dataclass(frozen=True)
class Row:
    """One line of the closing table."""

    step: str
    result: str
    seconds: float | None = None


# What the demo writes under --out; an --out holding anything else needs --overwrite (which
# still replaces only these).
OWN_ENTRIES = ("data", "checkpoints", "eval-before", "logs", "eval", "export", "eval-onnx")


def check_demo_folder(cfg: DemoConfig) -> None:
    """--out is new, empty, or holds only what an earlier demo wrote; else --overwrite is needed."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected the demo's working folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES
                    and not p.name.startswith(".")) if out.is_dir() else []
    if others and not cfg.overwrite:
        raise ConfigError(f"--out {out} holds files the demo did not write ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); pass --overwrite to work there anyway (the demo "
                          f"replaces only its own {', '.join(OWN_ENTRIES)}), or choose another folder")


def _data_step(cfg: DemoConfig):
    data_cfg = DemoDataConfig(out=cfg.data_dir, seed=cfg.seed)
    if check_demo_out(data_cfg, overwrite=True):  # the demo's own data: regenerated when the settings differ
        return demo_paths(cfg.data_dir, data_cfg.size), load_demo_manifest(cfg.data_dir), "reused"
    paths = generate_demo(data_cfg, progress=True)
    return paths, load_demo_manifest(cfg.data_dir), "generated"


def run_demo(cfg: DemoConfig) -> list[Row]:
    """Run every step; return the rows of the closing table. Writes under `cfg.out`."""
    device = check_device(cfg.device)
    check_demo_folder(cfg)
    rows: list[Row] = []

    t = time.perf_counter()
    paths, manifest, how = _data_step(cfg)
    counts = manifest["counts"]
    rows.append(Row("data", f"{how} in {paths.root}: {counts['train_queries']} train captions / "
                    f"{counts['train_images']} images, {counts['val_queries']} val captions / "
                    f"{counts['val_images']} images, {counts['kb_images']} KB images, "
                    f"{counts['data_concepts']}+{counts['kb_concepts']} concepts",
                    time.perf_counter() - t))

    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    spec = ModelSpec.from_name(DEMO_MODEL)
    ckpt_path = cfg.out / "checkpoints" / "fklip-tiny-init.pt"
    model = build_model(spec)
    save_checkpoint(ckpt_path, model, spec, epoch=0, name="demo-init")
    rows.append(Row("model", f"{DEMO_MODEL}, {count_parameters(model) / 1e6:.1f}M parameters, "
                    f"random init, saved to {ckpt_path}", time.perf_counter() - t))

    def evaluate(checkpoint, folder):
        encode = EncodeConfig(checkpoint=checkpoint, device=device, image_batch_size=cfg.batch_size,
                              text_batch_size=cfg.batch_size)
        return run_eval(EvalConfig(encode=encode, search=SearchConfig(device=device),
                                   image_data=paths.val_images, text_data=paths.val_queries,
                                   image_standard_path=paths.val_gold, output_dir=folder, overwrite=True))

    t = time.perf_counter()
    before = evaluate(ckpt_path, cfg.out / "eval-before")
    rows.append(Row("eval before", f"`fklip eval` of the untrained model: {_recalls(before)}",
                    time.perf_counter() - t))

    t = time.perf_counter()
    run_dir = cfg.out / "logs" / "demo"  # the demo's own earlier run is replaced (overwrite)
    train_cfg = TrainConfig(
        train_data=paths.train_queries, train_img=paths.train_images, model=DEMO_MODEL,
        val_data=paths.val_queries, val_img=paths.val_images,
        txt_id_filename=paths.concept_queries, kb_txt_id_filename=paths.kb_concept_queries,
        concept_fathers=paths.concept_fathers, kb_concept_fathers=paths.kb_concept_fathers,
        img_data_sets=(paths.kb_images,), resume=ckpt_path, is_concept=True, is_data_concept=True,
        is_update=True, warmup=20, batch_size=32, eval_batch_size=cfg.batch_size, lr=1e-3, wd=0.001,
        epochs=cfg.epochs, precision="fp32", device=device, seed=cfg.seed, save_most_recent=True,
        logs=cfg.out / "logs", name="demo", overwrite=True)
    summary = run_train(train_cfg)
    last = summary["epochs"][-1]
    rows.append(Row("train", f"`fklip train` with --is-concept --is-data-concept --is-update, {cfg.epochs} "
                    f"epochs of batch 32: loss {summary['epochs'][0]['loss']:.3f} -> {last['loss']:.3f}; "
                    f"{run_dir}", time.perf_counter() - t))

    t = time.perf_counter()
    trained = run_dir / "checkpoints" / f"epoch_{cfg.epochs}.pt"
    after = evaluate(trained, cfg.out / "eval")
    gain = after["mean_recall"] - before["mean_recall"]
    rows.append(Row("eval after", f"`fklip eval` of the trained model: {_recalls(after)}; mean recall "
                    f"{before['mean_recall']:.1f} -> {after['mean_recall']:.1f} ({gain:+.1f}); "
                    f"{cfg.out / 'eval'}", time.perf_counter() - t))

    t = time.perf_counter()
    export_dir = cfg.out / "export"
    manifest = run_export(ExportConfig(checkpoint=trained, out=export_dir, parity_images=paths.val_images,
                                      parity_texts=paths.val_queries, overwrite=True))
    cosines = min(entry.parity.real.min_cosine for entry in manifest.towers.values())
    rows.append(Row("export", f"`fklip export` to ONNX: image.onnx, text.onnx, manifest.json; min cosine "
                    f"to PyTorch on val data {cosines:.6f}; {export_dir}", time.perf_counter() - t))

    t = time.perf_counter()
    encode = EncodeConfig(checkpoint=None, engine="onnx", engine_dir=export_dir, device="cpu",
                          image_batch_size=cfg.batch_size, text_batch_size=cfg.batch_size)
    onnx_metrics = run_eval(EvalConfig(encode=encode, search=SearchConfig(device="cpu"),
                                       image_data=paths.val_images, text_data=paths.val_queries,
                                       image_standard_path=paths.val_gold, output_dir=cfg.out / "eval-onnx",
                                       overwrite=True))
    same = _same_predictions(cfg.out / "eval", cfg.out / "eval-onnx")
    rows.append(Row("eval onnx", f"`fklip eval --engine onnx`: {_recalls(onnx_metrics)}; mean recall "
                    f"{onnx_metrics['mean_recall']:.1f} vs torch {after['mean_recall']:.1f}; {same}",
                    time.perf_counter() - t))
    return rows


def _same_predictions(a: Path, b: Path) -> str:
    """How many queries got the same top-k list from both evaluations."""
    same = total = 0
    for name in ("text_predictions", "image_predictions"):
        lines_a = (a / OUTPUT_NAMES[name]).read_text().splitlines()
        lines_b = (b / OUTPUT_NAMES[name]).read_text().splitlines()
        same += sum(x == y for x, y in zip(lines_a, lines_b))
        total += max(len(lines_a), len(lines_b))
    return f"identical top-k lists for {same} of {total} queries"


def _recalls(metrics: dict) -> str:
    r = lambda d: "/".join(f"{d[f'r{k}']:.1f}" for k in (1, 5, 10))
    return (f"R@1/5/10 text->image {r(metrics['text_to_image'])}, image->text {r(metrics['image_to_text'])} "
            f"({metrics['counts']['texts']} captions x {metrics['counts']['images']} images)")


def format_table(rows: list[Row]) -> str:
    """A plain-text table: step, seconds, result."""
    width = max(len(r.step) for r in rows)
    lines = [f"{'step':<{width}}  {'time':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
    for r in rows:
        secs = "-" if r.seconds is None else f"{r.seconds:6.1f}s"
        lines.append(f"{r.step:<{width}}  {secs:>7}  {r.result}")
    return "\n".join(lines)
