"""Features of a model in memory, through the batched pipeline: what training's knowledge refresh
and validation encode with (fklip.runner.ModelRunner over fklip.pipeline, the path the engines'
runners take too).

Features are L2-normalised float32 rows written into a caller's array (in memory, or an
np.memmap when they do not fit), so encoding a large set never holds more than a batch twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fklip import pipeline
from fklip.data.archive import ImageArchive
from fklip.model import Tokenizer
from fklip.runner import ModelRunner


def encode_archive(model, archive: ImageArchive, batch_size: int = 256, device: str = "cpu",
                   image_ids: Sequence | None = None, progress: bool = False,
                   precision: str = "fp32", out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised image features (N, D) float32 of `model` (as it is: device, dtype, mode), in
    archive order (or `image_ids` order); the next batches are read in a background thread."""
    return pipeline.encode_archive(ModelRunner(model, device, precision), archive, batch_size, image_ids,
                                   out, progress)


def encode_texts(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: str = "cpu", progress: bool = False, precision: str = "fp32",
                 out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised text features (N, D) float32 of `model`, in the order given, in batches of
    the input order (`pipeline.encode_texts(by_length=False)`)."""
    runner = ModelRunner(model, device, precision, truncation=tokenizer.truncation)
    return pipeline.encode_texts(runner, tokenizer, texts, batch_size, out, progress, by_length=False)
