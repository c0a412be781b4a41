"""Parity of an exported graph (or engine) against the fp32 PyTorch model it came from.

The reference is the loaded open_clip model itself (`encode_image` / `encode_text` over the full
context, L2-normalised), not the export-ready re-statement, so a mistake in the re-statement is
caught too. Each sample's cosine and largest absolute difference are measured; the tolerance of
the precision decides, and a NaN anywhere fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from export.manifest import ParityFigures, ParityReport
from export.specs import Tolerance, TowerSpec, random_inputs
from fklip.data.archive import model_input_from_batch

RANDOM_BATCHES = (1, 7)  # batch sizes of the random inputs; real inputs go in batches of 16


@dataclass
class ParityStats:
    samples: int = 0
    min_cosine: float = 1.0
    mean_cosine_sum: float = 0.0
    max_abs: float = 0.0
    non_finite: int = 0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        finite = np.isfinite(got).all(axis=1)
        self.non_finite += int((~finite).sum())
        got = np.where(finite[:, None], got, 0.0)
        cos = (got.astype(np.float64) * ref).sum(axis=1) / np.maximum(
            np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
        cos = np.where(finite, cos, -1.0)
        self.samples += len(got)
        self.min_cosine = min(self.min_cosine, float(cos.min()))
        self.mean_cosine_sum += float(cos.sum())
        self.max_abs = max(self.max_abs, float(np.abs(got - ref).max()))

    def as_dict(self) -> dict:
        return {"samples": self.samples, "min_cosine": round(self.min_cosine, 7),
                "mean_cosine": round(self.mean_cosine_sum / max(self.samples, 1), 7),
                "max_abs": float(f"{self.max_abs:.3g}"), "non_finite": self.non_finite}

    def failures(self, tol: Tolerance) -> list[str]:
        problems = []
        if self.non_finite:
            problems.append(f"{self.non_finite} of {self.samples} embeddings are NaN or infinite")
        if self.min_cosine < tol.min_cosine:
            problems.append(f"min cosine {self.min_cosine:.6f} < {tol.min_cosine}")
        if self.max_abs > tol.max_abs:
            problems.append(f"max abs difference {self.max_abs:.3g} > {tol.max_abs}")
        return problems


@torch.no_grad()
def reference_images(model, pixels: np.ndarray) -> np.ndarray:
    """fp32 PyTorch image embeddings for float32 CHW or uint8 HWC pixels."""
    encoding = "uint8_hwc" if pixels.dtype == np.uint8 else "float32_chw"
    x = model_input_from_batch(pixels, encoding, dtype=torch.float32)
    return F.normalize(model.encode_image(x), dim=-1).numpy()


@torch.no_grad()
def reference_texts(model, ids: np.ndarray, context_length: int) -> np.ndarray:
    """fp32 PyTorch text embeddings; ids are padded back to the full context, as training saw them."""
    full = np.zeros((len(ids), context_length), np.int64)
    full[:, :ids.shape[1]] = ids
    return F.normalize(model.encode_text(torch.from_numpy(full)), dim=-1).numpy()


def tower_inputs(spec: TowerSpec, real: np.ndarray | None, seed: int = 0):
    """(kind, batch) pairs: random batches of 1 and 7 (texts: short and full length), then real
    samples in batches of 16."""
    for i, batch in enumerate(RANDOM_BATCHES):
        lengths = (None,) if spec.tower == "image" else (spec.max_length, min(12, spec.max_length))
        for length in lengths:
            yield "random", random_inputs(spec, batch, seed=seed + i, length=length)
    if real is not None:
        for start in range(0, len(real), 16):
            yield "real", real[start:start + 16]


def check_tower(run: Callable[[np.ndarray], np.ndarray], model, spec: TowerSpec,
                real: np.ndarray | None, tol: Tolerance) -> tuple[ParityReport, list[str]]:
    """Run `run` (one graph or engine) and the PyTorch model on the same inputs.

    Returns the report (the figures of the random and real inputs, the tolerance, passed) and the
    list of problems (empty when within tolerance).
    """
    stats = {"random": ParityStats(), "real": ParityStats()}
    for kind, x in tower_inputs(spec, real):
        if spec.tower == "image":
            ref = reference_images(model, x)
        else:
            x = x[:, :int(x.argmax(axis=1).max()) + 1]
            ref = reference_texts(model, x, spec.max_length)
        stats[kind].add(np.asarray(run(x), np.float32), ref)
    problems = [f"{kind} inputs: {p}" for kind, s in stats.items() if s.samples for p in s.failures(tol)]
    figures = {kind: ParityFigures(**s.as_dict()) for kind, s in stats.items() if s.samples}
    return ParityReport(**figures, tolerance=tol, passed=not problems), problems
