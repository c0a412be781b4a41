"""TensorRT engines from the exported ONNX graphs, cached per GPU, TensorRT version and profile.

The builder is used the TensorRT 10/11 way: a strongly typed network (TensorRT 11 builds no
other kind; the fp16/bf16 graphs carry their own casts, so no precision flags are set), the
ONNX parser reading the file (external weights resolve beside it), one optimisation profile
from `ShapeRange`s, a timing cache per GPU and TensorRT version in an export folder, and
`build_serialized_network`. Engines are not portable across GPUs or TensorRT versions, so each
lives under a key naming both:

    <export folder>/engines/timing-<gpu>-sm<cc>-trt<version>.cache
    <export folder>/engines/<key>/<tower>.plan
    <export folder>/engines/<key>/engine.json   # the key's parts, the plan's size, the build report

The key computation, the layout and the reuse decision are pure functions; only
`engine_from_onnx` (and `require_tensorrt`, `device_facts`) touch TensorRT or CUDA, and they
import them inside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from export.profiles import ShapeRange, profiles_as_dict
from fklip.errors import (
    ConfigError,
    DataError,
    FklipError,
    MissingDependencyError,
    NotAvailableError,
    raise_collected,
)
from fklip.io import atomic_output, write_json

logger = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINE_RECORD = "engine.json"
MIN_TRT_MAJOR = 10
# The engine.json fields that must equal the current ones for an engine to be reused.
KEY_FIELDS = ("key", "tower", "gpu_name", "compute_capability", "trt_version", "precision",
              "profiles", "onnx_sha256")
FACT_FIELDS = ("gpu_name", "compute_capability", "trt_version")


# ---- Pure: keys, layout, the reuse decision ---------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.") or "unknown"


def engine_cache_key(gpu_name: str, compute_capability: str, trt_version: str, precision: str,
                     profiles: dict[str, ShapeRange], onnx_sha256: str) -> str:
    """A readable, deterministic folder name, e.g. `nvidia-h100-80gb-hbm3-sm90-trt10.9.0.34-fp16-1a2b3c4d5e6f`.

    The trailing hash covers every part verbatim (the profiles and the graph's sha256 too), so
    the key differs whenever any part does, even where two slugs would coincide.
    """
    parts = {"gpu_name": gpu_name, "compute_capability": compute_capability,
             "trt_version": trt_version, "precision": precision,
             "profiles": profiles_as_dict(profiles), "onnx_sha256": onnx_sha256}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return "-".join([_device_slug(gpu_name, compute_capability, trt_version), _slug(precision), digest])


def _device_slug(gpu_name: str, compute_capability: str, trt_version: str) -> str:
    """What an engine or a timing cache is tied to, readable: `nvidia-h100-80gb-hbm3-sm90-trt10.9.0.34`."""
    sm = "sm" + re.sub(r"[^0-9]", "", str(compute_capability))
    return "-".join([_slug(gpu_name), sm, "trt" + _slug(trt_version)])


def engine_record(tower: str, precision: str, profiles: dict[str, ShapeRange], onnx_sha256: str,
                  facts: dict) -> dict:
    """The identifying fields of an engine (KEY_FIELDS), as engine.json records them."""
    missing = [f for f in FACT_FIELDS if f not in facts]
    if missing:
        raise ValueError(f"device facts lack {', '.join(missing)}; got {sorted(facts)}")
    key = engine_cache_key(facts["gpu_name"], facts["compute_capability"], facts["trt_version"],
                           precision, profiles, onnx_sha256)
    return {"key": key, "tower": tower, "gpu_name": facts["gpu_name"],
            "compute_capability": facts["compute_capability"], "trt_version": facts["trt_version"],
            "precision": precision, "profiles": profiles_as_dict(profiles), "onnx_sha256": onnx_sha256}


def engine_paths(engine_dir: str | os.PathLike, key: str, tower: str) -> tuple[Path, Path]:
    """(the plan, its engine.json) for one tower under one key."""
    folder = Path(engine_dir) / ENGINES_DIR / key
    return folder / f"{tower}.plan", folder / ENGINE_RECORD


def timing_cache_path(engine_dir: str | os.PathLike, facts: dict) -> Path:
    """The timing cache that the builds in an export folder share on one kind of GPU and one
    TensorRT version: TensorRT refuses a cache from another device, so one file for all would
    be thrown away and overwritten each time the folder moves between two GPUs."""
    slug = _device_slug(facts["gpu_name"], facts["compute_capability"], facts["trt_version"])
    return Path(engine_dir) / ENGINES_DIR / f"timing-{slug}.cache"


def rebuild_reason(plan_path: Path, record_path: Path, expected: dict) -> str | None:
    """Why the engine at `plan_path` cannot be used for `expected` (an `engine_record`), or None."""
    if not plan_path.is_file():
        return f"no engine at {plan_path}"
    if not record_path.is_file():
        return f"no {record_path.name} beside {plan_path}"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{record_path} is unreadable ({e})"
    if not isinstance(record, dict):
        return f"{record_path} is not a JSON object"
    changed = [f for f in KEY_FIELDS if record.get(f) != expected.get(f)]
    if changed:
        return f"{record_path} records a different {', '.join(changed)}"
    if record.get("plan_bytes") != plan_path.stat().st_size:
        return f"{plan_path} is {plan_path.stat().st_size} bytes, {record_path.name} says {record.get('plan_bytes')}"
    return None


def format_build_config(summary: dict) -> str:
    """Polygraphy-style `title | value` lines for a builder configuration summary."""
    lines = []
    for title, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(str(v) for v in value) + "]"
        lines.append(f"    {title:22} | {value}")
    return "\n".join(lines)


# ---- TensorRT and CUDA ------------------------------------------------------------------------

def _major(version: str) -> int:
    match = re.match(r"\d+", str(version))
    return int(match.group()) if match else 0


def require_tensorrt():
    """The `tensorrt` module; MissingDependencyError (one line, naming the extra) without it."""
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        if e.name not in (None, "tensorrt"):  # installed, but one of its own modules is missing
            raise MissingDependencyError(f"tensorrt is installed but does not import ({e}); "
                                         f'reinstall it: pip install --force-reinstall "fklip[trt]"') from e
        raise MissingDependencyError(
            'the TensorRT backend needs tensorrt: pip install "fklip[trt]" (needs a CUDA GPU and '
            "NVIDIA's wheels; if pip finds none, add --extra-index-url https://pypi.nvidia.com)") from e
    except ImportError as e:  # e.g. libnvinfer.so.N not found
        raise MissingDependencyError(f"tensorrt is installed but does not load ({e}); "
                                     f'reinstall it: pip install --force-reinstall "fklip[trt]"') from e
    if _major(tensorrt.__version__) < MIN_TRT_MAJOR:
        raise MissingDependencyError(f"fklip needs TensorRT >= {MIN_TRT_MAJOR}, found "
                                     f'{tensorrt.__version__}: pip install -U "fklip[trt]"')
    return tensorrt


def device_facts(device: str | None = None, trt=None) -> dict:
    """What an engine is specific to: GPU name, compute capability ("9.0"), TensorRT version;
    with the CUDA version torch was built with, for the record."""

    if not torch.cuda.is_available():
        raise NotAvailableError("--trt needs a CUDA GPU; torch.cuda.is_available() is False")
    index = torch.device(device).index if device else None
    index = torch.cuda.current_device() if index is None else index
    trt = require_tensorrt() if trt is None else trt
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "trt_version": trt.__version__, "cuda": torch.version.cuda, "device_index": index}


_TRT_LOGGERS: dict = {}  # log name -> its trt.ILogger (one per process: TensorRT keeps the first)


def trt_logger(trt, log: logging.Logger = logger):
    """A `trt.ILogger` that forwards TensorRT's messages to `log` (INFO and VERBOSE as debug).

    One instance per `log`, reused: TensorRT warns when builders and runtimes get different loggers.
    """
    if log.name in _TRT_LOGGERS:
        return _TRT_LOGGERS[log.name]
    levels = {trt.Logger.INTERNAL_ERROR: logging.ERROR, trt.Logger.ERROR: logging.ERROR,
              trt.Logger.WARNING: logging.WARNING, trt.Logger.INFO: logging.DEBUG,
              trt.Logger.VERBOSE: logging.DEBUG - 5}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = levels.get(severity, logging.DEBUG)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

    _TRT_LOGGERS[log.name] = _Logger()
    return _TRT_LOGGERS[log.name]


def _enum_name(value) -> str:
    return getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]


def _create_network(trt, builder):
    """An empty strongly typed network. TensorRT 10 needs the flag; 11 is always strongly typed
    (the flag is deprecated and ignored there, so it is not passed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None and _major(trt.__version__) < 11:
        return builder.create_network(1 << int(flag))
    return builder.create_network()


def _parser_error_text(error) -> str:
    desc = error.desc() if hasattr(error, "desc") else str(error)
    node = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    return f"node {node!r} ({op}): {desc}" if node else desc


def _check_profiles(network, profiles: dict[str, ShapeRange], onnx_path: Path) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    problems = [f"input {name!r} has no shape range (ranges given for {sorted(profiles)})"
                for name in inputs if name not in profiles]
    problems += [f"a shape range names {name!r}, which is not an input (inputs: {sorted(inputs)})"
                 for name in profiles if name not in inputs]
    for name, shape in inputs.items():
        r = profiles.get(name)
        if r is None:
            continue
        if len(shape) != len(r.min):
            problems.append(f"input {name!r} has rank {len(shape)}, its shape range rank {len(r.min)}")
            continue
        fixed = [(axis, d) for axis, d in enumerate(shape) if d >= 0]
        bad = [axis for axis, d in fixed if not r.min[axis] == r.opt[axis] == r.max[axis] == d]
        if bad:
            problems.append(f"input {name!r} has shape {list(shape)}: its range {r.as_dict()} "
                            f"differs on the fixed axes {bad}")
    raise_collected(problems, f"{onnx_path}: optimisation profile", error=ConfigError)


def _config_summary(trt, config, network, profiles: dict[str, ShapeRange], cache_note: str) -> dict:
    """What the builder will do, for the log and the build report. Each entry is best effort:
    an attribute that a TensorRT version lacks is reported as None rather than failing the build."""
    def attempt(read):
        try:
            return read()
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return None

    def io(tensors):
        return [f"{t.name}: {_enum_name(t.dtype)} {list(t.shape)}" for t in tensors]

    def strongly_typed():
        if _major(trt.__version__) >= 11:
            return True
        return bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    return {
        "TensorRT": trt.__version__,
        "Strongly typed": attempt(strongly_typed),
        "Flags": attempt(lambda: [name for name, flag in trt.BuilderFlag.__members__.items()
                                  if config.get_flag(flag)]),
        "Memory pools (MiB)": attempt(lambda: {
            name: round(config.get_memory_pool_limit(pool) / (1 << 20), 2)
            for name, pool in trt.MemoryPoolType.__members__.items() if not name.startswith("DLA")}),
        "Optimization level": attempt(lambda: config.builder_optimization_level),
        "Profiling verbosity": attempt(lambda: _enum_name(config.profiling_verbosity)),
        "Timing cache": cache_note,
        "Inputs": attempt(lambda: io(network.get_input(i) for i in range(network.num_inputs))),
        "Outputs": attempt(lambda: io(network.get_output(i) for i in range(network.num_outputs))),
        "Profile": {name: f"min={list(r.min)} opt={list(r.opt)} max={list(r.max)}"
                    for name, r in sorted(profiles.items())},
    }


def _attach_timing_cache(config, path: Path, log: logging.Logger):
    """Load the timing cache at `path` into `config` (a new one if absent or unusable)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is not None and config.set_timing_cache(cache, False):
        return cache, f"{path} (loaded, {len(data)} bytes)"
    if data:
        log.warning("%s: timing cache from another GPU or TensorRT version, or damaged; starting a new one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache, f"{path} (new)"


def engine_from_onnx(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                     profiles: dict[str, ShapeRange], timing_cache_path: str | os.PathLike,
                     workspace_bytes: int | None = None, log: logging.Logger = logger,
                     tf32: bool = False) -> dict:
    """Build a TensorRT engine from an ONNX graph and write it atomically to `engine_path`.

    The network is strongly typed (precision comes from the graph); `tf32` lets TensorRT use
    TF32 for the graph's fp32 matmuls (off: the fp32 engines must match PyTorch to 1e-4). The
    timing cache at `timing_cache_path` is loaded if present and saved back after the build.
    Returns the build report: seconds, TensorRT version, builder configuration, profile.
    """
    trt = require_tensorrt()
    onnx_path, engine_path, cache_path = Path(onnx_path), Path(engine_path), Path(timing_cache_path)
    if not onnx_path.is_file():
        present = sorted(p.name for p in onnx_path.parent.glob("*.onnx")) if onnx_path.parent.is_dir() else []
        raise DataError(f"{onnx_path}: no such ONNX file (ONNX files there: {present or 'none'})")
    trt_log = trt_logger(trt)  # TensorRT's own messages; `log` gets fklip's
    builder = trt.Builder(trt_log)
    network = _create_network(trt, builder)
    parser = trt.OnnxParser(network, trt_log)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    if not parsed or errors:
        raise_collected(errors or ["the parser failed without saying why; is it an ONNX file?"],
                        f"{onnx_path}: TensorRT's ONNX parser failed", error=DataError)
    _check_profiles(network, profiles, onnx_path)

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None and tf32:
        config.set_flag(tf32_flag)
    elif tf32_flag is not None:
        config.clear_flag(tf32_flag)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names and tactics, for inspection
    profile = builder.create_optimization_profile()
    for name, r in profiles.items():
        profile.set_shape(name, r.min, r.opt, r.max)
    if config.add_optimization_profile(profile) < 0:
        raise ConfigError(f"{onnx_path}: TensorRT rejected the optimisation profile {profiles_as_dict(profiles)}")
    cache, cache_note = _attach_timing_cache(config, cache_path, log)

    summary = _config_summary(trt, config, network, profiles, cache_note)
    log.info("Building a TensorRT engine from %s\n%s", onnx_path, format_build_config(summary))
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise FklipError(f"{onnx_path}: TensorRT could not build an engine (its errors are logged above); "
                         f"check the GPU's free memory and the profile {profiles_as_dict(profiles)}")
    with atomic_output(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(plan)
    cache = config.get_timing_cache() or cache  # holds the timings of this build too
    with atomic_output(cache_path) as tmp, open(tmp, "wb") as f:
        f.write(cache.serialize())
    engine_bytes = engine_path.stat().st_size
    log.info("Built %s in %.1f s (%.1f MiB); timing cache saved to %s",
             engine_path, seconds, engine_bytes / (1 << 20), cache_path)
    return {"onnx": str(onnx_path), "engine": str(engine_path), "engine_bytes": engine_bytes,
            "build_seconds": round(seconds, 3), "tensorrt_version": trt.__version__,
            "builder_config": summary, "profiles": profiles_as_dict(profiles)}


def load_or_build_engine(engine_dir: str | os.PathLike, tower: str, onnx_path: str | os.PathLike,
                         onnx_sha256: str, precision: str, profiles: dict[str, ShapeRange],
                         facts: dict, workspace_bytes: int | None = None,
                         log: logging.Logger = logger) -> tuple[Path, str, bool]:
    """(plan path, key, built): the cached engine for these facts, or a new one built from the graph.

    An engine is reused only when its engine.json records exactly the current key parts and
    plan size; otherwise it is rebuilt under the current key (other keys' engines stay).
    """
    expected = engine_record(tower, precision, profiles, onnx_sha256, facts)
    key = expected["key"]
    plan_path, record_path = engine_paths(engine_dir, key, tower)
    reason = rebuild_reason(plan_path, record_path, expected)
    if reason is None:
        log.info("Using the cached %s engine %s", tower, plan_path)
        return plan_path, key, False
    with _build_lock(plan_path.with_name(f".{tower}.lock"), log):
        reason = rebuild_reason(plan_path, record_path, expected)
        if reason is None:  # another process built it while this one waited
            log.info("Using the %s engine %s that another process built", tower, plan_path)
            return plan_path, key, False
        log.info("Building the %s engine: %s", tower, reason)
        record_path.unlink(missing_ok=True)  # a plan without its record is never reused
        report = engine_from_onnx(onnx_path, plan_path, profiles, timing_cache_path(engine_dir, facts),
                                  workspace_bytes=workspace_bytes, log=log)
        write_json(record_path, {**expected, "plan": plan_path.name, "plan_bytes": plan_path.stat().st_size,
                                 "cuda": facts.get("cuda"), "build": report})
    return plan_path, key, True


@contextlib.contextmanager
def _build_lock(path: Path, log: logging.Logger):
    """An exclusive lock on `path` for one engine's build, so that processes wanting the same
    engine at once (ranks under torchrun, on a shared export folder) build it once. The lock
    goes with the process, however it ends. Without fcntl (Windows) builds are not serialised;
    the atomic writes still keep every file whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another process building the engine (lock %s)", path)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (NFS without lockd, some FUSE mounts)
            log.warning("%s: no build lock here (%s); building without one", path, e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
