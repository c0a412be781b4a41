"""The `--trt` step of `fklip export`: TensorRT engines for a staged export, each checked against
the PyTorch model it came from.

    manifest = run_export(cfg, build_engines=build_trt_engines)  # with cfg.trt

The engines are built by the TensorRT runner from the export's manifest and ONNX graphs, as
`fklip eval --engine trt` would build them, inside the staging folder of `run_export`, so a
failed build or check leaves nothing behind.
"""

from __future__ import annotations

from engines.trt_runner import TrtRunner
from export.manifest import TOWER_NAMES, EngineEntry, TrtBlock, sha256_of
from export.onnx_export import ExportError
from export.parity import check_tower
from export.pipeline import StagedExport
from export.specs import TOLERANCES
from fklip.config import EncodeConfig
from fklip.errors import raise_collected


def build_trt_engines(staged: StagedExport) -> TrtBlock:
    """Build (or reuse) the engine of each tower in `staged.folder` and check it against the fp32
    PyTorch model at the export's tolerance; the manifest's "trt" block, or ExportError."""
    manifest, folder = staged.manifest, staged.folder
    tolerance = TOLERANCES[manifest.precision]
    entries, problems = {}, []
    with TrtRunner(EncodeConfig(engine="trt", engine_dir=folder)) as runner:
        runs = {"image": runner.encode_images, "text": runner.encode_texts}
        for name in TOWER_NAMES:
            report, failed = check_tower(runs[name], staged.model, manifest.spec(name), staged.real[name], tolerance)
            problems += [f"{name} engine: {p}" for p in failed]
            plan = runner.plans[name]
            entries[name] = EngineEntry(file=str(plan.relative_to(folder)), key=runner.engine_keys[name],
                                        sha256=sha256_of(plan), parity=report)
    raise_collected(problems, "--trt: engines are outside tolerance; nothing was written", ExportError)
    return TrtBlock(device=staged.device, **entries)
