"""`fklip data demo|inspect|models`."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.errors import FklipError


@click.group("data")
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
    from fklip.data.demo_dataset import DemoDataConfig, check_demo_out, generate_demo

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


COMMANDS = [data]
