"""The `fklip` command line. The only place that configures logging, prints errors and exits.

Each command builds one frozen config from its flags and hands it down; heavy imports (torch,
open_clip) happen inside the commands, so `fklip --help` is instant.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import click

from fklip import __version__
from fklip.cli_engines import bench, export
from fklip.errors import ConfigError, FklipError, NotAvailableError

# Commands that later releases fill in: name -> (what it will do, the issue that tracks it).
PENDING: dict[str, tuple[str, int]] = {}
DISTRIBUTED_COMMANDS = {"train", "eval"}  # the ones that shard their work under torchrun


def _error(message: str) -> None:
    """One line on stderr, on a line of its own: progress bars an error cut short end first."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    click.echo(message, err=True)


def _usage_line(e: click.UsageError) -> str:
    """click's usage error (three lines: usage, hint, error) as one line naming the help to read."""
    where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
    return f"fklip: error: {e.format_message().rstrip('.')}{where}"


class FklipGroup(click.Group):
    """Turns fklip's typed errors, click's usage errors and failed reads or writes into one line
    on stderr and their exit code (2; 3 for a pending command; 130 when interrupted)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            _error(_usage_line(e))
            raise click.exceptions.Exit(e.exit_code) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FklipError as e:
            _error(f"fklip: error: {e}")
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            _error(_usage_line(e))
            ctx.exit(e.exit_code)
        except OSError as e:  # a read or write the command did not turn into a FklipError itself
            if e.errno == errno.EPIPE:
                raise
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _error(f"fklip: error: {where}{e.strerror or e}")
            ctx.exit(2)
        except KeyboardInterrupt:
            _error("fklip: interrupted")
            ctx.exit(130)


@click.group(cls=FklipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fklip")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """fklip: train, export and run FashionKLIP image-text retrieval models.

    Start with `fklip demo`: it generates a small dataset and runs the pipeline on it.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    command, world = click.get_current_context().invoked_subcommand, os.environ.get("WORLD_SIZE", "1")
    asks_help = bool({"-h", "--help"} & set(sys.argv[1:]))
    if world.isdigit() and int(world) > 1 and command not in DISTRIBUTED_COMMANDS and not asks_help:
        # N copies of a one-process command would each do all the work on the same device and
        # write the same files N times
        raise ConfigError(f"`fklip {command}` runs in one process, and this is one of {world} (torchrun's "
                          f"WORLD_SIZE); only {' and '.join(sorted(DISTRIBUTED_COMMANDS))} run under torchrun: "
                          f"start `fklip {command}` without it")


def _pending_command(name: str, what: str, issue: int) -> click.Command:
    @click.command(name, help=f"Not available yet: {what} (tracked in issue {issue}).",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx: click.Context) -> None:
        raise NotAvailableError(f"`fklip {name}` ({what}) is not available in fklip "
                                f"{__version__} yet; it is tracked in issue {issue}")

    return command


for _name, (_what, _issue) in PENDING.items():
    cli.add_command(_pending_command(_name, _what, _issue))


# ---------------------------------------------------------------- fklip data ...


@cli.group()
def data() -> None:
    """Demo data, and checks of data files in the original's formats."""


@data.command("demo")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder to write the dataset into (the original's layout).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; same seed, same bytes.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--train", "n_train", type=int, default=500, show_default=True, help="Train products (queries).")
@click.option("--val", "n_val", type=int, default=150, show_default=True, help="Validation products (queries).")
@click.option("--kb", "n_kb", type=int, default=400, show_default=True, help="Knowledge-base images.")
@click.option("--encoding", type=click.Choice(["float32_chw", "uint8_hwc"]), default="float32_chw",
              show_default=True, help="The original's normalised float32 CHW arrays, or uint8 HWC pixels.")
@click.option("--overwrite", is_flag=True, help="Replace a demo dataset in --out made with other settings.")
def data_demo(out: Path, seed: int, size: int, n_train: int, n_val: int, n_kb: int, encoding: str,
              overwrite: bool) -> None:
    """Generate the procedural demo dataset (garments, captions, concepts, knowledge base)."""
    from fklip.data.demo import DemoDataConfig, check_demo_out, generate_demo

    cfg = DemoDataConfig(out=out, seed=seed, size=size, train=n_train, val=n_val, kb=n_kb,
                         encoding=encoding)
    if check_demo_out(cfg, overwrite):
        click.echo(f"{out} already holds this demo dataset (same settings, complete); left as it is")
        return
    paths = generate_demo(cfg, progress=True)
    click.echo(f"wrote the demo dataset to {paths.root}")


@data.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow checkpoints that hold Python objects beyond tensors (runs their pickled code).")
def data_inspect(paths: tuple[Path, ...], trust_checkpoint: bool) -> None:
    """Check data files (.npz archives, JSON lines, feature files, checkpoints) and summarise each in one line.

    Every file is checked: one summary line on stdout per good file, one error line on stderr per
    bad one (and, for several files, a last line counting them); exit code 2 if any is bad.
    """
    from fklip.data.inspect import describe
    from fklip.errors import DataError

    bad = []
    for path in paths:
        try:
            click.echo(describe(path, trust=trust_checkpoint))
        except FklipError as e:
            if len(paths) == 1:
                raise
            click.echo(f"fklip: error: {e}", err=True)
            bad.append(str(path))
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} files are bad: {', '.join(bad)}")


@data.command("models")
def data_models() -> None:
    """List the model names `--model` accepts."""
    from fklip.model import list_model_names

    for name in list_model_names():
        click.echo(name)


# ---------------------------------------------------------------- extract, predict, eval


def _encode_options(f):
    """Flags shared by the commands that run a checkpoint (the original's names where it had them)."""
    options = [
        click.option("--resume", "checkpoint", type=click.Path(path_type=Path),
                     help="Checkpoint: fklip, the original's/PAI, OpenAI ViT-B-32.pt, or a state dict "
                          "(needed by --engine torch)."),
        click.option("--engine", type=click.Choice(["torch", "onnx", "trt"]), default="torch", show_default=True,
                     help="What runs the model: PyTorch, onnxruntime or TensorRT (the last two read --engine-dir)."),
        click.option("--engine-dir", type=click.Path(path_type=Path),
                     help="A folder written by `fklip export` (for --engine onnx or trt)."),
        click.option("--int8", is_flag=True, help="--engine onnx: run the export's int8 graphs."),
        click.option("--compile", "compile_", is_flag=True, help="--engine torch: torch.compile the towers."),
        click.option("--cuda-graphs", is_flag=True, help="--engine torch on CUDA: replay captured CUDA graphs."),
        click.option("--fused", is_flag=True,
                     help="--engine torch: fklip's towers (SDPA/flash attention, last block at the pooled token) with "
                          "weights in --precision fp32, fp16 or bf16."),
        click.option("--model", default=None,
                     help="Architecture for checkpoints that do not record one (see `fklip data models`); "
                          "the original's, PAI and OpenAI checkpoints get its QuickGELU variant."),
        click.option("--img-batch-size", "image_batch_size", type=int, default=256, show_default=True),
        click.option("--text-batch-size", type=int, default=256, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["fp32", "amp", "bf16", "fp16"]), default="fp32",
                     show_default=True, help="fp32 is the original's; amp autocasts (fp16 on CUDA, bf16 on CPU)."),
        click.option("--truncation", type=click.Choice(["original", "openai"]), default=None,
                     help="Override the checkpoint's tokenizer truncation."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow checkpoints that hold Python objects beyond tensors (runs their pickled code)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _encode_config(checkpoint, engine, engine_dir, int8, compile_, cuda_graphs, fused, model, image_batch_size,
                   text_batch_size, device, precision, truncation, trust_checkpoint):
    from fklip.config import EncodeConfig

    return EncodeConfig(checkpoint=checkpoint, model=model, trust_checkpoint=trust_checkpoint,
                        truncation=truncation, device=device, precision=precision,
                        image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                        engine=engine, engine_dir=engine_dir, int8=int8, compile=compile_,
                        cuda_graphs=cuda_graphs, fused=fused)


def _make_encoder():
    """What builds the encoder behind --engine (engines/ is imported here, never by fklip's core)."""
    from engines.encoder import encoder_from_config

    return encoder_from_config


@cli.command()
@click.option("--extract-image-feats", is_flag=True, help="Extract image features from --image-data.")
@click.option("--extract-text-feats", is_flag=True, help="Extract text features from --text-data.")
@click.option("--image-data", type=click.Path(path_type=Path), help="Image archive (.npz).")
@click.option("--text-data", type=click.Path(path_type=Path), help="Queries (JSON lines with query_id, query_text).")
@click.option("--image-feat-output-path", type=click.Path(path_type=Path),
              help="Default: the image path minus '.npz' plus '.img_feat.jsonl' (as the original).")
@click.option("--text-feat-output-path", type=click.Path(path_type=Path),
              help="Default: the text path minus '.jsonl' plus '.txt_feat.jsonl' (as the original).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy"]), default="jsonl", show_default=True,
              help="jsonl: the original's files; npy: a memory-mappable matrix plus <name>.ids.jsonl.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Matrix dtype of --format npy.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist already (never an input).")
@_encode_options
def extract(extract_image_feats, extract_text_feats, image_data, text_data, image_feat_output_path,
            text_feat_output_path, fmt, dtype, overwrite, **encode) -> None:
    """Encode images and captions into feature files (the original's eval/extract_features.py)."""
    from fklip.config import ExtractConfig
    from fklip.extract import run_extract

    for flag, wanted, data, data_flag in (("--extract-image-feats", extract_image_feats, image_data, "--image-data"),
                                          ("--extract-text-feats", extract_text_feats, text_data, "--text-data")):
        if wanted and data is None:
            raise ConfigError(f"{flag} needs {data_flag}")
        if data is not None and not wanted:
            raise ConfigError(f"{data_flag} is given but {flag} is not; pass {flag} to extract it")
    cfg = ExtractConfig(encode=_encode_config(**encode), image_data=image_data, text_data=text_data,
                        image_output=image_feat_output_path, text_output=text_feat_output_path,
                        fmt=fmt, dtype=dtype, overwrite=overwrite)
    for item in run_extract(cfg, _make_encoder()):
        click.echo(f"{item['kind']} features: {item['count']} rows -> {', '.join(item['files'])}")


def _search_options(f):
    options = [
        click.option("--top-k", type=int, default=10, show_default=True, help="Predictions kept per query."),
        click.option("--eval-batch-size", "gallery_chunk", type=int, default=32768, show_default=True,
                     help="Gallery rows per matrix product (memory only; results do not depend on it)."),
        click.option("--query-chunk", type=int, default=4096, show_default=True,
                     help="Queries per matrix product (memory only)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _echo_recalls(summary: dict) -> None:
    for name in ("text_to_image", "image_to_text"):
        if name in summary:
            r = summary[name]
            click.echo(f"{name.replace('_', ' '):<14} R@1 {r['r1']:6.2f}  R@5 {r['r5']:6.2f}  "
                       f"R@10 {r['r10']:6.2f}  mean {r['mean_recall']:6.2f}  ({r['queries']} queries)")


@cli.command()
@click.option("--image-feats", type=click.Path(path_type=Path), required=True,
              help="Image features: the original's JSON lines, or fklip's .npy form.")
@click.option("--text-feats", type=click.Path(path_type=Path), required=True,
              help="Text features: the original's JSON lines, or fklip's .npy form.")
@click.option("--output-images", type=click.Path(path_type=Path), help="Image-to-text predictions (JSON lines).")
@click.option("--output-texts", type=click.Path(path_type=Path), help="Text-to-image predictions (JSON lines).")
@click.option("--text-standard-path", type=click.Path(path_type=Path),
              help="Text-to-image gold: the val queries file.")
@click.option("--image-standard-path", type=click.Path(path_type=Path),
              help="Image-to-text gold: the val images file.")
@click.option("--text-out-path", type=click.Path(path_type=Path), help="Text-to-image score JSON.")
@click.option("--image-out-path", type=click.Path(path_type=Path), help="Image-to-text score JSON.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist already (never an input).")
@_search_options
def predict(image_feats, text_feats, output_images, output_texts, text_standard_path, image_standard_path,
            text_out_path, image_out_path, device, overwrite, top_k, gallery_chunk, query_chunk) -> None:
    """Exact top-k predictions and recall scores from feature files (the original's eval/predict_evaluate.py)."""
    from fklip.config import PredictConfig, SearchConfig, check_device
    from fklip.evaluate import run_predict

    search = SearchConfig(top_k=top_k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                          device=check_device(device))
    cfg = PredictConfig(image_feats=image_feats, text_feats=text_feats, search=search,
                        output_images=output_images, output_texts=output_texts,
                        text_standard_path=text_standard_path, image_standard_path=image_standard_path,
                        text_out_path=text_out_path, image_out_path=image_out_path, overwrite=overwrite)
    _echo_recalls(run_predict(cfg))


@cli.command("eval")
@click.option("--image-data", type=click.Path(path_type=Path), required=True, help="Validation image archive (.npz).")
@click.option("--text-data", type=click.Path(path_type=Path), required=True,
              help="Validation queries (query_id, query_text, item_ids): the captions and the text-to-image gold.")
@click.option("--image-standard-path", type=click.Path(path_type=Path),
              help="Image-to-text gold; derived from the queries' item_ids when absent.")
@click.option("--output-dir", type=click.Path(path_type=Path), required=True,
              help="Where predictions, scores and metrics.json go.")
@click.option("--save-features", type=click.Choice(["none", "jsonl", "npy"]), default="none", show_default=True,
              help="Also write the features, for `fklip predict`.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier evaluation in --output-dir (never an input).")
@_encode_options
@_search_options
def eval_command(image_data, text_data, image_standard_path, output_dir, save_features, overwrite, top_k,
                 gallery_chunk, query_chunk, **encode) -> None:
    """Checkpoint and raw validation files to predictions, scores and metrics, in one command.

    Under torchrun, encoding and search are sharded across the processes and merged exactly.
    """
    from fklip.config import EvalConfig, SearchConfig
    from fklip.eval_pipeline import run_eval

    enc = _encode_config(**encode)
    search = SearchConfig(top_k=top_k, query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=enc.device)
    cfg = EvalConfig(encode=enc, search=search, image_data=image_data, text_data=text_data,
                     output_dir=output_dir, image_standard_path=image_standard_path,
                     save_features=save_features, overwrite=overwrite)
    metrics = run_eval(cfg, _make_encoder())
    if metrics is not None:
        _echo_recalls(metrics)
        t = metrics["timings_s"]
        click.echo(f"load {t['load']:.1f}s, encode {t['encode']:.1f}s, search {t['search']:.1f}s, "
                   f"total {t['total']:.1f}s; wrote {output_dir}")


# ---------------------------------------------------------------- train


@cli.command()
@click.option("--train-data", type=click.Path(path_type=Path), required=True,
              help="Train queries with phrases and match_phrases (JSON lines).")
@click.option("--train-img", type=click.Path(path_type=Path), required=True, help="Train image archive (.npz).")
@click.option("--val-data", type=click.Path(path_type=Path), help="Val queries: val loss and recall each epoch.")
@click.option("--val-img", type=click.Path(path_type=Path), help="Val image archive (.npz).")
@click.option("--txt-id-filename", type=click.Path(path_type=Path),
              help="Data concept vocabulary (phrase -> id), e.g. fashion-gen_concepts_queries.jsonl.")
@click.option("--kb-txt-id-filename", type=click.Path(path_type=Path),
              help="Knowledge-base concept vocabulary (phrase -> id), e.g. icbu_concepts_queries.jsonl.")
@click.option("--concept-data", type=click.Path(path_type=Path),
              help="Data concept prompts to retrieve images for (defaults to --txt-id-filename).")
@click.option("--kb-concept-data", type=click.Path(path_type=Path),
              help="KB concept prompts to retrieve images for (defaults to --kb-txt-id-filename).")
@click.option("--concept-fathers", type=click.Path(path_type=Path), help="Hypernyms of the data concepts.")
@click.option("--kb-concept-fathers", type=click.Path(path_type=Path), help="Hypernyms of the KB concepts.")
@click.option("--img-data-sets", type=click.Path(path_type=Path), multiple=True,
              help="Knowledge-base image archive(s); repeatable.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="An fklip training checkpoint to continue, or weights to start from (PAI, original, OpenAI).")
@click.option("--openai-pretrained", is_flag=False, flag_value="./tmp/pretrained_models/ViT-B-32.pt",
              type=click.Path(path_type=Path), default=None,
              help="Start from OpenAI weights; alone it reads ./tmp/pretrained_models/ViT-B-32.pt as the original.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints holding Python objects beyond tensors.")
@click.option("--is-concept", is_flag=True, help="Add the concept (knowledge) loss.")
@click.option("--is-data-concept", is_flag=True, help="Use the data concepts (phrases of the captions).")
@click.option("--use-kb-concepts/--no-use-kb-concepts", default=True, show_default=True,
              help="Use the knowledge-base concepts (match_phrases).")
@click.option("--is-update", is_flag=True, help="Refresh the concept images every epoch (else once, before the first).")
@click.option("--concept-loss-weight", default="auto", show_default=True,
              help="auto (the original's adaptive weight, clamped to [0, 1]) or a number in [0, 1].")
@click.option("--original-indexing", is_flag=True,
              help="Reproduce the original's concept loss: its slot/rank transposition, and negative "
                   "prototype cosines as negative weights (fklip clamps them to 0).")
@click.option("--dist-url", default=None, help="Accepted for the original's launch; use torchrun for several processes.")
@click.option("--dataset-type", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--warmup", type=int, default=500, show_default=True, help="Warmup steps.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size per process.")
@click.option("--eval-batch-size", type=int, default=256, show_default=True, help="Batch size for encoding.")
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--wd", type=float, default=0.2, show_default=True)
@click.option("--epochs", type=int, default=32, show_default=True)
@click.option("--stop-after", type=int, default=None,
              help="End this invocation after N epochs (the schedule still spans --epochs); resume later.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Above 0: a background thread reads each batch two steps ahead (always so on CUDA).")
@click.option("--model", default="fklip-tiny", show_default=True, help="Architecture (see `fklip data models`).")
@click.option("--save-most-recent", is_flag=True, help="Also write checkpoints/epoch_latest.pt every epoch.")
@click.option("--save-frequency", type=int, default=1, show_default=True, help="Write epoch_N.pt every N epochs.")
@click.option("--report-to", type=click.Choice(["tensorboard", "none"]), default="tensorboard", show_default=True)
@click.option("--logs", type=click.Path(path_type=Path), default=Path("logs"), show_default=True)
@click.option("--name", default=None, help="Run folder name under --logs.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in an existing run folder, replacing what it holds (else resume it).")
@click.option("--precision", type=click.Choice(["amp", "amp_bf16", "fp32", "bf16", "fp16"]), default="fp32",
              show_default=True)
@click.option("--knowledge-precision", type=click.Choice(["fp32", "amp"]), default="fp32", show_default=True,
              help="How the knowledge refresh encodes the KB images and concept prompts: fp32 (the "
                   "original's) or amp (fp16 autocast on CUDA, bf16 on the CPU).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (under torchrun: cuda).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--truncation", type=click.Choice(["original", "openai"]), default="original", show_default=True)
def train(dist_url, dataset_type, stop_after, **flags) -> None:
    """FashionKLIP training: contrastive loss plus the concept-level knowledge loss.

    The original README's command works with `fklip train` in place of
    `python3 -u training/main_all_concept.py`. Under torchrun, one process per device.
    """
    from fklip.config import TrainConfig
    from fklip.train import run_train

    flags["img_data_sets"] = tuple(flags["img_data_sets"])
    cfg = TrainConfig(**flags)
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after: expected a positive number of epochs, got {stop_after}")
    summary = run_train(cfg, stop_after=stop_after)
    if summary is not None and summary["note"]:
        click.echo(f"fklip: {summary['note']}", err=True)
    if summary is not None:
        for record in summary["epochs"]:
            click.echo(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        click.echo(f"run folder: {summary['run_dir']}")


# ---------------------------------------------------------------- fklip demo


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("fklip-demo"), show_default=True,
              help="Working folder: data/, checkpoints/, eval/.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data and the model.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Encoding batch size.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Training epochs.")
@click.option("--overwrite", is_flag=True,
              help="Work in an --out that holds other files (the demo's own earlier runs need no flag).")
def demo(out: Path, seed: int, device: str, batch_size: int, epochs: int, overwrite: bool) -> None:
    """Run the pipeline on the embedded demo data and print what it did and measured."""
    from export.pipeline import run_export
    from fklip.config import DemoConfig
    from fklip.demo import format_table, run_demo

    cfg = DemoConfig(out=out, seed=seed, device=device, batch_size=batch_size, epochs=epochs,
                     overwrite=overwrite)
    rows = run_demo(cfg, run_export, _make_encoder())
    click.echo(format_table(rows))


cli.add_command(export)
cli.add_command(bench)


def main() -> None:
    cli(prog_name="fklip")
