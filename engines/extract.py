"""`fklip extract`: image and text features in the original's files (spec 1.7), or as .npy."""

from __future__ import annotations

import logging
from pathlib import Path

from engines.encoder import EngineEncoder, encoder_inputs
from fklip.config import ExtractConfig, check_device
from fklip.data.archive import ImageArchive
from fklip.data.features import npy_ids_path, write_features
from fklip.data.jsonl import read_text_queries
from fklip.io import OutputSet, check_outputs

logger = logging.getLogger(__name__)


def default_output(data_path: Path, kind: str, fmt: str) -> Path:
    """The original's default names: the image path minus 4 characters + `.img_feat.jsonl`, the
    text path minus 6 characters + `.txt_feat.jsonl` (`.npy` for the npy form)."""
    ext = "jsonl" if fmt == "jsonl" else "npy"
    if kind == "image":
        return Path(str(data_path)[:-4] + f".img_feat.{ext}")
    return Path(str(data_path)[:-6] + f".txt_feat.{ext}")


def output_paths(cfg: ExtractConfig) -> dict[str, Path]:
    """Every file extract writes (flag -> path): the feature files, and the ids files of `.npy`."""
    outputs = {}
    for kind, data, given, flag in (("image", cfg.image_data, cfg.image_output, "--image-feat-output-path"),
                                    ("text", cfg.text_data, cfg.text_output, "--text-feat-output-path")):
        if data is None:
            continue
        out = given or default_output(data, kind, cfg.fmt)
        outputs[flag] = out
        if cfg.fmt == "npy":
            outputs[f"{flag} (its ids file)"] = npy_ids_path(out)
    return outputs


def run_extract(cfg: ExtractConfig) -> list[dict]:
    """Encode what the config asks for with the engine it names and write it; returns one summary
    dict per output. The outputs are checked against the inputs before any work and appear
    together at the end, or not at all."""
    device = check_device(cfg.encode.device)
    outputs = output_paths(cfg)
    check_outputs(outputs, {"--image-data": cfg.image_data, "--text-data": cfg.text_data,
                            **encoder_inputs(cfg.encode)}, overwrite=cfg.overwrite)
    # read and check every input before the slow work, so a bad file fails at once
    queries = None
    if cfg.text_data is not None:
        queries = read_text_queries(cfg.text_data)  # refuses repeated query_ids
    written = []
    with OutputSet(outputs.values()) as staged, EngineEncoder(cfg.encode, device) as enc:
        if cfg.image_data is not None:
            out = outputs["--image-feat-output-path"]
            with ImageArchive(cfg.image_data) as archive:
                archive.check_image_size(enc.image_size, enc.model_name)
                feats = enc.encode_images(archive, progress=True)
                ids = list(archive.ids)
            _write(staged, out, ids, feats, "image_id", cfg)
            written.append({"kind": "image", "count": len(feats), "files": _shown(out, cfg.fmt)})
        if queries is not None:
            out = outputs["--text-feat-output-path"]
            feats = enc.encode_texts([q.query_text for q in queries], progress=True)
            _write(staged, out, [q.query_id for q in queries], feats, "query_id", cfg)
            written.append({"kind": "text", "count": len(feats), "files": _shown(out, cfg.fmt)})
    return written


def _write(staged: OutputSet, out: Path, ids, feats, id_field: str, cfg: ExtractConfig) -> None:
    write_features(out, ids, feats, id_field=id_field, fmt=cfg.fmt, dtype=cfg.dtype, staged=staged)


def _shown(out: Path, fmt: str) -> list[str]:
    return [str(out)] + ([str(npy_ids_path(out))] if fmt == "npy" else [])
