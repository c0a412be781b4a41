"""`manifest.json`: what an export folder holds, how it was made, and what it was measured to meet."""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fklip-export"
MANIFEST_VERSION = 1


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """{"file": name, "sha256", "bytes"} for a file inside the export folder."""
    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def library_versions() -> dict:
    """Versions of everything that shaped the graphs (tensorrt only when it is installed)."""
    import importlib.metadata as md

    import numpy
    import onnx
    import onnxruntime
    import open_clip
    import torch

    from fklip import __version__

    versions = {"fklip": __version__, "torch": str(torch.__version__), "open_clip": str(open_clip.__version__),
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                "python": platform.python_version()}
    try:
        versions["tensorrt"] = md.version("tensorrt")
    except md.PackageNotFoundError:
        pass
    return versions


def build_manifest(*, model: dict, precision: str, uint8_input: bool, opset: int, profile: dict,
                   source: dict, towers: dict, int8: dict | None, trt: dict | None) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "precision": precision,
        "uint8_input": uint8_input,
        "opset": opset,
        "profile": profile,
        "towers": towers,
        "int8": int8,
        "trt": trt,
        "source": source,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }
