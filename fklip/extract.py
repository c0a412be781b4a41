"""`fklip extract`: image and text features in the original's files (spec 1.7), or as .npy."""

from __future__ import annotations

import logging
from pathlib import Path

from fklip.config import ExtractConfig, check_device

logger = logging.getLogger(__name__)


def default_output(data_path: Path, kind: str, fmt: str) -> Path:
    """The original's default names: the image path minus 4 characters + `.img_feat.jsonl`, the
    text path minus 6 characters + `.txt_feat.jsonl` (`.npy` for the npy form)."""
    ext = "jsonl" if fmt == "jsonl" else "npy"
    if kind == "image":
        return Path(str(data_path)[:-4] + f".img_feat.{ext}")
    return Path(str(data_path)[:-6] + f".txt_feat.{ext}")


def run_extract(cfg: ExtractConfig, make_encoder=None) -> list[dict]:
    """Encode what the config asks for and write it; returns one summary dict per output.

    `make_encoder(encode_config, device)` gives what runs the model (fklip.encode.TorchEncoder's
    interface, the default); the CLI passes the engines' for `--engine`."""
    from fklip.data.archive import ImageArchive
    from fklip.data.jsonl import read_text_queries
    from fklip.encode import TorchEncoder
    from fklip.features import write_features

    device = check_device(cfg.encode.device)
    # read and check every input before the slow work, so a bad file fails at once
    queries = None
    if cfg.text_data is not None:
        queries = read_text_queries(cfg.text_data)  # refuses repeated query_ids
    written = []
    with (make_encoder or TorchEncoder)(cfg.encode, device) as enc:
        if cfg.image_data is not None:
            out = cfg.image_output or default_output(cfg.image_data, "image", cfg.fmt)
            with ImageArchive(cfg.image_data) as archive:
                archive.check_image_size(enc.image_size, enc.model_name)
                feats = enc.encode_images(archive, progress=True)
                files = write_features(out, list(archive.ids), feats, id_field="image_id", fmt=cfg.fmt,
                                       dtype=cfg.dtype)
            written.append({"kind": "image", "count": len(feats), "files": [str(f) for f in files]})
        if queries is not None:
            out = cfg.text_output or default_output(cfg.text_data, "text", cfg.fmt)
            feats = enc.encode_texts([q.query_text for q in queries], progress=True)
            files = write_features(out, [q.query_id for q in queries], feats, id_field="query_id",
                                   fmt=cfg.fmt, dtype=cfg.dtype)
            written.append({"kind": "text", "count": len(feats), "files": [str(f) for f in files]})
    return written
