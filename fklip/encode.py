"""Plain PyTorch feature encoding in batches: the reference path that faster engines are held to."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fklip.data.archive import ImageArchive, model_input_from_batch
from fklip.model import Tokenizer


@torch.no_grad()
def encode_archive(model, archive: ImageArchive, batch_size: int = 256, device: str = "cpu",
                   image_ids: Sequence | None = None, progress: bool = False) -> torch.Tensor:
    """L2-normalised image features (N, D) float32, in archive order (or `image_ids` order)."""
    from tqdm import tqdm

    ids = list(archive.ids if image_ids is None else image_ids)
    out = []
    bar = tqdm(total=len(ids), desc="encode images", unit="img", disable=not progress)
    for _, batch in archive.iter_batches(batch_size, ids):
        x = model_input_from_batch(batch, archive.encoding, device=device)  # (B, 3, H, W)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """L2-normalised text features (N, D) float32, in the order given."""
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(texts), desc="encode texts", unit="text", disable=not progress)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        tokens = tokenizer(chunk).to(device)  # (B, context_length)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)
