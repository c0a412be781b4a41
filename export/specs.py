"""Declarative per-tower export specs: IO names, named dynamic axes, dummy inputs, tolerances.

One `TowerSpec` per tower drives the ONNX export (names and dynamic axes), the parity check
(dummy inputs and the tolerance of the precision) and the TensorRT profiles (the batch axis,
and the text length axis). Nothing here imports onnx, onnxruntime or tensorrt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fklip.errors import ConfigError

ID_DTYPES = ("int32", "int64")

# The CLIP BPE tokenizer's special tokens (open_clip's SimpleTokenizer).
SOT_TOKEN, EOT_TOKEN = 49406, 49407


@dataclass(frozen=True)
class Tolerance:
    """What an exported graph must meet against the fp32 PyTorch model, per sample."""

    min_cosine: float  # every sample's cosine to the PyTorch embedding at least this
    max_abs: float  # every element's absolute difference at most this

    def as_dict(self) -> dict:
        return {"min_cosine": self.min_cosine, "max_abs": self.max_abs}


# Embeddings are L2-normalised, so elements are O(1/sqrt(D)); these bound the damage that
# the precision may do. fp16/bf16 keep LayerNorm, softmax and the final norm in fp32.
TOLERANCES = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-4),
    "fp16": Tolerance(min_cosine=0.999, max_abs=2e-2),
    "bf16": Tolerance(min_cosine=0.99, max_abs=6e-2),
    "int8": Tolerance(min_cosine=0.995, max_abs=0.05),
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` entries are ints or the names of dynamic axes."""

    name: str
    dtype: str
    shape: tuple

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class FirstInputOutput:
    """`input` and `output`: the first of a tower's `inputs` and `outputs` (each has one)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]


@dataclass(frozen=True)
class TowerSpec(FirstInputOutput):
    """One exported tower: its graph file, inputs, outputs, and how to make inputs for it."""

    tower: str  # "image" | "text"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_axis: str
    max_length: int | None = None  # text: the context length (the length axis' upper bound)

    @property
    def file_name(self) -> str:
        return f"{self.tower}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`: every input and output, with its named axes."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs}

    def concrete_shape(self, batch: int, length: int | None = None) -> tuple[int, ...]:
        """The input shape for a batch (and, for text, a sequence length)."""
        shape = []
        for d in self.input.shape:
            if d == self.batch_axis:
                shape.append(batch)
            elif isinstance(d, str):
                shape.append(self.max_length if length is None else length)
            else:
                shape.append(d)
        return tuple(shape)

    def as_dict(self) -> dict:
        return {"inputs": [t.as_dict() for t in self.inputs],
                "outputs": [t.as_dict() for t in self.outputs], "batch_axis": self.batch_axis}


def image_tower_spec(image_size: int, embed_dim: int, uint8_input: bool = False) -> TowerSpec:
    """float32 (B, 3, H, W) CLIP-normalised pixels, or uint8 (B, H, W, 3) raw pixels."""
    if uint8_input:
        pixels = TensorSpec("pixels", "uint8", ("image_batch", image_size, image_size, 3))
    else:
        pixels = TensorSpec("pixels", "float32", ("image_batch", 3, image_size, image_size))
    emb = TensorSpec("image_emb", "float32", ("image_batch", embed_dim))
    return TowerSpec("image", (pixels,), (emb,), batch_axis="image_batch")


def text_tower_spec(context_length: int, embed_dim: int, ids_dtype: str = "int32") -> TowerSpec:
    """Token ids (B, L), L <= context length (runners cut batches after their last end token)."""
    if ids_dtype not in ID_DTYPES:
        raise ConfigError(f"--ids-dtype: expected one of {', '.join(ID_DTYPES)}, got {ids_dtype!r}")
    ids = TensorSpec("text_ids", ids_dtype, ("text_batch", "text_length"))
    emb = TensorSpec("text_emb", "float32", ("text_batch", embed_dim))
    return TowerSpec("text", (ids,), (emb,), batch_axis="text_batch", max_length=context_length)


TOWERS = {"image": image_tower_spec, "text": text_tower_spec}


def random_inputs(spec: TowerSpec, batch: int, seed: int = 0, length: int | None = None) -> np.ndarray:
    """Deterministic random inputs for a tower.

    Images: CLIP-normalised values (roughly N(0, 1)) or uniform uint8 pixels. Texts: a start
    token, random word ids, an end token at a random position (the pooling position, so it must
    be the largest id), zeros after; the last sample uses the whole length so the batch spans it.
    """
    rng = np.random.default_rng(seed)
    shape = spec.concrete_shape(batch, length)
    if spec.tower == "image":
        if spec.input.dtype == "uint8":
            return rng.integers(0, 256, size=shape, dtype=np.uint8)
        return rng.standard_normal(shape).astype(np.float32)
    length = shape[1]
    ids = np.zeros(shape, dtype=np.int64)
    for row in range(batch):
        end = length - 1 if row == batch - 1 else int(rng.integers(1, length))
        ids[row, 0] = SOT_TOKEN
        ids[row, 1:end] = rng.integers(1, SOT_TOKEN, size=end - 1)
        ids[row, end] = EOT_TOKEN
    return ids.astype(spec.input.dtype)
