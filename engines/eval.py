"""`fklip eval`: a checkpoint and the raw validation files to predictions, scores and metrics.

Top to bottom: load and check every input; encode images and captions (sharded across ranks
under torchrun, gathered in rank order); exact top-k in both directions (queries sharded across
ranks); rank 0 writes the original's prediction and score files and `metrics.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from engines.encoder import EngineEncoder, encoder_inputs
from fklip import __version__
from fklip.config import EvalConfig, SearchConfig, check_device
from fklip.data.archive import ImageArchive
from fklip.data.features import write_features
from fklip.data.jsonl import id_key, read_val_queries
from fklip.distributed import (
    DistContext,
    gather_rows,
    process_group,
    shard_range,
)
from fklip.errors import ConfigError, DataError
from fklip.io import OutputSet, check_outputs, owned_name, remove_leftovers, write_json
from fklip.predict import (
    OUTPUT_NAMES,
    check_targets,
    gold_from_image_file,
    gold_from_item_ids,
    gold_from_queries,
    recall_summary,
    search,
    search_both_ways,
    write_predictions,
    write_score,
)

logger = logging.getLogger(__name__)

# Features larger than this share of the available memory are kept in a memory-mapped file.
MEMMAP_SHARE = 0.5


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or a large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def environment(ctx: DistContext) -> dict:
    env = {"fklip": __version__, "torch": str(torch.__version__), "open_clip": str(open_clip.__version__),
           "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": ctx.device, "threads": torch.get_num_threads(), "world_size": ctx.world_size}
    if ctx.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(ctx.device))
    return env


def _feature_buffer(n: int, dim: int, on_disk: bool, folder: Path, name: str) -> np.ndarray:
    if not on_disk:
        return np.empty((n, dim), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, dim))


@contextlib.contextmanager
def _scratch(output_dir: Path):
    """A hidden folder in --output-dir for memory-mapped features, removed on any exit (and, after
    a kill, by the next evaluation there)."""
    remove_leftovers(output_dir / "features")
    folder = owned_name(output_dir / "features", "partial")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def eval_outputs(cfg: EvalConfig) -> dict[str, Path]:
    """Every file `fklip eval` writes into --output-dir (a name for messages -> path)."""
    out = cfg.output_dir
    names = list(OUTPUT_NAMES.values())
    if cfg.save_features != "none":
        ext = "jsonl" if cfg.save_features == "jsonl" else "npy"
        names += [f"image_features.{ext}", f"text_features.{ext}"]
        if ext == "npy":
            names += ["image_features.ids.jsonl", "text_features.ids.jsonl"]
    return {f"--output-dir ({name})": out / name for name in names}


def check_eval_outputs(cfg: EvalConfig) -> dict[str, Path]:
    """Before any work: --output-dir is a folder (or absent) without an earlier evaluation's files
    unless --overwrite, and none of its files is an input."""
    out, outputs = cfg.output_dir, eval_outputs(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file; expected a folder")
    there = [p.name for p in outputs.values() if os.path.lexists(p)]
    if there and not cfg.overwrite:
        raise ConfigError(f"--output-dir {out} already holds {', '.join(there[:3])}"
                          f"{', ...' if len(there) > 3 else ''} of an earlier evaluation; pass --overwrite "
                          "to replace them, or choose another folder")
    inputs = {"--image-data": cfg.image_data, "--text-data": cfg.text_data,
              "--image-standard-path": cfg.image_standard_path, **encoder_inputs(cfg.encode)}
    check_outputs(outputs, inputs, overwrite=True)
    return outputs


def run_eval(cfg: EvalConfig) -> dict | None:
    """Run the evaluation; rank 0 returns the metrics dict (other ranks return None).

    The model runs on the engine `cfg.encode` names (engines.encoder), on this process's device
    (cuda:LOCAL_RANK under torchrun).
    The outputs are checked before any work, claimed by rank 0 for the run (a second evaluation
    into the same files stops at once), and appear together at the end, or not at all.
    A gold key without a prediction writes the original's failure JSON with the other outputs
    (no metrics.json), then raises DataError, as `fklip predict` does.
    """
    outputs = check_eval_outputs(cfg)
    with process_group(cfg.encode.device) as ctx, OutputSet(outputs.values() if ctx.is_main else []) as staged:
        result = _run(cfg, ctx, staged)
    if isinstance(result, ScoreFailures):
        raise DataError("; ".join(result.messages))
    return result


@dataclasses.dataclass(frozen=True)
class ScoreFailures:
    """Gold keys without predictions: the failure JSONs are staged, the messages raised after."""

    messages: list[str]


def rank_search_config(search: SearchConfig, ctx: DistContext) -> SearchConfig:
    """The search on this rank's GPU under torchrun, where `--device cuda:N` means cuda:LOCAL_RANK
    for each rank (ctx.device): taken as given, every rank would search on GPU N. In one process
    the search device is the caller's."""
    if ctx.distributed and search.device.startswith("cuda"):
        return dataclasses.replace(search, device=ctx.device)
    return search


def _run(cfg: EvalConfig, ctx: DistContext, staged: OutputSet) -> dict | None:
    enc, started = cfg.encode, time.perf_counter()
    device = check_device(ctx.device)
    search_cfg = rank_search_config(cfg.search, ctx)

    # ---- load and check everything before the slow work
    queries = read_val_queries(cfg.text_data)  # refuses repeated query_ids
    with contextlib.ExitStack() as scratch_stack, contextlib.ExitStack() as stack:
        archive = stack.enter_context(ImageArchive(cfg.image_data))
        encoder = stack.enter_context(EngineEncoder(enc, device))
        archive.check_image_size(encoder.image_size, encoder.model_name)
        image_ids, text_ids = list(archive.ids), [q.query_id for q in queries]
        image_keys, text_keys = image_ids, [id_key(i) for i in text_ids]  # archive ids are strings
        text_gold = gold_from_queries(queries, str(cfg.text_data))
        check_targets(text_gold, image_keys, f"images of {cfg.image_data}")
        image_gold = (gold_from_image_file(cfg.image_standard_path) if cfg.image_standard_path
                      else gold_from_item_ids(queries, image_ids, str(cfg.text_data)))
        check_targets(image_gold, text_keys, f"query ids of {cfg.text_data}")
        dim = encoder.embed_dim
        t_load = time.perf_counter() - started

        # ---- encode this rank's shard of images and captions, gather in rank order
        t0 = time.perf_counter()
        n_img, n_txt = len(image_ids), len(text_ids)
        on_disk = not ctx.distributed and (n_img + n_txt) * dim * 4 > MEMMAP_SHARE * available_memory()
        scratch = scratch_stack.enter_context(_scratch(cfg.output_dir)) if on_disk else None
        i0, i1 = shard_range(n_img, ctx.rank, ctx.world_size)
        t_0, t_1 = shard_range(n_txt, ctx.rank, ctx.world_size)
        image_emb = encoder.encode_images(archive, image_ids[i0:i1], progress=ctx.is_main,
                                          out=_feature_buffer(i1 - i0, dim, on_disk, scratch, "images"))
        text_emb = encoder.encode_texts([q.query_text for q in queries[t_0:t_1]], progress=ctx.is_main,
                                        out=_feature_buffer(t_1 - t_0, dim, on_disk, scratch, "texts"))
        encoder_description = encoder.describe()
        stack.close()  # the model and the archive go before the search (GPU memory)
        if ctx.distributed:
            image_emb = gather_rows(torch.from_numpy(image_emb), n_img, ctx).numpy()
            text_emb = gather_rows(torch.from_numpy(text_emb), n_txt, ctx).numpy()
        t_encode = time.perf_counter() - t0

        # ---- exact top-k both ways, this rank's share of the queries, gathered in rank order
        t0 = time.perf_counter()
        image_in = image_emb if on_disk else torch.from_numpy(image_emb)
        text_in = text_emb if on_disk else torch.from_numpy(text_emb)
        if ctx.distributed or on_disk:  # each rank its share of the queries; or memory-mapped features
            t2i = search(text_in[t_0:t_1], image_in, search_cfg, "text->image")
            i2t = search(image_in[i0:i1], text_in, search_cfg, "image->text")
        else:
            t2i, i2t = search_both_ways(text_in, image_in, search_cfg)
        if ctx.distributed:
            t2i = gather_rows(torch.from_numpy(t2i), n_txt, ctx).numpy()
            i2t = gather_rows(torch.from_numpy(i2t), n_img, ctx).numpy()
        t_search = time.perf_counter() - t0
        if not ctx.is_main:
            return None

        # ---- rank 0 writes, into the staging files of the output set (renamed into place together)
        t0 = time.perf_counter()
        out = cfg.output_dir

        def target(name: str) -> Path:
            return staged.path(out / name)

        write_predictions(target(OUTPUT_NAMES["text_predictions"]), "query_id", text_ids, image_ids, t2i)
        write_predictions(target(OUTPUT_NAMES["image_predictions"]), "image_id", image_ids, text_ids, i2t)
        results, failures = {}, []
        for name, gold, query_keys, gallery_keys, indices in (("text_score", text_gold, text_keys, image_keys, t2i),
                                                              ("image_score", image_gold, image_keys, text_keys, i2t)):
            try:
                results[name] = write_score(target(OUTPUT_NAMES[name]), gold, query_keys, gallery_keys, indices,
                                            shown=out / OUTPUT_NAMES[name])
            except DataError as e:  # the original's failure JSON is staged; the error comes after the commit
                failures.append(str(e))
        if cfg.save_features != "none":
            ext = "jsonl" if cfg.save_features == "jsonl" else "npy"
            write_features(out / f"image_features.{ext}", image_ids, image_emb, id_field="image_id",
                           fmt=cfg.save_features, staged=staged)
            write_features(out / f"text_features.{ext}", text_ids, text_emb, id_field="query_id",
                           fmt=cfg.save_features, staged=staged)
        del image_emb, text_emb, image_in, text_in  # memory-mapped ones: closed before their folder goes
    t_write = time.perf_counter() - t0
    if failures:
        return ScoreFailures(failures)

    t2i_summary, i2t_summary = recall_summary(results["text_score"]), recall_summary(results["image_score"])
    metrics = {
        "text_to_image": t2i_summary,
        "image_to_text": i2t_summary,
        "mean_recall": (t2i_summary["mean_recall"] + i2t_summary["mean_recall"]) / 2,
        "counts": {"images": n_img, "texts": n_txt, "dim": dim, "top_k": cfg.search.top_k,
                   "image_gold": "file" if cfg.image_standard_path else "derived from item_ids"},
        "timings_s": {"load": t_load, "encode": t_encode, "search": t_search, "write": t_write,
                      "total": time.perf_counter() - started},
        "throughput": {"images_per_s": n_img / t_encode if t_encode else None,
                       "texts_per_s": n_txt / t_encode if t_encode else None},
        "features": "memory-mapped" if on_disk else "in memory",
        "checkpoint": encoder_description,
        "inputs": {"image_data": str(cfg.image_data), "text_data": str(cfg.text_data),
                   "image_standard_path": str(cfg.image_standard_path) if cfg.image_standard_path else None},
        "environment": environment(ctx),
    }
    write_json(staged.path(out / OUTPUT_NAMES["metrics"]), metrics)
    return metrics
