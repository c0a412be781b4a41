"""Measuring encoders: images/s and texts/s of backends (a runner, or plain open_clip) run in
turn on the same inputs, with the cosine of their embeddings to a reference.

Shared by `fklip bench` (engines/bench.py) and benchmarks/bench_engines.py. Every backend is
warmed up (a full pass for torch.compile, which specialises on shapes), then each round runs
every backend in turn, images then texts; figures are medians over rounds, and each run records
the share of the CPUs other processes used meanwhile (from /proc/stat).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fklip.bench import timed_quietly

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
    from fklip.data.archive import normalized_from_pixels
    from fklip.data.demo_dataset import caption_and_phrases, sample_garment
    from fklip.data.garments import draw_garment

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
    import contextlib

    import torch
    import torch.nn.functional as F

    from fklip.data.archive import model_input_from_batch

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
    from engines.trt_build import build_trt_engines
    from export.onnx_export import ExportError
    from export.pipeline import run_export
    from fklip.config import ExportConfig

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
    """Warm up, then `repeats` rounds of every backend in turn; fills each Backend's figures. A
    run during which other processes used more than `max_other` of the CPUs is retaken after
    `wait_s` seconds, at most `retries` times (runs under a second never are).

    Each timed pass starts after `settle_s` seconds idle: onnxruntime's worker threads spin for
    about 0.1 s after a run (and OpenMP's after torch's), and a pass started inside that tail
    ran up to 3x slower on 2 cores (fklip-tiny eager after an onnx run: 6 ms a batch against 2 ms)."""
    for b in backends:
        for modality, x in inputs.items():
            if b.full_warmup:
                encode_all(b.encoder(modality), x, batch)
            else:
                b.encoder(modality)(x[:batch])
    for _ in range(repeats):
        for modality, x in inputs.items():
            for b in backends:
                embs: list[np.ndarray] = []
                encode = b.encoder(modality)
                seconds, share, retakes = timed_quietly(
                    lambda out=embs, encode=encode, x=x: out.append(encode_all(encode, x, batch)),
                    max_other=max_other, retries=retries, wait_s=wait_s, settle_s=settle_s)
                b.retaken[modality] += retakes
                b.seconds[modality].append(seconds)
                b.other[modality].append(share)
                b.emb.setdefault(modality, embs[-1])


def cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(N,) cosine of each row of `got` with the same row of `ref`, in float64."""
    return (got.astype(np.float64) * ref).sum(1) / np.maximum(
        np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)


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
