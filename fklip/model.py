"""CLIP towers built through open_clip, the tokenizer, and checkpoint loading and saving.

Checkpoints fklip reads (`load_checkpoint` tells them apart by content, never by file name):

- `fklip`: fklip's own, self-describing (`{"fklip": meta, "epoch", "state_dict", ...}`);
- `original`: the original code's and the PAI checkpoint (`{"epoch", "state_dict"}`, keys
  prefixed `module.`), and open_clip training checkpoints, which share that shape (and are
  taken for the original's: QuickGELU);
- `openai-torchscript`: OpenAI's `ViT-B-32.pt` TorchScript archive;
- `openai-state-dict`: OpenAI's plain state dict (it holds the entries `_OPENAI_META_KEYS`);
- `state-dict`: any other plain state dict (open_clip's).

The activation (GELU or QuickGELU) changes the features but not the weights' shapes, so a file
that does not record it is built by a rule and the choice is logged (see `_resolve_spec`).

Nothing is unpickled beyond tensors and plain containers (`torch.load(weights_only=True)`);
a file that needs more is refused unless the caller passes `trust=True` (`--trust-checkpoint`).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
from open_clip import tokenizer as oc_tokenizer
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer

from fklip import __version__
from fklip.checkpoint_file import read_checkpoint_file
from fklip.errors import CheckpointError, ConfigError, OutputError
from fklip.io import atomic_output

logger = logging.getLogger(__name__)

TRUNCATIONS = ("original", "openai")
CHECKPOINT_FORMAT = "fklip-checkpoint"
CHECKPOINT_VERSION = 1
FKLIP_CONFIG_DIR = Path(__file__).parent / "model_configs"

# The original's spelling of model names. Its configs (and OpenAI's weights) use QuickGELU.
MODEL_ALIASES = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
}
# open_clip's naming: `NAME` is built with GELU, `NAME-quickgelu` with QuickGELU (x * sigmoid(1.702 x)).
QUICKGELU_SUFFIX = "-quickgelu"
# What fklip records (checkpoints, export manifests) -> how messages name it.
ACTIVATIONS = {"gelu": "GELU", "quick_gelu": "QuickGELU"}
# Keys of OpenAI state dicts that are metadata, not weights.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


# ---------------------------------------------------------------- model configs and building


@functools.cache
def _register_fklip_configs() -> None:

    open_clip.add_model_config(FKLIP_CONFIG_DIR)


def list_model_names() -> list[str]:
    """Every model name `build_model` accepts (open_clip's configs, fklip's, and the aliases)."""

    _register_fklip_configs()
    return sorted(open_clip.list_models()) + sorted(MODEL_ALIASES)


def model_config(name: str) -> tuple[str, dict]:
    """(canonical name, open_clip config dict) for a model name; ConfigError names the flag."""

    _register_fklip_configs()
    canonical = MODEL_ALIASES.get(name, name)
    cfg = open_clip.get_model_config(canonical) if "/" not in canonical else None
    base = canonical.removesuffix(QUICKGELU_SUFFIX)
    if cfg is None and base != canonical and "/" not in base:
        # `NAME-quickgelu` for every `NAME`, as open_clip's registered pairs (same config but this)
        cfg = open_clip.get_model_config(base)
        cfg = None if cfg is None else {**cfg, "quick_gelu": True}
    if cfg is None:
        close = difflib.get_close_matches(name, list_model_names(), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `fklip data models`"
        raise ConfigError(f"--model: unknown model {name!r}{hint}")
    return canonical, cfg


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs to rebuild its model: the open_clip config and the tokenizer mode."""

    name: str
    config: dict = field(hash=False)
    truncation: str = "original"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"--truncation: expected one of {', '.join(TRUNCATIONS)}, "
                              f"got {self.truncation!r}")

    @property
    def image_size(self) -> int:
        size = self.config["vision_cfg"].get("image_size", 224)
        return size if isinstance(size, int) else int(size[0])

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def activation(self) -> str:
        """"quick_gelu" or "gelu": the config's `quick_gelu` (open_clip's default is GELU)."""
        return "quick_gelu" if self.config.get("quick_gelu", False) else "gelu"

    @classmethod
    def from_name(cls, name: str, truncation: str = "original") -> "ModelSpec":
        canonical, cfg = model_config(name)
        return cls(canonical, cfg, truncation)


def _model_class(cfg: dict):
    """The open_clip class for a config: an explicit table, never a guess from the name."""

    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise ConfigError("--model: configs with a Hugging Face text tower need downloads; "
                          "fklip supports CLIP-style text towers")
    return {False: CLIP, True: CustomTextCLIP}[bool(cfg.get("custom_text", False))]


def build_model(spec: ModelSpec):
    """A randomly initialised open_clip model in fp32 and eval mode (load weights afterwards)."""
    cfg = copy.deepcopy(spec.config)
    cls = _model_class(cfg)
    cfg.pop("custom_text", None)
    cfg.pop("multimodal_cfg", None)
    model = cls(**cfg)
    return model.eval()


def trimmable(model) -> bool:
    """True for the causal, argmax-pooled CLIP text towers whose positions after the end token
    cannot change the features (`encode_text_trimmed`, `text_emb_cut`)."""

    return (isinstance(model, CLIP) and model.text_pool_type == "argmax"
            and getattr(model, "attn_mask", None) is not None)


def text_emb_cut(model, tokens):
    """`model.encode_text` for ids already cut after the batch's last end token: (B, L) -> (B, D),
    the text tower run over L positions only. No host sync (CUDA graphs can capture it)."""

    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)  # (B, L, width)
    pool = tokens.argmax(dim=-1)  # (B,) the end tokens, as open_clip's argmax pooling
    x = x[torch.arange(x.shape[0], device=x.device), pool]  # (B, width)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if hasattr(proj, "weight") else x @ proj


def encode_text_trimmed(model, tokens, device=None):
    """`model.encode_text(tokens)` computed over the first L positions only, L = the last pooling
    position in the batch (+1). The text tower is causal and pools at the largest token id (the
    end-of-text token), so later positions cannot change the result: same features, a fraction of
    the work for short texts such as "a photo of t-shirt". Other towers fall back to encode_text.

    With `device`, `tokens` may be on the host: L is found there and only the cut ids are copied
    (non_blocking: the copy need not wait for the device's queued work)."""
    if not trimmable(model):
        return model.encode_text(tokens if device is None else tokens.to(device))
    tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]
    return text_emb_cut(model, tokens if device is None else tokens.to(device, non_blocking=True))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- tokenizer


WORD_CACHE = 1 << 20  # distinct pre-tokens memoised by Tokenizer (cleared when full)


class Tokenizer:
    """open_clip's byte-level BPE (the real vocabulary it ships) with the original's truncation.

    `truncation="original"` keeps the first `context_length` tokens of an over-long text and
    inserts no end-of-text token, as the original code does; the text feature is then pooled at
    the largest token id in the window. `truncation="openai"` forces the last token to
    end-of-text, as OpenAI's tokenizer does.
    """

    def __init__(self, truncation: str = "original", context_length: int = 77):

        if truncation not in TRUNCATIONS:
            raise ConfigError(f"--truncation: expected one of {', '.join(TRUNCATIONS)}, "
                              f"got {truncation!r}")
        self.truncation = truncation
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id
        self.encode = functools.lru_cache(maxsize=65536)(self._encode)
        self._words: dict[str, tuple[int, ...]] = {}  # pre-token -> its BPE ids

        self._plain_lower = self._bpe.clean_fn is oc_tokenizer._clean_lower  # the cleaning _bpe_ids can skip

    def _bpe_ids(self, text: str) -> list[int]:
        """open_clip's `SimpleTokenizer.encode`, memoised per pre-token: the same cleaning, split
        and BPE, but each distinct word is byte-encoded, merged and looked up once (captions
        repeat their words; this is most of the per-caption cost). Tests compare the two."""
        bpe, ids = self._bpe, []
        if self._plain_lower and text.isascii() and text.isprintable() and "&" not in text:
            # ftfy and html.unescape leave printable ASCII without "&" as it is: skip them
            cleaned = " ".join(text.split()).lower()
        else:
            cleaned = bpe.clean_fn(text)
        for token in bpe.pat.findall(cleaned):
            word = self._words.get(token)
            if word is None:
                if len(self._words) >= WORD_CACHE:
                    self._words.clear()
                merged = bpe.bpe("".join(bpe.byte_encoder[b] for b in token.encode("utf-8")))
                word = self._words[token] = tuple(bpe.encoder[t] for t in merged.split(" "))
            ids.extend(word)
        return ids

    def _encode(self, text: str) -> tuple[int, ...]:
        """[SOT] + BPE + [EOT], truncated to the context length by the chosen rule."""
        tokens = [self.sot_id, *self._bpe_ids(text), self.eot_id]
        if len(tokens) > self.context_length:
            tokens = tokens[: self.context_length]
            if self.truncation == "openai":
                tokens[-1] = self.eot_id
        return tuple(tokens)

    def __call__(self, texts: str | Sequence[str]):
        """(B, context_length) int64 token ids, zero-padded."""

        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            out[row, : len(tokens)] = tokens
        return torch.from_numpy(out)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._bpe.decode([t for t in tokens if t not in (0, self.sot_id, self.eot_id)])


def build_tokenizer(spec: ModelSpec) -> Tokenizer:
    return Tokenizer(spec.truncation, spec.context_length)


# ---------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model with its weights, its spec, and what else the file held."""

    model: Any
    spec: ModelSpec
    source_format: str
    path: Path
    epoch: int | None = None
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # optimizer, scaler, ... (fklip training checkpoints)


def _is_state_dict(obj: Any) -> bool:

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _clean_state_dict(state_dict: dict) -> dict:
    """Drop DDP's `module.` prefix and OpenAI's metadata entries."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key not in _OPENAI_META_KEYS:
            out[key] = value
    return out


def config_from_state_dict(state_dict: dict, quick_gelu: bool = True) -> dict:
    """Infer an open_clip config (OpenAI layout) from tensor shapes, as clip.build_model.

    The shapes do not tell the activation: QuickGELU, as clip.build_model, unless told."""
    try:
        vision_width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_layers = len({k.split(".")[3] for k in state_dict
                             if k.startswith("visual.transformer.resblocks.")})
        text_width = state_dict["ln_final.weight"].shape[0]
        text_layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
        return {
            "embed_dim": int(state_dict["text_projection"].shape[1]),
            "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": int(patch * grid), "layers": vision_layers,
                           "width": int(vision_width), "head_width": 64, "patch_size": int(patch)},
            "text_cfg": {"context_length": int(state_dict["positional_embedding"].shape[0]),
                         "vocab_size": int(state_dict["token_embedding.weight"].shape[0]),
                         "width": int(text_width), "heads": int(text_width) // 64,
                         "layers": text_layers},
        }
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot infer a ViT CLIP architecture from the weights (no {e}); "
                              "pass --model with the architecture's name") from None


def _load_weights(model, state_dict: dict, path: Path, model_name: str) -> None:
    """Strict load that lists every missing, unexpected and mis-shaped key before failing."""
    own = model.state_dict()
    # Traced archives also store non-persistent buffers (the causal mask); they are not weights.
    derived = {name for name, _ in model.named_buffers()} - set(own)
    state_dict = {k: v for k, v in state_dict.items() if k not in derived}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{more}")
        raise CheckpointError(f"{path}: weights do not fit model {model_name}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# Checkpoints that do not describe themselves -> how messages name them.
_UNDESCRIBED = {
    "original": 'a {"epoch", "state_dict"} checkpoint (the original\'s, PAI)',
    "openai-torchscript": "a TorchScript archive",
    "openai-state-dict": "an OpenAI state dict",
    "state-dict": "a plain state dict",
}
# OpenAI's weights and those fine-tuned from them by the original code (PAI): trained with QuickGELU.
_OPENAI_LINEAGE = ("original", "openai-torchscript", "openai-state-dict")


def _named_variant(spec: ModelSpec, activation: str) -> ModelSpec | None:
    """The model open_clip names for `spec`'s architecture with `activation` (`NAME` or
    `NAME-quickgelu`), or None when no name gives exactly that."""
    if spec.activation == activation:
        return spec
    base = spec.name.removesuffix(QUICKGELU_SUFFIX)
    name = base + QUICKGELU_SUFFIX if activation == "quick_gelu" else base
    try:
        other = ModelSpec.from_name(name, spec.truncation)
    except ConfigError:
        return None
    same = ({k: v for k, v in other.config.items() if k != "quick_gelu"}
            == {k: v for k, v in spec.config.items() if k != "quick_gelu"})
    return other if same and other.activation == activation else None


def _with_activation(spec: ModelSpec, activation: str) -> ModelSpec:
    """`spec`'s architecture with `activation`, under open_clip's name for it when there is one."""
    named = _named_variant(spec, activation)
    if named is not None:
        return named
    suffix = QUICKGELU_SUFFIX if activation == "quick_gelu" else "-gelu"
    return ModelSpec(spec.name.removesuffix(QUICKGELU_SUFFIX) + suffix,
                     {**spec.config, "quick_gelu": activation == "quick_gelu"}, spec.truncation)


def _resolve_spec(path: Path, source: str, state_dict: dict, model_name: str | None,
                  recorded: str | None) -> tuple[ModelSpec, str | None]:
    """(spec, warning) for a checkpoint that does not describe itself. GELU and QuickGELU weights
    have the same shapes and load into either model without error, so the activation follows a rule:

    - a TorchScript archive whose modules say it (QuickGELU or GELU): that activation;
    - OpenAI's lineage (OpenAI's archive or state dict, the original's and PAI checkpoints, all
      trained with QuickGELU): the QuickGELU variant of `--model`, as the original meant
      (`ViT-B-32` is `ViT-B-32-quickgelu`);
    - any other plain state dict (open_clip's): `--model` as open_clip names it (`ViT-B-32` is
      GELU, `ViT-B-32-quickgelu` QuickGELU);
    - no `--model`: the architecture from the tensor shapes, with QuickGELU (as clip.build_model).

    Unless the file said, the warning (one line) says which activation was built, why, and how
    to pick the other.
    """
    quick = (recorded or "quick_gelu") == "quick_gelu"
    if model_name is None:
        spec = ModelSpec("inferred-from-weights", config_from_state_dict(state_dict, quick_gelu=quick))
    else:
        spec = ModelSpec.from_name(model_name)
    lineage = source in _OPENAI_LINEAGE
    if recorded is not None or lineage:
        spec = _with_activation(spec, recorded or "quick_gelu")
    if recorded is not None:
        logger.info("%s: the archive's modules are %s; building %s", path, ACTIVATIONS[recorded], spec.name)
        return spec, None
    gelu = _named_variant(spec, "gelu")
    gelu_name = gelu.name if gelu is not None and model_name is not None else "NAME"
    label = ACTIVATIONS[spec.activation]
    if lineage:
        why = "as OpenAI's weights and the original's (PAI) are trained"
        hint = f"for GELU weights, save the weights alone as a plain state dict and pass --model {gelu_name}"
    elif model_name is None:
        why = "as OpenAI's clip.build_model"
        hint = "pass --model NAME (GELU) or NAME-quickgelu (QuickGELU), see `fklip data models`"
    else:
        why = ("as open_clip names it" if model_name not in MODEL_ALIASES
               else f"as the original's name {model_name} means")
        other = "gelu" if spec.activation == "quick_gelu" else "quick_gelu"
        variant = _named_variant(spec, other)
        hint = (f"pass --model {variant.name} for {ACTIVATIONS[other]} weights" if variant is not None
                else f"no model name builds it with {ACTIVATIONS[other]}")
    if model_name is None:
        unknown, built = "architecture or activation", f"the tensor shapes' ViT with {label}"
    else:
        unknown, built = "activation", f"{spec.name} ({label})"
    return spec, f"{path}: {_UNDESCRIBED[source]} does not record its {unknown}; built {built} {why}; {hint}"


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None,
                    truncation: str | None = None, trust: bool = False) -> Checkpoint:
    """Load any supported checkpoint into a fresh fp32 model on the CPU.

    The architecture comes from the checkpoint's own description (fklip), else from `model_name`,
    else from the tensor shapes; the activation of a file that does not record it follows
    `_resolve_spec`. `truncation` overrides the tokenizer mode; checkpoints that do not record
    one get the original's.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    file = read_checkpoint_file(path, trust)
    obj = file.content
    meta: dict = {}
    extra: dict = {}
    epoch = None
    if file.kind == "torchscript":
        source, state_dict = "openai-torchscript", obj
    elif isinstance(obj, dict) and isinstance(obj.get("fklip"), dict):
        source, meta = "fklip", obj["fklip"]
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version", 0) > CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: fklip checkpoint format {meta.get('format')!r} version "
                                  f"{meta.get('version')!r} is newer than this fklip reads "
                                  f"({CHECKPOINT_VERSION}); upgrade fklip")
        state_dict, epoch = obj["state_dict"], obj.get("epoch")
        extra = {k: v for k, v in obj.items() if k not in ("fklip", "state_dict", "epoch")}
    elif isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        source, state_dict, epoch = "original", obj["state_dict"], obj.get("epoch")
    elif _is_state_dict(obj):
        openai = any(key in obj for key in _OPENAI_META_KEYS)
        source, state_dict = "openai-state-dict" if openai else "state-dict", obj
    else:
        raise CheckpointError(f"{path}: not a CLIP checkpoint: expected a state dict, a "
                              '{"epoch", "state_dict"} dict, an fklip checkpoint or a TorchScript archive')
    state_dict = _clean_state_dict(state_dict)

    warning = None
    if meta:
        spec = ModelSpec(meta["model_name"], meta["model_config"], meta.get("truncation", "original"))
        # checkpoints written before fklip recorded "activation": their config's quick_gelu says it
        if meta.get("activation", spec.activation) != spec.activation:
            raise CheckpointError(f"{path}: records activation {meta['activation']!r} but its model config "
                                  f"builds {spec.activation!r}; the checkpoint was edited, re-save it")
        if model_name is not None and MODEL_ALIASES.get(model_name, model_name) != spec.name:
            logger.warning("%s records model %s; ignoring --model %s", path, spec.name, model_name)
    else:
        spec, warning = _resolve_spec(path, source, state_dict, model_name, file.activation)
    if truncation is not None:
        spec = ModelSpec(spec.name, spec.config, truncation)

    model = build_model(spec)
    _load_weights(model, state_dict, path, spec.name)
    if warning is not None:  # once the weights fit: a file that fits no model needs no activation
        logger.warning("%s", warning)
    logger.info("loaded %s checkpoint %s (model %s, %s, truncation %s)", source, path, spec.name,
                ACTIVATIONS[spec.activation], spec.truncation)
    return Checkpoint(model, spec, source, path, epoch if isinstance(epoch, int) else None, meta, extra)


def checkpoint_meta(spec: ModelSpec) -> dict:
    """The self-description stored in every fklip checkpoint."""

    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": spec.name,
        "model_config": json.loads(json.dumps(spec.config)),
        "activation": spec.activation,
        "truncation": spec.truncation,
        "fklip_version": __version__,
        "torch_version": str(torch.__version__),
        "open_clip_version": str(open_clip.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(path: str | os.PathLike, model, spec: ModelSpec, *, epoch: int = 0,
                    name: str | None = None, extra: dict | None = None) -> None:
    """Write an fklip checkpoint atomically.

    It also carries the original's `epoch` and `state_dict` (keys prefixed `module.`, as the
    original's DDP checkpoints), so the original's scripts can read it too.
    """

    state_dict = {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"fklip": checkpoint_meta(spec), "epoch": int(epoch), "name": name or spec.name,
           "state_dict": state_dict, **(extra or {})}
    with atomic_output(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) this way

            free = shutil.disk_usage(Path(path).parent).free
            raise OutputError(f"cannot write {path}: {str(e).strip()[:160]} ({free / 2**20:.1f} MiB free "
                              "there); the earlier checkpoints are as they were") from None
