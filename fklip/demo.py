"""`fklip demo`: the main job on the embedded demo data, as far as fklip implements it today.

Steps: generate the dataset (or reuse a complete one made with the same settings), build the
tiny model and round-trip it through an fklip checkpoint, then encode the validation set and
compute exact text-to-image and image-to-text recall. Training and export are reported as not
yet available until their commands land; the demo grows with them.
"""

from __future__ import annotations

import logging
import platform
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


def _recall(query_emb, gallery_emb, query_keys, gallery_keys, gold, chunk: int) -> dict:
    from fklip.retrieval import recall_at_ks, topk_chunked

    _, indices = topk_chunked(query_emb, gallery_emb, 10, query_chunk=chunk, gallery_chunk=4 * chunk)
    predictions = {q: [gallery_keys[i] for i in row] for q, row in zip(query_keys, indices.tolist())}
    return recall_at_ks(predictions, gold)


def run_demo(cfg: DemoConfig) -> list[Row]:
    """Run every available step; return the rows of the closing table. Writes under `cfg.out`."""
    import torch

    from fklip.data.archive import ImageArchive
    from fklip.data.jsonl import id_key, read_image_gold, read_val_queries
    from fklip.encode import encode_archive, encode_texts
    from fklip.io import write_json
    from fklip.model import (ModelSpec, build_model, build_tokenizer, count_parameters,
                             load_checkpoint, save_checkpoint)

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
    save_checkpoint(ckpt_path, build_model(spec), spec, epoch=0, name="demo-init")
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model.to(device).eval()
    rows.append(Row("model", f"{DEMO_MODEL}, {count_parameters(model) / 1e6:.1f}M parameters, "
                    f"random init, saved and reloaded from {ckpt_path}", time.perf_counter() - t))

    rows.append(Row("train", "not available yet: `fklip train` (issue 4)"))
    rows.append(Row("export", "not available yet: `fklip export` (issue 5)"))

    t = time.perf_counter()
    queries = read_val_queries(paths.val_queries)
    image_gold = read_image_gold(paths.val_gold)
    tokenizer = build_tokenizer(ckpt.spec)
    with ImageArchive(paths.val_images) as archive:
        archive.check_image_size(ckpt.spec.image_size, ckpt.spec.name)
        archive.require([i for q in queries for i in q.item_ids], str(paths.val_queries))
        image_keys = list(archive.ids)
        t_enc = time.perf_counter()
        image_emb = encode_archive(model, archive, cfg.batch_size, device, progress=True)
        image_s = time.perf_counter() - t_enc
    t_enc = time.perf_counter()
    text_emb = encode_texts(model, tokenizer, [q.query_text for q in queries], cfg.batch_size, device,
                            progress=True)
    text_s = time.perf_counter() - t_enc
    text_keys = [id_key(q.query_id) for q in queries]
    t2i = _recall(text_emb, image_emb, text_keys, image_keys,
                  {id_key(q.query_id): [id_key(i) for i in q.item_ids] for q in queries}, cfg.batch_size)
    i2t = _recall(image_emb, text_emb, image_keys, text_keys,
                  {id_key(g.image_id): [id_key(i) for i in g.item_ids] for g in image_gold}, cfg.batch_size)
    metrics = {
        "model": ckpt.spec.name, "checkpoint": str(ckpt_path), "trained": False,
        "t2i": {f"r{k}": 100 * v for k, v in t2i["recall"].items()},
        "i2t": {f"r{k}": 100 * v for k, v in i2t["recall"].items()},
        "counts": {"texts": len(text_keys), "images": len(image_keys)},
        "images_per_s": len(image_keys) / image_s, "texts_per_s": len(text_keys) / text_s,
        "device": device, "torch": str(torch.__version__), "python": platform.python_version(),
    }
    write_json(cfg.out / "eval" / "metrics.json", metrics)
    fmt = lambda r: "/".join(f"{r[f'r{k}']:.1f}" for k in (1, 5, 10))  # noqa: E731
    chance = 100 * 10 / len(image_keys)
    rows.append(Row("eval", f"{len(text_keys)} captions x {len(image_keys)} images, exact top-10; "
                    f"R@1/5/10 text->image {fmt(metrics['t2i'])}, image->text {fmt(metrics['i2t'])} "
                    f"(untrained: chance R@10 ~{chance:.1f}); "
                    f"{metrics['images_per_s']:.0f} images/s, {metrics['texts_per_s']:.0f} texts/s; "
                    f"{cfg.out / 'eval' / 'metrics.json'}", time.perf_counter() - t))
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table: step, seconds, result."""
    width = max(len(r.step) for r in rows)
    lines = [f"{'step':<{width}}  {'time':>7}  result", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
    for r in rows:
        secs = "-" if r.seconds is None else f"{r.seconds:6.1f}s"
        lines.append(f"{r.step:<{width}}  {secs:>7}  {r.result}")
    return "\n".join(lines)
