"""`fklip demo`: the whole pipeline on the embedded demo data."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
    from engines.demo import format_table, run_demo
    from fklip.config import DemoConfig

    cfg = DemoConfig(out=out, seed=seed, device=device, batch_size=batch_size, epochs=epochs,
                     overwrite=overwrite)
    rows = run_demo(cfg)
    click.echo(format_table(rows))


COMMANDS = [demo]
