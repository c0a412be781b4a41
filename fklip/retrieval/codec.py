"""The int64 keys both top-k paths select and merge (fklip.retrieval.chunked, fklip.retrieval.fused).

A key packs a float32 score and a gallery index as order-preserving score bits << 32 | inverted
index, so a larger key is a better hit under the tie rule (score descending, then the lower index)
and no two keys of one row are equal: merging running top-k sets is one `torch.topk` with a single
correct answer. -0.0 and +0.0 are one score, encoded (and decoded) as +0.0.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW32 = 0xFFFFFFFF  # the low half of a key holds LOW32 - index, so a lower index is a larger key
_SHIFT = 1 << 32
NO_KEY = torch.iinfo(torch.int64).min  # below every key (keys are > -2**31 * _SHIFT)


def keys_from(values: Tensor, indices: Tensor) -> Tensor:
    """Pack float32 scores and int64 gallery indices into int64 keys ordered like
    (score descending, index ascending): a larger key is a better hit, and no two keys are equal."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    # Negative floats sort backwards as ints: flip their 31 magnitude bits to make the map monotone.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # within int32 range
    return ordered * _SHIFT + (LOW32 - indices)


def decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `keys_from`: (values float32, indices int64)."""
    ordered = torch.div(keys, _SHIFT, rounding_mode="floor")  # floor keeps the low half >= 0
    indices = LOW32 - (keys - ordered * _SHIFT)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32), indices


def merge(best: Tensor | None, keys: Tensor, k: int) -> Tensor:
    """The k largest of two key sets per row, best first. Keys are unique, so topk has exactly
    one answer, already sorted."""
    if best is not None:
        keys = torch.cat([best, keys], dim=1)  # (q, <= 2k)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1).values
