"""Predictions, scores and metrics: `fklip predict` (from feature files) and `fklip eval` (from a
checkpoint and the raw validation files), both compatible with the original's outputs (spec 4.2).

Both directions use `fklip.retrieval.topk_chunked`: exact top-k with the original's tie rule (the
earlier feature line wins), results independent of the chunk sizes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from fklip.config import PredictConfig, SearchConfig
from fklip.data.features import check_same_dim, npy_ids_path, read_features
from fklip.data.jsonl import (
    Id,
    TextGold,
    ValQuery,
    id_key,
    read_image_gold,
    read_text_gold,
)
from fklip.errors import DataError, preview
from fklip.io import OutputSet, atomic_output, check_outputs, write_json
from fklip.retrieval import (
    MissingPredictionError,
    failure_json,
    recall_at_ks,
    score_json,
    topk_both_ways,
    topk_chunked,
)

logger = logging.getLogger(__name__)

# The original README's output names, used by `fklip eval --output-dir`.
OUTPUT_NAMES = {
    "text_predictions": "test_txts_predictions.jsonl",
    "image_predictions": "test_imgs_predictions.jsonl",
    "text_score": "fashion_text_output.json",
    "image_score": "fashion_image_output.json",
    "metrics": "metrics.json",
}


@dataclass(frozen=True)
class Gold:
    """A gold file: key (id_key form) -> target ids (id_key form); the readers refuse repeated keys."""

    path: str
    targets: dict[str, list[str]]
    originals: dict[str, Id]  # key -> the key as written, for the original's failure JSON


def gold_from_queries(queries: Sequence[ValQuery | TextGold], path: str) -> Gold:
    """Text-to-image gold: each query's item_ids (the val queries of `fklip eval`)."""
    targets, originals = {}, {}
    for q in queries:
        key = id_key(q.query_id)
        targets[key] = [id_key(i) for i in q.item_ids]
        originals[key] = q.query_id
    return Gold(path, targets, originals)


def gold_from_text_file(path: Path) -> Gold:
    """Text-to-image gold from `--text-standard-path`: query_id and item_ids, as the original reads."""
    return gold_from_queries(read_text_gold(path), str(path))


def gold_from_image_file(path: Path) -> Gold:
    """Image-to-text gold from the val images file (`--image-standard-path`)."""
    targets, originals = {}, {}
    for g in read_image_gold(path):
        key = id_key(g.image_id)
        targets[key] = [id_key(i) for i in g.item_ids]
        originals[key] = g.image_id
    return Gold(str(path), targets, originals)


def gold_from_item_ids(queries: Sequence[ValQuery], image_ids: Sequence[Id], source: str) -> Gold:
    """Image-to-text gold derived from the queries: each image's gold is every query listing it."""
    targets: dict[str, list[str]] = {id_key(i): [] for i in image_ids}
    for q in queries:
        for item in q.item_ids:
            if id_key(item) in targets:
                targets[id_key(item)].append(id_key(q.query_id))
    targets = {k: v for k, v in targets.items() if v}
    return Gold(f"item_ids of {source}", targets, {id_key(i): i for i in image_ids})


def check_targets(gold: Gold, candidate_keys: Sequence[str], candidates: str) -> None:
    """Every gold target must be a candidate, or recall would silently lose it."""
    present = set(candidate_keys)
    absent = list(dict.fromkeys(t for ts in gold.targets.values() for t in ts if t not in present))
    if absent:
        raise DataError(f"{gold.path}: {len(absent)} gold ids are not among the {candidates}, "
                        f"first: {preview(absent)}")


def search(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, cfg: SearchConfig,
           desc: str) -> np.ndarray:
    """(Q, min(k, N)) int64 indices of each query's best gallery rows, best first, exact."""

    device = torch.device(cfg.device)
    if isinstance(gallery, np.memmap):
        gallery_t: np.ndarray | torch.Tensor = gallery  # read chunk by chunk by topk_chunked
    else:
        gallery_t = torch.as_tensor(np.asarray(gallery) if not isinstance(gallery, torch.Tensor)
                                    else gallery).to(device)
    k = min(cfg.top_k, len(gallery))
    out = np.empty((len(queries), k), np.int64)
    with tqdm(total=len(queries), desc=desc, unit="query") as bar:
        for start in range(0, len(queries), cfg.query_chunk):
            chunk = queries[start:start + cfg.query_chunk]
            q = (chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))).to(device)
            _, idx = topk_chunked(q, gallery_t, k, query_chunk=cfg.query_chunk,
                                  gallery_chunk=cfg.gallery_chunk)
            out[start:start + len(chunk)] = idx.cpu().numpy()
            bar.update(len(chunk))
    return out


def search_both_ways(texts: torch.Tensor, images: torch.Tensor, cfg: SearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """(text->image, image->text) indices from one matrix product per tile instead of two; the
    same results as two `search` calls (fklip.retrieval.topk_both_ways)."""

    device = torch.device(cfg.device)
    (_, t2i), (_, i2t) = topk_both_ways(texts.to(device), images.to(device), cfg.top_k,
                                        query_chunk=cfg.query_chunk, gallery_chunk=cfg.gallery_chunk,
                                        progress=True)
    return t2i.cpu().numpy(), i2t.cpu().numpy()


def write_predictions(path: Path, query_field: str, query_ids: Sequence[Id],
                      gallery_ids: Sequence[Id], indices: np.ndarray) -> None:
    """The original's prediction file: {query_field: id, "item_ids": [top-k ids, best first]}."""

    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for qid, row in zip(query_ids, indices.tolist()):
            f.write(json.dumps({query_field: qid, "item_ids": [gallery_ids[i] for i in row]}))
            f.write("\n")


def score(gold: Gold, query_keys: Sequence[str], gallery_keys: Sequence[str],
          indices: np.ndarray) -> dict:
    """Recall@1/5/10 of the predictions against the gold; raises MissingPredictionError."""
    predictions = {q: [gallery_keys[i] for i in row] for q, row in zip(query_keys, indices.tolist())}
    return recall_at_ks(predictions, gold.targets)


def write_score(path: Path, gold: Gold, query_keys: Sequence[str], gallery_keys: Sequence[str],
                indices: np.ndarray, shown: Path | None = None) -> dict:
    """Write the original's score JSON (or, for a gold key without prediction, its failure JSON).
    `shown` is the path messages name (the target, when `path` is its staging file)."""
    try:
        result = score(gold, query_keys, gallery_keys, indices)
    except MissingPredictionError as e:
        write_json(path, failure_json(gold.originals.get(e.key, e.key)), indent=None)
        raise DataError(f"{gold.path}: gold key {gold.originals.get(e.key, e.key)!r} has no "
                        f"prediction (it is not in the features); wrote the original's failure "
                        f"JSON to {shown or path}") from None
    write_json(path, score_json(result["hits"], result["total"]), indent=None)
    return result


def recall_summary(result: dict) -> dict:
    """R@1/5/10 and mean recall in percent (the original's float order), with counts."""
    scored = score_json(result["hits"], result["total"])["scoreJson"]
    return {"r1": scored["r1"], "r5": scored["r5"], "r10": scored["r10"],
            "mean_recall": scored["mean_recall"], "queries": result["total"],
            "hits": {str(k): v for k, v in result["hits"].items()}}


def predict_outputs(cfg: PredictConfig) -> dict[str, Path | None]:
    return {"--output-texts": cfg.output_texts, "--output-images": cfg.output_images,
            "--text-out-path": cfg.text_out_path, "--image-out-path": cfg.image_out_path}


def predict_inputs(cfg: PredictConfig) -> dict[str, list[Path]]:
    """Every file predict reads (flag -> paths): a `.npy` feature file brings its ids file."""
    inputs = {}
    for flag, path in (("--image-feats", cfg.image_feats), ("--text-feats", cfg.text_feats)):
        inputs[flag] = [path] + ([npy_ids_path(path)] if path.suffix == ".npy" else [])
    for flag, path in (("--text-standard-path", cfg.text_standard_path),
                       ("--image-standard-path", cfg.image_standard_path)):
        if path is not None:
            inputs[flag] = [path]
    return inputs


def run_predict(cfg: PredictConfig) -> dict:
    """`fklip predict`: feature files -> prediction files and score files. Returns the recalls.

    The outputs are checked against the inputs before anything is read, and appear together at
    the end or not at all (a gold key without a prediction still writes the original's failure
    JSON with the other outputs, then raises)."""
    outputs = predict_outputs(cfg)
    check_outputs(outputs, predict_inputs(cfg), overwrite=cfg.overwrite)
    with OutputSet(p for p in outputs.values() if p is not None) as staged:
        summary, failures = _predict(cfg, staged)
    if failures:
        raise DataError("; ".join(failures))
    return summary


def _predict(cfg: PredictConfig, staged: OutputSet) -> tuple[dict, list[str]]:
    t0 = time.perf_counter()
    # the gold files first: small, so a bad one fails before the features are read
    text_gold = gold_from_text_file(cfg.text_standard_path) if cfg.text_standard_path is not None else None
    image_gold = gold_from_image_file(cfg.image_standard_path) if cfg.image_standard_path is not None else None
    images = read_features(cfg.image_feats, expect="image", progress=True)
    texts = read_features(cfg.text_feats, expect="text", progress=True)
    check_same_dim(images, texts)
    image_keys, text_keys = images.keys(), texts.keys()
    if text_gold is not None:
        check_targets(text_gold, image_keys, f"image ids of {cfg.image_feats}")
    if image_gold is not None:
        check_targets(image_gold, text_keys, f"query ids of {cfg.text_feats}")
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    image_mat, text_mat = _as_search_input(images.matrix), _as_search_input(texts.matrix)
    if cfg.output_texts and cfg.output_images and isinstance(image_mat, torch.Tensor) \
            and isinstance(text_mat, torch.Tensor):
        t2i, i2t = search_both_ways(text_mat, image_mat, cfg.search)
    else:
        t2i = search(text_mat, image_mat, cfg.search, "text->image") if cfg.output_texts else None
        i2t = search(image_mat, text_mat, cfg.search, "image->text") if cfg.output_images else None
    t_search = time.perf_counter() - t0

    if t2i is not None:
        write_predictions(staged.path(cfg.output_texts), texts.id_field, texts.ids, images.ids, t2i)
    if i2t is not None:
        write_predictions(staged.path(cfg.output_images), images.id_field, images.ids, texts.ids, i2t)
    summary: dict = {"timings_s": {"load": t_load, "search": t_search}}
    failures = []
    for name, gold, out, query_keys, gallery_keys, indices in (
            ("text_to_image", text_gold, cfg.text_out_path, text_keys, image_keys, t2i),
            ("image_to_text", image_gold, cfg.image_out_path, image_keys, text_keys, i2t)):
        if gold is None:
            continue
        try:
            summary[name] = recall_summary(write_score(staged.path(out), gold, query_keys, gallery_keys,
                                                       indices, shown=out))
        except DataError as e:
            failures.append(str(e))
    return summary, failures


def _as_search_input(matrix: np.ndarray) -> np.ndarray | torch.Tensor:
    """Memory-mapped features stay on disk (read per chunk); in-memory ones become a tensor."""
    if isinstance(matrix, np.memmap):
        return matrix
    return torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
