"""What `fklip bench` measures, and the scripts in benchmarks/ with it: encoders and exact top-k,
each against the plain PyTorch a user would write, timed with fklip.timing's discipline.

* Encoders: images/s and texts/s of backends (a runner, or plain open_clip) run in turn on the
  same inputs, with the cosine of their embeddings to a reference. Every backend is warmed up (a
  full pass for torch.compile, which specialises on shapes), then each round runs every backend
  in turn, images then texts; figures are medians over rounds, and each run records the share of
  the CPUs other processes used meanwhile (from /proc/stat).
* Top-k: `fklip.retrieval.topk_chunked` against `plain_topk` (`torch.mm` + `torch.topk` per
  chunk), values compared.

Used by engines/bench.py (`fklip bench`) and by benchmarks/ (bench_engines.py, bench_retrieval.py,
gpu_bench.py, the pytest-benchmark suites).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engines.trt_build import build_trt_engines
from export.onnx_export import ExportError
from export.pipeline import run_export
from fklip.config import ExportConfig
from fklip.data.archive import model_input_from_batch, normalized_from_pixels
from fklip.data.demo_dataset import caption_and_phrases, sample_garment
from fklip.data.garments import draw_garment
from fklip.retrieval import tile_sizes, topk_chunked
from fklip.retrieval.fused import resolve_method
from fklip.timing import measure_variants

MODALITIES = ("images", "texts")


@dataclass
class Backend:
    """One engine and precision: its encode functions and what it measured."""

    name: str
    encode_images: Callable[[np.ndarray], np.ndarray]
    encode_texts: Callable[[np.ndarray], np.ndarray]
    full_warmup: bool = False  # torch.compile: specialises on each new shape
    seconds: dict = field(default_factory=lambda: {"images": [], "texts": []})
    other: dict = field(default_factory=lambda: {"images": [], "texts": []})
    retaken: dict = field(default_factory=lambda: {"images": 0, "texts": 0})
    emb: dict = field(default_factory=dict)  # modality -> (N, D) from the first round

    def encoder(self, modality: str) -> Callable[[np.ndarray], np.ndarray]:
        return self.encode_images if modality == "images" else self.encode_texts


def build_inputs(image_size: int, tokenizer, n_images: int, n_texts: int, seed: int):
    """(N, 3, S, S) CLIP-normalised demo garments, (M, context) int64 ids of demo captions, and
    the captions."""

    rng = np.random.default_rng(seed)
    pixels = np.stack([normalized_from_pixels(draw_garment(sample_garment(rng), image_size, rng)[0])
                       for _ in range(n_images)])
    captions = [caption_and_phrases(sample_garment(rng), rng)[0] for _ in range(n_texts)]
    return pixels, tokenizer(captions).numpy(), captions


def token_lengths(ids: np.ndarray) -> dict:
    """Min, median and max positions up to each caption's end token, of (M, context) ids."""
    lengths = ids.argmax(1) + 1  # (M,) the end token is the largest id
    return {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}


def open_clip_backend(model, device: str = "cpu", autocast: bool = False, name: str = "baseline",
                      image_encoding: str = "float32_chw") -> Backend:
    """open_clip as users run it: `model.encode_image` / `model.encode_text` (the full context)
    + F.normalize, under fp16 autocast on CUDA when `autocast`; numpy in, float32 numpy out.
    uint8 (B, S, S, 3) pixels (`image_encoding` "uint8_hwc") are normalised on the device; pixels
    go in as the model's weights' dtype (fp16 for a `.half()` model)."""

    dtype = next(model.parameters()).dtype

    def run(encode, encoding):
        @torch.no_grad()
        def fn(x: np.ndarray) -> np.ndarray:
            x = (model_input_from_batch(x, encoding, device=device, dtype=dtype) if encoding
                 else torch.from_numpy(x).to(device))
            with torch.autocast("cuda", dtype=torch.float16) if autocast else contextlib.nullcontext():
                emb = F.normalize(encode(x), dim=-1)  # (B, D)
            return emb.float().cpu().numpy()
        return fn

    return Backend(name, run(model.encode_image, image_encoding), run(model.encode_text, None))


def make_exports(ckpt: Path, tmp: Path, precisions: Sequence[str], int8: bool = False,
                 trt: Sequence[str] = (), batch: int = 64, uint8_input: bool = False) -> tuple[dict[str, Path], dict]:
    """One `fklip export` folder per precision (fp32, fp16, bf16) under `tmp`, the fp32 one with
    the --int8 graphs when `int8` and each precision in `trt` with TensorRT engines; profile tuned
    for `batch`; image graphs taking uint8 pixels when `uint8_input`. Returns {precision: folder} ("int8": the fp32 folder, when its int8 graphs met
    their tolerance) and what building them took (an int8 export outside its tolerance is
    redone without --int8 and the error kept under "int8_export_error")."""

    folders, facts = {}, {}
    for precision in dict.fromkeys(("fp32",) * int8 + tuple(precisions) + tuple(trt)):
        folder = tmp / f"export-{precision}"
        common = {"checkpoint": ckpt, "out": folder, "precision": precision, "trt": precision in trt,
                  "opt_batch": batch, "max_batch": max(batch, 256), "uint8_input": uint8_input}
        engines = build_trt_engines if precision in trt else None
        started = time.perf_counter()
        if precision == "fp32" and int8:
            try:
                manifest = run_export(ExportConfig(**common, int8=True), engines)
                facts["int8_parity"] = {t: q.parity.random.as_dict() for t, q in manifest.int8.items()}
                folders["int8"] = folder
            except ExportError as e:  # --int8 outside its tolerance: measured without it, and said so
                facts["int8_export_error"] = str(e)
                run_export(ExportConfig(**common, overwrite=True), engines)
        else:
            run_export(ExportConfig(**common), engines)
        folders[precision] = folder
        facts[f"export_{precision}_s"] = round(time.perf_counter() - started, 1)
    return folders, facts


def encode_all(encode: Callable, x: np.ndarray, batch: int) -> np.ndarray:
    """All of `x` through `encode` in batches: the (N, D) embeddings."""
    return np.concatenate([encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def measure(backends: list[Backend], inputs: dict[str, np.ndarray], batch: int, repeats: int,
            max_other: float = 1.0, retries: int = 0, wait_s: float = 0.0, settle_s: float = 0.2) -> None:
    """Warm up, then `repeats` rounds of every backend in turn (`fklip.timing.measure_variants`);
    fills each Backend's figures. A run during which other processes used more than `max_other`
    of the CPUs is retaken after `wait_s` seconds, at most `retries` times (runs under a second
    never are).

    Each timed pass starts after `settle_s` seconds idle: onnxruntime's worker threads spin for
    about 0.1 s after a run (and OpenMP's after torch's), and a pass started inside that tail
    ran up to 3x slower on 2 cores (fklip-tiny eager after an onnx run: 6 ms a batch against 2 ms)."""
    variants, warmups = {}, {}
    for modality, x in inputs.items():  # each round: images then texts, every backend in turn
        for b in backends:
            encode = b.encoder(modality)

            def run(b=b, modality=modality, encode=encode, x=x) -> None:
                b.emb.setdefault(modality, encode_all(encode, x, batch))  # the first round's

            variants[b.name, modality] = run
            warmups[b.name, modality] = ((lambda encode=encode, x=x: encode_all(encode, x, batch)) if b.full_warmup
                                         else (lambda encode=encode, x=x: encode(x[:batch])))
    timings = measure_variants(variants, repeats, max_other=max_other, retries=retries, wait_s=wait_s,
                               settle_s=settle_s, warmups=warmups)
    for b in backends:
        for modality in inputs:
            b.seconds[modality] += timings.seconds[b.name, modality]
            b.other[modality] += timings.other[b.name, modality]
            b.retaken[modality] += timings.retaken[b.name, modality]


def cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(N,) cosine of each row of `got` with the same row of `ref`, in float64."""
    return (got.astype(np.float64) * ref).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)


def min_cosine(got: np.ndarray, ref: np.ndarray) -> float:
    """The smallest per-row cosine of `got` with `ref` (row by row)."""
    return float(cosines(np.asarray(got), np.asarray(ref)).min())


def summary(backends: list[Backend], counts: dict[str, int], reference: dict[str, np.ndarray] | None = None) -> dict:
    """{backend: {images_per_s, images_x, images_min_cos, ..., texts_...}}: rates and ratios
    against the first backend (the baseline), cosines against `reference` (default: the
    baseline's embeddings)."""
    base = backends[0]
    reference = reference or base.emb
    out = {}
    for b in backends:
        row = {}
        for modality, n in counts.items():
            per_s = n / statistics.median(b.seconds[modality])
            base_per_s = n / statistics.median(base.seconds[modality])
            cos = cosines(b.emb[modality], reference[modality])
            row.update({f"{modality}_per_s": round(per_s, 2), f"{modality}_x": round(per_s / base_per_s, 3),
                        f"{modality}_min_cos": round(float(cos.min()), 6),
                        f"{modality}_mean_cos": round(float(cos.mean()), 6),
                        f"{modality}_s": [round(s, 3) for s in b.seconds[modality]],
                        f"{modality}_other_cpu": round(max(b.other[modality]), 3),
                        f"{modality}_retaken": b.retaken[modality]})
        out[b.name] = row
    return out


# ---- exact top-k against plain torch

TOPK_TOLERANCE = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # plain vs fklip values


def features(n: int, dim: int, seed: int, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, dim) random L2-normalised rows, the same for a seed on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, dtype)


def plain_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual chunked top-k, over the same tiles as `topk_chunked`: `torch.mm` in the
    features' dtype, `torch.topk` per score chunk, concatenate with the running best, topk again.
    No tie rule (topk's order among equal scores is arbitrary)."""
    tile_q, tile_g = tile_sizes(len(queries), len(gallery))
    out_values, out_indices = [], []
    for q0 in range(0, len(queries), tile_q):
        query = queries[q0:q0 + tile_q]
        best_values = best_indices = None
        for g0 in range(0, len(gallery), tile_g):
            values, indices = torch.topk(query @ gallery[g0:g0 + tile_g].T, min(k, len(gallery) - g0), dim=1)
            indices += g0
            if best_values is not None:
                values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
                values, pos = torch.topk(values, k, dim=1)
                indices = indices.gather(1, pos)
            best_values, best_indices = values, indices
        out_values.append(best_values)
        out_indices.append(best_indices)
    return torch.cat(out_values), torch.cat(out_indices)


def topk_method(device: str | torch.device, dtype: torch.dtype = torch.float32, method: str = "auto",
                k: int = 10, dim: int = 512) -> str:
    """The path, "fused" or "torch", that a search of `dtype` features on `device` takes with
    `method` (`fklip.retrieval.fused.resolve_method`; "fused" where it cannot run raises): for the
    JSON rows that say which ran. `fklip eval` searches float32 features with "auto"."""
    probe = torch.zeros((1, dim), device=device, dtype=dtype)
    return resolve_method(probe, probe, k, 65536, method)


def bench_topk(n_queries: int, n_gallery: int, dim: int, k: int, repeats: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Queries/s of `topk_chunked` against `plain_topk` on random unit features, measured in turn
    (one warm-up each, median of `repeats`), with the two results' values compared."""
    queries, gallery = features(n_queries, dim, seed, device, dtype), features(n_gallery, dim, seed + 1, device, dtype)
    fklip_values, fklip_indices = topk_chunked(queries, gallery, k)
    plain_values, plain_indices = plain_topk(queries, gallery, k)
    diff = float((plain_values.float() - fklip_values).abs().max())
    variants = {"fklip": lambda: topk_chunked(queries, gallery, k), "plain": lambda: plain_topk(queries, gallery, k)}
    method = resolve_method(queries, gallery, k, len(gallery))  # what topk_chunked runs here
    if method == "fused":  # time the torch path too
        variants["fklip torch path"] = lambda: topk_chunked(queries, gallery, k, method="torch")
    timings = measure_variants(variants, repeats, device)
    per_s = {name: n_queries / timings.median(name) for name in variants}
    return {"queries": n_queries, "gallery": n_gallery, "dim": dim, "k": k, "dtype": str(dtype).split(".")[-1],
            "device": str(device), "baseline": "torch.mm + torch.topk per chunk", "fklip_method": method,
            "fklip_torch_path_queries_per_s": (round(per_s["fklip torch path"], 2)
                                               if "fklip torch path" in per_s else None),
            "fklip_queries_per_s": round(per_s["fklip"], 2), "plain_queries_per_s": round(per_s["plain"], 2),
            "x": round(per_s["fklip"] / per_s["plain"], 3),
            "fklip_s": [round(s, 4) for s in timings.seconds["fklip"]],
            "plain_s": [round(s, 4) for s in timings.seconds["plain"]],
            "values_max_abs_diff": diff, "values_equal": diff <= TOPK_TOLERANCE[dtype],
            "rows_with_other_indices": int((plain_indices != fklip_indices).any(dim=1).sum()),
            "other_cpu": round(max(max(v) for v in timings.other.values()), 3)}
