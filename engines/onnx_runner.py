"""The onnxruntime runner: the graphs of a `fklip export` folder, on the CPU or one CUDA device.

The manifest says what the graphs take (float32 CHW or uint8 HWC pixels, int32 or int64 ids)
and how large a batch may be; the runner converts what it is given, cuts text batches after
their last end token and splits batches larger than the export's `max_batch`. A CUDA session
either runs on CUDA or fails: never a silent fallback to the CPU.
"""

from __future__ import annotations

import logging

import numpy as np

from export.manifest import ExportManifest
from export.onnx_export import ort_session
from fklip.config import EncodeConfig, parse_device
from fklip.errors import ConfigError
from fklip.runner import as_numpy, images_in_encoding, text_ids_from

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
ENCODING_OF_DTYPE = {"float32": "float32_chw", "uint8": "uint8_hwc"}


class OnnxRunner:
    """Encode with the ONNX graphs of an export folder (`cfg.engine_dir`)."""

    backend = "onnx"

    def __init__(self, cfg: EncodeConfig):
        # the flags were checked when `cfg` was built (engines.base.build_runner picks by cfg.engine)
        if cfg.engine != "onnx":
            raise ConfigError(f"the onnx runner runs --engine onnx configs, got --engine {cfg.engine}")
        kind, index = parse_device(cfg.device)
        self.cfg = cfg
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self._device_id = index
        self._sessions: dict | None = None

    # ---- resources

    def __enter__(self) -> OnnxRunner:  # noqa: PYI034 (typing.Self is Python 3.11+)

        cfg = self.cfg
        manifest = ExportManifest.read(cfg.engine_dir, int8=cfg.int8)
        model = manifest.model
        self.manifest = manifest
        self.model_name = model.name
        self.truncation = cfg.truncation or model.truncation
        self.embed_dim, self.image_size = model.embed_dim, model.image_size
        self.context_length = model.context_length
        self.precision = "int8" if cfg.int8 else manifest.precision or "fp32"
        if cfg.precision not in ("fp32", self.precision):
            raise ConfigError(f"--precision {cfg.precision}: the onnx engine runs the graphs as exported "
                              f"({self.precision}); re-export with --precision {cfg.precision}")
        if cfg.model is not None and cfg.model != self.model_name:
            logger.warning("%s holds model %s; ignoring --model %s", cfg.engine_dir, self.model_name, cfg.model)
        self.max_batch = manifest.profile.max_batch
        self.graphs = manifest.graphs(cfg.int8)  # tower -> manifest entry (file, IO, parity)
        image_in, text_in = self.graphs["image"].input, self.graphs["text"].input
        if image_in.dtype not in ENCODING_OF_DTYPE:
            raise ConfigError(f"{cfg.engine_dir}: image graph input dtype {image_in.dtype!r} is not supported")
        self.image_encoding = ENCODING_OF_DTYPE[image_in.dtype]
        self.ids_dtype = text_in.dtype
        self._names = {t: (e.input.name, e.output.name) for t, e in self.graphs.items()}
        sessions = {}
        for tower, entry in self.graphs.items():
            path = manifest.folder / entry.file
            if self._device_id is None:
                sessions[tower] = ort_session(path, cfg.threads)
            else:
                sessions[tower] = ort_session(path, cfg.threads, CUDA, {"device_id": self._device_id})
        self._sessions = sessions
        logger.info("onnx runner: %s (%s) on %s, %s pixels, %s ids, max batch %d", self.model_name,
                    self.precision, self.device, self.image_encoding, self.ids_dtype, self.max_batch)
        return self

    def __exit__(self, *exc) -> None:
        self._sessions = None

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        """Run one tower over (B, ...) inputs in chunks of at most max_batch -> (B, D) float32."""
        if self._sessions is None:
            raise RuntimeError("enter the runner first: `with build_runner(cfg) as runner: ...`")
        if len(x) == 0:
            return np.empty((0, self.embed_dim), np.float32)
        session, (name_in, name_out) = self._sessions[tower], self._names[tower]
        parts = [session.run([name_out], {name_in: x[i:i + self.max_batch]})[0]
                 for i in range(0, len(x), self.max_batch)]  # each (b, D)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return np.asarray(out, np.float32)

    # ---- the interface

    def encode_images(self, pixels) -> np.ndarray:
        """float32 (B, 3, S, S) or uint8 (B, S, S, 3) -> L2-normalised (B, D) float32.

        A batch in the other encoding than the graph's is converted on the CPU, vectorised.
        """
        x = images_in_encoding(as_numpy(pixels), self.image_size, self.image_encoding)  # graph's encoding
        return self._run("image", x)

    def encode_texts(self, ids) -> np.ndarray:
        """(B, L) int32/int64 token ids, L <= context length -> L2-normalised (B, D) float32."""
        return self._run("text", text_ids_from(ids, self.context_length, self.ids_dtype))  # (B, L')
