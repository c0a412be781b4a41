"""The PyTorch runner: a checkpoint on a device, optionally compiled and replayed as CUDA graphs.

Without options it computes what `fklip.runner.ModelRunner` computes (uint8 pixels normalised on
the device by `model_input_from_batch`, texts cut after their last end token through
`fklip.model.text_emb_cut`, the one `autocast` rule), so it is the oracle the other runners are
compared with, and the baseline their speed is measured against.

Fused towers (`fused=True`): the towers `fklip export` re-states (export.towers: one QKV
projection per block, the last block at the pooled token only, F.scaled_dot_product_attention, causal for the text tower, so CUDA runs flash
attention; LayerNorm statistics and the final normalisation in fp32) instead of open_clip's modules, with
weights in the precision's dtype (fp32, fp16 or bf16). The same weights, so the same function up
to rounding; tests compare them with the open_clip path.

CUDA graphs (`cuda_graphs=True`, CUDA only): one graph per input shape, (B,) for images and
(B, L) for texts (L rounded up to a multiple of 8 with padding, which a causal tower ignores),
captured on first use after two warm-up runs and replayed with the batch copied into the
graph's static input. All graphs share one memory pool; that is safe because
every replay's output is copied to the host before the next replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from export.towers import build_towers
from fklip.config import EncodeConfig, check_device, parse_device
from fklip.data.archive import model_input_from_batch
from fklip.errors import ConfigError, DataError
from fklip.model import load_checkpoint, text_emb_cut, trimmable
from fklip.runner import WEIGHT_DTYPES, autocast, image_encoding_of, prepare_model

logger = logging.getLogger(__name__)

GRAPH_WARMUP = 2
GRAPH_LENGTH_BUCKET = 8  # CUDA graphs: text lengths rounded up to a multiple of this


class TorchRunner:
    """Encode with the PyTorch model of a checkpoint (`cfg.checkpoint`)."""

    backend = "torch"
    image_encoding = "float32_chw"
    takes_device_tensors = True  # encode_images accepts batches already on its CUDA device

    def __init__(self, cfg: EncodeConfig):
        # the flags were checked when `cfg` was built; here, that the device exists
        if cfg.engine != "torch":
            raise ConfigError(f"the torch runner runs --engine torch configs, got --engine {cfg.engine}")
        kind, index = parse_device(check_device(cfg.device))
        self.cfg = cfg
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self.precision = cfg.precision
        self.model = self._towers = None
        self._image_fn = self._text_fn = None

    # ---- resources

    def __enter__(self) -> TorchRunner:  # noqa: PYI034 (typing.Self is Python 3.11+)
        cfg = self.cfg
        ckpt = load_checkpoint(cfg.checkpoint, model_name=cfg.model, truncation=cfg.truncation,
                               trust=cfg.trust_checkpoint)
        spec = ckpt.spec
        self.model_name, self.truncation = spec.name, spec.truncation
        self.embed_dim, self.image_size, self.context_length = spec.embed_dim, spec.image_size, spec.context_length
        self._vocab_size = ckpt.model.token_embedding.num_embeddings
        self._dtype = WEIGHT_DTYPES[self.precision]
        self._trim = trimmable(ckpt.model)
        self.model = self._towers = None
        if cfg.fused:  # the towers take the checkpoint's own (fp32, CPU) weights, then move
            towers = build_towers(ckpt.model, self.precision, attention="sdpa")
            self._towers = {name: t.to(self.device) for name, t in towers.items()}
        else:
            self.model = prepare_model(ckpt.model, self.device, self.precision)
        self._image_fn = self._with_autocast(self._image_emb)
        self._text_fn = self._with_autocast(self._text_emb)
        if cfg.compile:
            # dynamic=None: specialise on the first shapes, go dynamic after a recompile
            self._image_fn = torch.compile(self._image_fn)
            self._text_fn = torch.compile(self._text_fn)
        self._graphs: dict[tuple, tuple] = {}  # shape key -> (graph, static input, static output)
        self._pool = torch.cuda.graph_pool_handle() if cfg.cuda_graphs else None
        self._threads = None
        if cfg.threads is not None:  # torch's thread count is global: restored on exit
            self._threads = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)
        logger.info("torch runner: %s on %s, precision %s, fused %s, compile %s, CUDA graphs %s",
                    self.model_name, self.device, self.precision, cfg.fused, cfg.compile,
                    cfg.cuda_graphs)
        return self

    def __exit__(self, *exc) -> None:
        self.model = self._towers = None
        self._graphs = {}
        self._pool = None
        self._image_fn = self._text_fn = None
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _require_entered(self) -> None:
        if self._image_fn is None:
            raise RuntimeError("enter the runner first: `with build_runner(cfg) as runner: ...`")

    # ---- the functions that run (and are compiled or captured)

    def _with_autocast(self, fn: Callable) -> Callable:
        """`fn` under `fklip.runner.autocast` (at amp: fp16 on CUDA, bf16 on the CPU)."""
        if self.precision != "amp":
            return fn

        def run(x: torch.Tensor) -> torch.Tensor:
            # no autocast weight cache: a captured graph must not hold cast copies made outside it
            with autocast(self.precision, self.device, cache_enabled=not self.cfg.cuda_graphs):
                return fn(x)
        return run

    def _image_emb(self, x: torch.Tensor) -> torch.Tensor:
        if self._towers is not None:
            return self._towers["image"].embed(x)  # (B, D), normalised in fp32
        return F.normalize(self.model.encode_image(x).float(), dim=-1)  # (B, D)

    def _text_emb(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._towers is not None:
            return self._towers["text"](tokens)  # (B, D); cut or full, the tower is causal
        if self._trim:
            return F.normalize(text_emb_cut(self.model, tokens).float(), dim=-1)  # (B, D)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _run(self, key: tuple, fn: Callable, x: torch.Tensor) -> np.ndarray:
        if self._pool is None:
            return fn(x).cpu().numpy()
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, x)
            logger.debug("captured a CUDA graph for %s (%d graphs)", key, len(self._graphs))
        graph, static_in, static_out = entry
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        return static_out.cpu().numpy()  # a copy: the next replay overwrites static_out

    def _capture(self, fn: Callable, x: torch.Tensor) -> tuple:
        static_in = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
            for _ in range(GRAPH_WARMUP):
                fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the pipeline's reader thread pins host memory and copies on its own
        # stream while this thread captures; "global" mode makes those calls fail and
        # invalidates the capture (pytorch#174724)
        with torch.cuda.device(x.device), torch.cuda.graph(graph, pool=self._pool,
                                                            capture_error_mode="thread_local"):
            static_out = fn(static_in)
        return graph, static_in, static_out

    # ---- the interface

    @torch.no_grad()
    def encode_images(self, pixels) -> np.ndarray:
        """float32 (B, 3, S, S) or uint8 (B, S, S, 3) -> L2-normalised (B, D) float32."""
        self._require_entered()
        x = torch.as_tensor(pixels)
        encoding = image_encoding_of(x, self.image_size)
        if len(x) == 0:
            return np.empty((0, self.embed_dim), np.float32)
        x = model_input_from_batch(x, encoding, device=self.device, dtype=self._dtype)  # (B, 3, S, S)
        return self._run(("image", *x.shape), self._image_fn, x)

    @torch.no_grad()
    def encode_texts(self, ids) -> np.ndarray:
        """(B, L) int32/int64 token ids, L <= context length -> L2-normalised (B, D) float32."""
        self._require_entered()
        tokens = torch.as_tensor(ids)
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise DataError(f"text ids: expected an integer (B, L) array, got {tokens.dtype} "
                            f"{list(tokens.shape)}")
        if tokens.shape[1] > self.context_length or tokens.shape[1] == 0:
            raise DataError(f"text ids: {tokens.shape[1]} positions, expected 1 to the model's "
                            f"context length {self.context_length}")
        if len(tokens) == 0:
            return np.empty((0, self.embed_dim), np.float32)
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= self._vocab_size:  # out of range would be a device-side assert on CUDA
            raise DataError(f"text ids: values span {lo}..{hi}, the model's vocabulary 0..{self._vocab_size - 1}")
        if self._trim:
            # (B, L') with L' = the last end token + 1: later positions cannot change a causal tower
            length = int(tokens.argmax(dim=1).max()) + 1
            tokens = tokens[:, :length]
            if self._pool is not None:  # CUDA graphs: zero-pad L' up to a bucket, fewer shapes to capture
                bucket = min(-(-length // GRAPH_LENGTH_BUCKET) * GRAPH_LENGTH_BUCKET, self.context_length)
                tokens = F.pad(tokens, (0, bucket - length))
        else:
            tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]))  # (B, context)
        tokens = tokens.to(self.device, torch.long, non_blocking=True)
        return self._run(("text", *tokens.shape), self._text_fn, tokens)

