"""ONNX graphs from export-ready towers, and the structural checks every graph must pass."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from export.specs import TowerSpec, random_inputs
from export.towers import Fp32LayerNorm
from fklip.errors import FklipError, MissingDependencyError, raise_collected

logger = logging.getLogger(__name__)

OPSET = 17  # the first opset with LayerNormalization


class ExportError(FklipError):
    """An export failed a check (graph structure, parity); nothing was written."""


def require_onnx():
    """(onnx, onnxruntime), or one line saying which extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export and the onnx engine need onnx and onnxruntime "
                                     f"({e.name} is missing): pip install \"fklip[onnx]\"") from None
    return onnx, onnxruntime


def onnx_from_tower(tower: torch.nn.Module, spec: TowerSpec, path: Path, opset: int = OPSET) -> dict:
    """Export one tower to `path`; returns {"export_s", "opset"}. The graph is checked after."""
    dummy = torch.from_numpy(random_inputs(spec, batch=2, seed=1, length=spec.max_length))
    started = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about the TorchScript path
        torch.onnx.export(tower, (dummy,), str(path), opset_version=opset, dynamo=False,
                          input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    took = time.perf_counter() - started
    logger.info("exported the %s tower to %s in %.1f s", spec.tower, path, took)
    check_graph(path, spec, expected_layernorms=count_layernorms(tower))
    return {"export_s": round(took, 3), "opset": opset}


def count_layernorms(tower: torch.nn.Module) -> int:

    return sum(isinstance(m, Fp32LayerNorm) for m in tower.modules())


_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int32": 6, "int64": 7, "float16": 10, "bfloat16": 16}


def check_graph(path: Path, spec: TowerSpec, expected_layernorms: int | None = None) -> None:
    """The structure the issue asks for, every failure collected: the ONNX checker, the opset,
    LayerNormalization nodes (one per LayerNorm, computed in fp32), IO names, dtypes and named
    dynamic axes as the spec says."""
    onnx, _ = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        problems.append(f"ONNX checker: {str(e).splitlines()[0]}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < OPSET:
        problems.append(f"opset {opset} < {OPSET}")
    graph = model.graph
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    if expected_layernorms is not None and len(norms) != expected_layernorms:
        problems.append(f"{len(norms)} LayerNormalization nodes, expected {expected_layernorms}")
    if any(n.op_type == "ReduceMean" for n in graph.node) and not norms:
        problems.append("LayerNorm was decomposed into ReduceMean nodes")
    # what TensorRT's ONNX parser refuses: If nodes (their branches here differ in rank) and
    # uint8 tensors anywhere but a network input cast straight away
    ifs = [n.name or n.op_type for n in graph.node if n.op_type == "If"]
    if ifs:
        problems.append(f"{len(ifs)} If node(s) ({', '.join(ifs[:3])}): a data-dependent "
                        f"branch that TensorRT would build as a conditional")
    uint8_inputs = {t.name for t in graph.input if t.type.tensor_type.elem_type == _ONNX_DTYPES["uint8"]}
    for n in graph.node:
        if uint8_inputs & set(n.input) and n.op_type != "Cast":
            problems.append(f"uint8 input {min(uint8_inputs & set(n.input))!r} feeds a "
                            f"{n.op_type} node; TensorRT takes uint8 only into a Cast")
    for tensors, expected in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
        actual = {t.name: t for t in tensors}
        for want in expected:
            t = actual.get(want.name)
            if t is None:
                problems.append(f"no graph IO named {want.name!r} (has {sorted(actual)})")
                continue
            if t.type.tensor_type.elem_type != _ONNX_DTYPES[want.dtype]:
                problems.append(f"{want.name}: element type {t.type.tensor_type.elem_type}, "
                                f"expected {want.dtype}")
            dims = tuple(d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim)
            if dims != tuple(want.shape):
                problems.append(f"{want.name}: shape {list(dims)}, expected {list(want.shape)}")
    raise_collected(problems, f"{path}: the exported {spec.tower} graph is not as expected", ExportError)


class ProviderError(FklipError):
    """onnxruntime would not run a graph on the execution provider that was asked for."""


def ort_session(path: Path, threads: int | None = None, provider: str = "CPUExecutionProvider",
                provider_options: dict | None = None):
    """An onnxruntime session with full graph optimisation on `provider`, or an error: a provider
    this onnxruntime lacks, or one it would drop for another (onnxruntime-gpu drops CUDA when its
    libraries do not load), is never silently replaced by the CPU."""
    _, ort = require_onnx()
    available = ort.get_available_providers()
    if provider not in available:
        raise MissingDependencyError(
            f"this onnxruntime ({ort.__version__}) has no {provider} (it has {', '.join(available)}); "
            "for CUDA install onnxruntime-gpu in its place: pip uninstall onnxruntime && "
            "pip install \"fklip[gpu]\"")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=[(provider, provider_options or {})])
    # run(): onnxruntime's default on an execution-provider failure (EPFail) is to print a line,
    # rebuild the session on the CPU and carry on there for good; fklip raises instead
    session.disable_fallback()
    used = session.get_providers()
    if not used or used[0] != provider:
        raise ProviderError(f"{path}: onnxruntime would run on {', '.join(used) or 'nothing'} instead of "
                            f"{provider} {provider_options or ''}; for CUDA check that the CUDA and cuDNN "
                            "libraries onnxruntime-gpu was built for are installed")
    return session


def run_session(session, name: str, x: np.ndarray) -> np.ndarray:
    return session.run(None, {name: x})[0]
