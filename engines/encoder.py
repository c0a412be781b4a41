"""The encoder `fklip eval` and `fklip extract` run for `--engine torch|onnx|trt`.

Whole archives and caption lists in, feature matrices out, built from one runner and the batched
feature pipeline, so every backend takes the same code path from the archive to the feature rows:
`fklip eval`, `fklip extract` and the demo all encode through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.base import build_runner
from export.manifest import MANIFEST_NAME, ExportManifest, sha256_of
from fklip.config import EncodeConfig
from fklip.data.archive import ImageArchive
from fklip.errors import ConfigError
from fklip.pipeline import encode_archive, encode_texts
from fklip.runner import tokenizer_for


class EngineEncoder:
    """A runner of `enc.engine` with the pipeline around it; the runner loads on entry."""

    def __init__(self, enc: EncodeConfig, device: str):
        """`device` is this process's (cuda:LOCAL_RANK under torchrun, where --device cuda means
        each rank's own GPU)."""
        self.enc = enc
        self.runner = build_runner(dataclasses.replace(enc, device=device))

    def __enter__(self) -> EngineEncoder:  # noqa: PYI034 (typing.Self is Python 3.11+)
        if self.enc.engine != "torch":
            self._check_export()
        self.runner.__enter__()
        try:
            r = self.runner
            self.model_name, self.image_size, self.embed_dim = r.model_name, r.image_size, r.embed_dim
            self.tokenizer = tokenizer_for(r)
        except BaseException:
            self.runner.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(*exc)

    def _check_export(self) -> None:
        """--truncation and --resume must agree with what the export recorded."""
        manifest = ExportManifest.read(self.enc.engine_dir, int8=self.enc.int8, verify=False)
        recorded = manifest.model.truncation
        if self.enc.truncation is not None and self.enc.truncation != recorded:
            raise ConfigError(f"--truncation {self.enc.truncation}: {self.enc.engine_dir} was exported "
                              f"with truncation {recorded!r}; re-export to change it")
        if self.enc.checkpoint is not None:
            if not self.enc.checkpoint.is_file():
                raise ConfigError(f"--resume {self.enc.checkpoint}: no such file")
            source = manifest.source
            if source is None:
                raise ConfigError(f"--resume {self.enc.checkpoint}: {self.enc.engine_dir} does not record the "
                                  "checkpoint it was exported from; re-export it or drop --resume")
            if sha256_of(self.enc.checkpoint) != source.sha256:
                raise ConfigError(f"--resume {self.enc.checkpoint} is not the checkpoint "
                                  f"{self.enc.engine_dir} was exported from "
                                  f"({source.checkpoint}); re-export it or drop --resume")

    def describe(self) -> dict:
        r = self.runner
        info = {"engine": self.enc.engine, "model": r.model_name, "truncation": r.truncation,
                "precision": getattr(r, "precision", self.enc.precision)}
        if self.enc.engine == "torch":
            info.update(path=str(self.enc.checkpoint), compile=self.enc.compile, cuda_graphs=self.enc.cuda_graphs,
                        fused=self.enc.fused)
        else:
            info.update(engine_dir=str(self.enc.engine_dir), int8=self.enc.int8,
                        path=str(self.enc.checkpoint) if self.enc.checkpoint else None)
        return info

    def encode_images(self, archive: ImageArchive, image_ids: Sequence | None = None,
                      out: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        return encode_archive(self.runner, archive, self.enc.image_batch_size, image_ids, out, progress)

    def encode_texts(self, texts: Sequence[str], out: np.ndarray | None = None,
                     progress: bool = False) -> np.ndarray:
        return encode_texts(self.runner, self.tokenizer, texts, self.enc.text_batch_size, out, progress)


def encoder_inputs(enc: EncodeConfig) -> dict[str, list[Path]]:
    """The files running `enc` reads (flag -> paths), for the outputs' checks: the checkpoint, and
    every file of the export folder (an output there would change what the manifest hashes)."""
    inputs = {"--resume": [enc.checkpoint] if enc.checkpoint is not None else []}
    if enc.engine_dir is not None:
        folder = Path(enc.engine_dir)
        inputs["--engine-dir"] = [folder / MANIFEST_NAME, *(p for p in folder.rglob("*") if p.is_file())] \
            if folder.is_dir() else []
    return inputs
