"""The `fklip` command line. The only place that configures logging, prints errors and exits.

Each command builds one frozen config from its flags and hands it down; heavy imports (torch,
open_clip) happen inside the commands, so `fklip --help` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from fklip import __version__
from fklip.errors import FklipError, NotAvailableError

# Commands that later releases fill in: name -> (what it will do, the issue that tracks it).
PENDING = {
    "train": ("knowledge-injected FashionKLIP training on CPU, one GPU or many", 4),
    "export": ("ONNX and TensorRT export with a parity check", 5),
    "extract": ("image and text feature extraction in the original's file formats", 3),
    "predict": ("exact top-k prediction and recall scores from feature files", 3),
    "eval": ("checkpoint to recall metrics in one command", 3),
    "bench": ("throughput benchmarks against open_clip", 6),
}


class FklipGroup(click.Group):
    """Turns fklip's typed errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FklipError as e:
            click.echo(f"fklip: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("fklip: interrupted", err=True)
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
def data_demo(out: Path, seed: int, size: int, n_train: int, n_val: int, n_kb: int, encoding: str) -> None:
    """Generate the procedural demo dataset (garments, captions, concepts, knowledge base)."""
    from fklip.data.demo import DemoDataConfig, generate_demo

    cfg = DemoDataConfig(out=out, seed=seed, size=size, train=n_train, val=n_val, kb=n_kb,
                         encoding=encoding)
    paths = generate_demo(cfg, progress=True)
    click.echo(f"wrote the demo dataset to {paths.root}")


@data.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow checkpoints that hold Python objects beyond tensors (runs their pickled code).")
def data_inspect(paths: tuple[Path, ...], trust_checkpoint: bool) -> None:
    """Check data files (.npz archives, JSON lines, checkpoints) and summarise each in one line.

    Stops with exit code 2 at the first bad file.
    """
    from fklip.data.inspect import describe

    for path in paths:
        click.echo(describe(path, trust=trust_checkpoint))


@data.command("models")
def data_models() -> None:
    """List the model names `--model` accepts."""
    from fklip.model import list_model_names

    for name in list_model_names():
        click.echo(name)


# ---------------------------------------------------------------- fklip demo


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("fklip-demo"), show_default=True,
              help="Working folder: data/, checkpoints/, eval/.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data and the model.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Encoding batch size.")
def demo(out: Path, seed: int, device: str, batch_size: int) -> None:
    """Run the pipeline on the embedded demo data and print what it did and measured."""
    from fklip.config import DemoConfig
    from fklip.demo import format_table, run_demo

    cfg = DemoConfig(out=out, seed=seed, device=device, batch_size=batch_size)
    rows = run_demo(cfg)
    click.echo(format_table(rows))


def main() -> None:
    cli(prog_name="fklip")
