"""Frozen per-command configs, built once at the CLI edge. Checks name the flag at fault."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fklip.errors import ConfigError
from fklip.precision import (
    BENCH,
    ENCODE,
    EXPORT,
    FUSED,
    KNOWLEDGE,
    TRAIN,
    check_precision,
)

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def parse_device(device: str, flag: str = "--device") -> tuple[str, int | None]:
    """"cpu" -> ("cpu", None); "cuda" / "cuda:N" -> ("cuda", N); anything else: ConfigError."""
    if not _DEVICE.match(device):
        raise ConfigError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
    kind, _, index = device.partition(":")
    return ("cpu", None) if kind == "cpu" else ("cuda", int(index or 0))


def check_device_name(device: str, flag: str = "--device") -> str:
    """Validate the form of a device string (whether it exists is checked when it is used)."""
    parse_device(device, flag)
    return device


def check_device(device: str, flag: str = "--device") -> str:
    """The one device check: the form of the string, and that the device exists on this machine.
    Every command and runner calls it (configs check the form alone, at the CLI edge)."""
    kind, index = parse_device(device, flag)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: no CUDA device is available here "
                              "(torch.cuda.is_available() is False); use --device cpu")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA devices")
    return device


def check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag}: expected a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class DemoConfig:
    """`fklip demo`: where to work, the seed, and how to encode."""

    out: Path
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 128
    epochs: int = 8
    overwrite: bool = False  # work in an --out that is neither empty nor an earlier demo's

    def __post_init__(self) -> None:
        check_positive(self.epochs, "--epochs")
        if self.seed < 0:
            raise ConfigError(f"--seed: expected a non-negative integer, got {self.seed}")
        check_positive(self.batch_size, "--batch-size")
        check_device_name(self.device)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"


ENGINES = ("torch", "onnx", "trt")


def check_encode_precision(precision: str, device: str, flag: str = "--precision") -> str:
    """fp32; amp (autocast: fp16 on CUDA, bf16 on CPU); bf16 or fp16 weights (fp16 needs CUDA)."""
    check_precision(precision, ENCODE, flag)
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError(f"{flag} fp16 needs a CUDA device (fp16 matrix products are not supported "
                          "well on the CPU); use bf16 or amp with --device cpu")
    return precision


@dataclass(frozen=True)
class EncodeConfig:
    """How to run the model, for every caller: `fklip extract` and `fklip eval` build it from their
    flags, the demo and `fklip bench` in code, and `engines.base.build_runner` makes the runner of
    `engine` from it. torch runs a checkpoint; onnx and trt run a `fklip export` folder, whose
    precision `precision` may name (fp32, the default, means as exported)."""

    engine: str = "torch"  # torch | onnx | trt (engines/)
    checkpoint: Path | None = None  # torch; with onnx or trt, checked to be the export's source
    engine_dir: Path | None = None  # onnx, trt: a `fklip export` folder
    model: str | None = None
    truncation: str | None = None
    trust_checkpoint: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False  # torch: torch.compile the towers
    cuda_graphs: bool = False  # torch on CUDA: replay captured CUDA graphs
    fused: bool = False  # torch: fklip's re-stated towers (SDPA attention), weights in one dtype
    int8: bool = False  # onnx: the export's int8 graphs
    threads: int | None = None  # torch and onnxruntime intra-op threads (None: the library's default)
    image_batch_size: int = 256
    text_batch_size: int = 256

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "torch":
            check_encode_precision(self.precision, self.device)
            if self.checkpoint is None:
                where = (f"; {self.engine_dir} is an export folder, which --engine onnx or trt runs"
                         if self.engine_dir is not None else "")
                raise ConfigError(f"--engine torch needs --resume CHECKPOINT{where}")
            if self.int8:
                raise ConfigError("--int8 selects the int8 graphs of an export; use it with --engine onnx")
            if self.cuda_graphs and not self.device.startswith("cuda"):
                raise ConfigError("--cuda-graphs needs --device cuda")
            if self.fused:
                check_precision(self.precision, FUSED, what="--fused runs weights in one dtype")
        else:
            if self.compile or self.cuda_graphs or self.fused:
                flag = "--compile" if self.compile else "--cuda-graphs" if self.cuda_graphs else "--fused"
                raise ConfigError(f"{flag} applies to --engine torch; the {self.engine} engine runs the export")
            if self.engine_dir is None:
                raise ConfigError(f"--engine {self.engine} needs --engine-dir, a folder written by `fklip export`")
            check_precision(self.precision, EXPORT, what=f"the {self.engine} engine runs the precision written "
                            "at export; fp32 means as exported")
            if self.int8 and self.engine != "onnx":
                raise ConfigError("--int8 runs onnxruntime's int8 graphs; use it with --engine onnx")
        if self.threads is not None:
            check_positive(self.threads, "--threads")
        check_positive(self.image_batch_size, "--img-batch-size")
        check_positive(self.text_batch_size, "--text-batch-size")


@dataclass(frozen=True)
class ExtractConfig:
    """`fklip extract`: the flags of the original eval/extract_features.py, plus output format."""

    encode: EncodeConfig
    image_data: Path | None = None
    text_data: Path | None = None
    image_output: Path | None = None
    text_output: Path | None = None
    fmt: str = "jsonl"
    dtype: str = "float32"
    overwrite: bool = False  # replace output files that exist

    def __post_init__(self) -> None:
        if self.image_data is None and self.text_data is None:
            raise ConfigError("nothing to extract: pass --extract-image-feats with --image-data "
                              "and/or --extract-text-feats with --text-data")
        if self.fmt not in ("jsonl", "npy"):
            raise ConfigError(f"--format: expected jsonl or npy, got {self.fmt!r}")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype: expected float32 or float16, got {self.dtype!r}")
        if self.fmt == "jsonl" and self.dtype != "float32":
            raise ConfigError("--dtype float16 needs --format npy (JSON lines hold float32 values)")


@dataclass(frozen=True)
class SearchConfig:
    """Exact top-k search: k and chunk sizes (results do not depend on the chunks)."""

    top_k: int = 10
    query_chunk: int = 4096
    gallery_chunk: int = 32768
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_positive(self.top_k, "--top-k")
        if self.top_k < 10:
            raise ConfigError(f"--top-k: recall@10 needs at least 10 predictions, got {self.top_k}")
        check_positive(self.query_chunk, "--query-chunk")
        check_positive(self.gallery_chunk, "--eval-batch-size")
        check_device_name(self.device)


@dataclass(frozen=True)
class PredictConfig:
    """`fklip predict`: the flags of the original eval/predict_evaluate.py."""

    image_feats: Path
    text_feats: Path
    search: SearchConfig
    output_images: Path | None = None
    output_texts: Path | None = None
    text_standard_path: Path | None = None
    image_standard_path: Path | None = None
    text_out_path: Path | None = None
    image_out_path: Path | None = None
    overwrite: bool = False  # replace output files that exist

    def __post_init__(self) -> None:
        if self.output_texts is None and self.output_images is None:
            raise ConfigError("nothing to predict: pass --output-texts (text to image) and/or "
                              "--output-images (image to text)")
        for gold, out, gold_flag, out_flag, pred_flag, pred in (
                (self.text_standard_path, self.text_out_path, "--text-standard-path",
                 "--text-out-path", "--output-texts", self.output_texts),
                (self.image_standard_path, self.image_out_path, "--image-standard-path",
                 "--image-out-path", "--output-images", self.output_images)):
            if (gold is None) != (out is None):
                given, missing = (gold_flag, out_flag) if out is None else (out_flag, gold_flag)
                raise ConfigError(f"{given} needs {missing}: the score is computed from the gold "
                                  "file and written to the out path")
            if gold is not None and pred is None:
                raise ConfigError(f"{gold_flag} scores the predictions of {pred_flag}; pass it too")


@dataclass(frozen=True)
class EvalConfig:
    """`fklip eval`: checkpoint and raw validation files to predictions, scores and metrics."""

    encode: EncodeConfig
    search: SearchConfig
    image_data: Path
    text_data: Path
    output_dir: Path
    image_standard_path: Path | None = None
    save_features: str = "none"
    overwrite: bool = False  # replace the outputs of an earlier evaluation in output_dir

    def __post_init__(self) -> None:
        if self.save_features not in ("none", "jsonl", "npy"):
            raise ConfigError(f"--save-features: expected none, jsonl or npy, got {self.save_features!r}")


@dataclass(frozen=True)
class TrainConfig:
    """`fklip train`: the original's flags (same meaning) plus fklip's additions. See the README."""

    train_data: Path
    train_img: Path
    model: str = "fklip-tiny"
    val_data: Path | None = None
    val_img: Path | None = None
    txt_id_filename: Path | None = None       # data vocabulary: phrase -> concept id
    kb_txt_id_filename: Path | None = None    # KB vocabulary: phrase -> concept id
    concept_data: Path | None = None          # data vocabulary prompts to encode
    kb_concept_data: Path | None = None       # KB vocabulary prompts to encode
    concept_fathers: Path | None = None
    kb_concept_fathers: Path | None = None
    img_data_sets: tuple[Path, ...] = ()      # knowledge-base image archives
    resume: Path | None = None
    openai_pretrained: Path | None = None
    trust_checkpoint: bool = False
    is_concept: bool = False
    is_data_concept: bool = False
    use_kb_concepts: bool = True
    is_update: bool = False
    concept_loss_weight: str = "auto"
    original_indexing: bool = False
    warmup: int = 500
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 5e-4
    wd: float = 0.2
    epochs: int = 32
    workers: int = 0
    grad_clip: float | None = None
    precision: str = "fp32"
    knowledge_precision: str = "fp32"  # the knowledge refresh's encoding: the original's fp32, or amp
    device: str = "cpu"
    seed: int = 0
    truncation: str = "original"
    save_most_recent: bool = False
    save_frequency: int = 1
    report_to: str = "tensorboard"
    logs: Path = Path("logs")
    name: str | None = None
    overwrite: bool = False  # a new run in an existing run folder replaces what it holds

    def __post_init__(self) -> None:
        if self.name is not None and (self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name):
            raise ConfigError(f"--name: expected a folder name (no '/', not '.' or '..'), got {self.name!r}; "
                              "the run folder is --logs/--name")
        check_positive(self.batch_size, "--batch-size")
        check_positive(self.eval_batch_size, "--eval-batch-size")
        check_positive(self.epochs, "--epochs")
        check_positive(self.save_frequency, "--save-frequency")
        if self.warmup < 0:
            raise ConfigError(f"--warmup: expected a non-negative number of steps, got {self.warmup}")
        if self.workers < 0:
            raise ConfigError(f"--workers: expected a non-negative integer, got {self.workers}")
        if not self.lr > 0:
            raise ConfigError(f"--lr: expected a positive learning rate, got {self.lr}")
        if self.wd < 0:
            raise ConfigError(f"--wd: expected a non-negative weight decay, got {self.wd}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"--grad-clip: expected a positive norm, got {self.grad_clip}")
        if self.seed < 0:
            raise ConfigError(f"--seed: expected a non-negative integer, got {self.seed}")
        check_device_name(self.device)
        check_precision(self.precision, TRAIN)
        if self.precision in ("amp", "fp16") and not self.device.startswith("cuda"):
            raise ConfigError(f"--precision {self.precision} needs --device cuda (fp16 training with a "
                              "gradient scaler); on the CPU use fp32, bf16 or amp_bf16")
        check_precision(self.knowledge_precision, KNOWLEDGE, "--knowledge-precision")
        if self.report_to not in ("tensorboard", "none", ""):
            raise ConfigError(f"--report-to: expected tensorboard or none, got {self.report_to!r}")
        if self.resume is not None and self.openai_pretrained is not None:
            raise ConfigError("--resume and --openai-pretrained both give starting weights; pass one")
        if self.concept_loss_weight != "auto":
            try:
                w = float(self.concept_loss_weight)
            except ValueError:
                w = -1.0
            if not 0.0 <= w <= 1.0:
                raise ConfigError("--concept-loss-weight: expected auto or a number in [0, 1], "
                                  f"got {self.concept_loss_weight!r}")
        if (self.val_data is None) != (self.val_img is None):
            raise ConfigError("--val-data and --val-img go together")
        if self.is_concept:
            self._check_concept_inputs()
        if self.original_indexing and not (self.is_concept and self.is_data_concept and not self.use_kb_concepts):
            raise ConfigError("--original-indexing reproduces the original's concept loss, which sees only the "
                              "data concepts: pass it with --is-concept --is-data-concept --no-use-kb-concepts")

    def _check_concept_inputs(self) -> None:
        if not (self.is_data_concept or self.use_kb_concepts):
            raise ConfigError("--is-concept needs concepts: pass --is-data-concept and/or --use-kb-concepts")
        if not self.img_data_sets:
            raise ConfigError("--is-concept needs --img-data-sets (the knowledge-base images)")
        if self.is_data_concept and not (self.txt_id_filename or self.concept_data):
            raise ConfigError("--is-data-concept needs --txt-id-filename or --concept-data")
        if self.use_kb_concepts and not (self.kb_txt_id_filename or self.kb_concept_data):
            raise ConfigError("--use-kb-concepts needs --kb-txt-id-filename or --kb-concept-data "
                              "(or pass --no-use-kb-concepts)")


@dataclass(frozen=True)
class ExportConfig:
    """`fklip export`: a checkpoint to ONNX graphs (and TensorRT engines), with a parity check."""

    checkpoint: Path
    out: Path
    model: str | None = None
    truncation: str | None = None
    trust_checkpoint: bool = False
    trt: bool = False
    precision: str = "fp32"
    opt_batch: int = 64
    max_batch: int = 256
    int8: bool = False
    uint8_input: bool = False
    ids_dtype: str = "int32"
    parity_images: Path | None = None
    parity_texts: Path | None = None
    parity_samples: int = 64
    overwrite: bool = False  # replace an earlier export in --out

    def __post_init__(self) -> None:
        check_precision(self.precision, EXPORT)
        if self.ids_dtype not in ("int32", "int64"):
            raise ConfigError(f"--ids-dtype: expected int32 or int64, got {self.ids_dtype!r}")
        check_positive(self.opt_batch, "--opt-batch")
        check_positive(self.max_batch, "--max-batch")
        check_positive(self.parity_samples, "--parity-samples")
        if self.opt_batch > self.max_batch:
            raise ConfigError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.int8 and self.precision != "fp32":
            raise ConfigError("--int8 quantises the fp32 graphs for CPU serving; use it with --precision fp32")


# device kind -> defaults of `fklip bench`: a couple of minutes on 2 CPU cores for ViT-B-32; the
# issue's sizes on one GPU (batch 1024, top-k of 8,192 queries against 1,000,000 fp16 vectors)
BENCH_DEFAULTS = {
    "cpu": {"batch": 32, "images": 64, "texts": 128, "topk_queries": 2048, "topk_gallery": 65536,
            "precisions": ("fp32", "int8")},
    "cuda": {"batch": 1024, "images": 8192, "texts": 16384, "topk_queries": 8192, "topk_gallery": 1_000_000,
             "precisions": ("fp32", "amp", "fp16", "bf16")},
}


def bench_combo_problem(engine: str, precision: str, device: str) -> str | None:
    """Why `fklip bench` cannot run `engine` at `precision` on `device` (None: it can)."""
    cuda = device.startswith("cuda")
    if precision == "int8":
        if engine != "onnx":
            return "int8 is onnx-only (onnxruntime's dynamic-int8 graphs, `fklip export --int8`)"
        return "int8 graphs are for onnxruntime's CPU provider; use --device cpu" if cuda else None
    if precision == "amp" and engine != "torch":
        return "amp is torch autocast; the onnx and trt engines run the precision written at export"
    if precision == "fp16" and engine == "torch" and not cuda:
        return "fp16 weights need a CUDA device on the torch engine"
    if precision == "bf16" and engine == "onnx":
        return "onnxruntime has no bf16 kernels for these graphs; use the torch or trt engine"
    if engine == "trt" and not cuda:
        return "TensorRT runs on a CUDA device; use --device cuda"
    return None


@dataclass(frozen=True)
class BenchConfig:
    """`fklip bench`: what to measure against open_clip. None and () mean the device's defaults
    (BENCH_DEFAULTS); `engines` () means every engine that can run here."""

    device: str = "cpu"
    model: str | None = None  # random weights of this architecture, or a checkpoint's (default ViT-B-32)
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    engines: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    batch: int | None = None
    images: int | None = None
    texts: int | None = None
    repeats: int = 3
    threads: int | None = None
    topk_queries: int | None = None
    topk_gallery: int | None = None
    k: int = 10
    seed: int = 0
    json_out: Path | None = None
    # the torch engine's options (None: on for CUDA, off on the CPU); fused does not apply to amp
    fused: bool | None = None
    cuda_graphs: bool | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        check_device_name(self.device)
        cuda = self.device.startswith("cuda")
        for name in ("fused", "cuda_graphs"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, cuda)
        defaults = BENCH_DEFAULTS["cuda" if cuda else "cpu"]
        for name in ("batch", "images", "texts", "topk_queries", "topk_gallery", "precisions"):
            if getattr(self, name) in (None, ()):
                object.__setattr__(self, name, defaults[name])
        problems = []
        for name, flag in (("batch", "--batch"), ("images", "--images"), ("texts", "--texts"),
                           ("repeats", "--repeats"), ("topk_queries", "--topk-queries"),
                           ("topk_gallery", "--topk-gallery"), ("k", "--k")):
            if getattr(self, name) < 1:
                problems.append(f"{flag}: expected a positive integer, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads: expected a positive integer, got {self.threads}")
        if self.seed < 0:
            problems.append(f"--seed: expected a non-negative integer, got {self.seed}")
        if self.cuda_graphs and not cuda:
            problems.append("--cuda-graphs needs --device cuda")
        if self.k > self.topk_gallery:
            problems.append(f"--k {self.k} is larger than --topk-gallery {self.topk_gallery}")
        problems += [f"--engine: expected one of {', '.join(ENGINES)}, got {e!r}" for e in self.engines
                     if e not in ENGINES]
        problems += [f"--precision: expected one of {', '.join(BENCH)}, got {p!r}"
                     for p in self.precisions if p not in BENCH]
        if not problems and self.engines:  # every pair the flags ask for cannot run: say why
            runnable = [(e, p) for e in self.engines for p in self.precisions
                        if bench_combo_problem(e, p, self.device) is None]
            if not runnable:
                why = "; ".join(sorted({f"{e} {p}: {bench_combo_problem(e, p, self.device)}"
                                        for e in self.engines for p in self.precisions}))
                problems.append(f"--engine {' '.join(self.engines)} with --precision "
                                f"{' '.join(self.precisions)} on {self.device} measures nothing: {why}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def model_name(self) -> str | None:
        """The architecture: --model, else ViT-B-32 for random weights (a checkpoint names its own)."""
        return self.model if self.model is not None or self.checkpoint is not None else "ViT-B-32"
