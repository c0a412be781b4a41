"""`fklip train`: FashionKLIP training, in one process or under torchrun."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.errors import ConfigError
from fklip.precision import KNOWLEDGE, TRAIN


@click.command()
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
@click.option("--precision", type=click.Choice(TRAIN), default="fp32",
              show_default=True)
@click.option("--knowledge-precision", type=click.Choice(KNOWLEDGE), default="fp32", show_default=True,
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


COMMANDS = [train]
