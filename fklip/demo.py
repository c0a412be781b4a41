"""`fklip demo`: the main job on the embedded demo data, as far as fklip implements it today.

Steps: generate the dataset (or reuse a complete one made with the same settings), build the
tiny model and save it as an fklip checkpoint, then encode the validation set and
compute exact text-to-image and image-to-text recall with `fklip eval`'s code. Training and export are reported as not
yet available until their commands land; the demo grows with them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fklip.config import DemoConfig, check_device

logger = logging.getLogger(__name__)

DEMO_MODEL = "fklip-tiny"


@dataclass(frozen=True)
class Row:
    """One line of the closing table."""

    step: str
    result: str
    seconds: float | None = None


def _data_step(cfg: DemoConfig):
    from fklip.data.demo import DemoDataConfig, demo_paths, generate_demo, load_demo_manifest

    data_cfg = DemoDataConfig(out=cfg.data_dir, seed=cfg.seed)
    wanted = {k: v for k, v in vars(data_cfg).items() if k != "out"}
    manifest = load_demo_manifest(cfg.data_dir)
    if manifest is not None and manifest.get("config") == wanted:
        return demo_paths(cfg.data_dir, data_cfg.size), manifest, "reused"
    paths = generate_demo(data_cfg, progress=True)
    return paths, load_demo_manifest(cfg.data_dir), "generated"


def run_demo(cfg: DemoConfig) -> list[Row]:
    """Run every available step; return the rows of the closing table. Writes under `cfg.out`."""
    import torch

    from fklip.config import EncodeConfig, EvalConfig, SearchConfig
    from fklip.eval_pipeline import run_eval
    from fklip.model import ModelSpec, build_model, count_parameters, save_checkpoint

    device = check_device(cfg.device)
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

    rows.append(Row("train", "not available yet: `fklip train` (issue 4)"))
    rows.append(Row("export", "not available yet: `fklip export` (issue 5)"))

    t = time.perf_counter()
    eval_dir = cfg.out / "eval"
    encode = EncodeConfig(checkpoint=ckpt_path, device=device, image_batch_size=cfg.batch_size,
                          text_batch_size=cfg.batch_size)
    metrics = run_eval(EvalConfig(encode=encode, search=SearchConfig(device=device),
                                  image_data=paths.val_images, text_data=paths.val_queries,
                                  image_standard_path=paths.val_gold, output_dir=eval_dir))
    fmt = lambda r: "/".join(f"{r[f'r{k}']:.1f}" for k in (1, 5, 10))  # noqa: E731
    counts, timings = metrics["counts"], metrics["timings_s"]
    chance = 100 * 10 / counts["images"]
    rows.append(Row("eval", f"`fklip eval`: {counts['texts']} captions x {counts['images']} images, "
                    f"exact top-10; R@1/5/10 text->image {fmt(metrics['text_to_image'])}, "
                    f"image->text {fmt(metrics['image_to_text'])} (untrained: chance R@10 ~{chance:.1f}); "
                    f"encode {timings['encode']:.1f}s, search {timings['search']:.2f}s; {eval_dir}",
                    time.perf_counter() - t))
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table: step, seconds, result."""
    width = max(len(r.step) for r in rows)
    lines = [f"{'step':<{width}}  {'time':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
    for r in rows:
        secs = "-" if r.seconds is None else f"{r.seconds:6.1f}s"
        lines.append(f"{r.step:<{width}}  {secs:>7}  {r.result}")
    return "\n".join(lines)
