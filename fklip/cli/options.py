"""Flags shared by the commands that encode (extract, eval) and search (predict, eval)."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.precision import ENCODE


def encode_options(f):
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
        click.option("--precision", type=click.Choice(ENCODE), default="fp32",
                     show_default=True, help="fp32 is the original's; amp autocasts (fp16 on CUDA, bf16 on CPU)."),
        click.option("--truncation", type=click.Choice(["original", "openai"]), default=None,
                     help="Override the checkpoint's tokenizer truncation."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow checkpoints that hold Python objects beyond tensors (runs their pickled code)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def encode_config(checkpoint, engine, engine_dir, int8, compile_, cuda_graphs, fused, model, image_batch_size,
                   text_batch_size, device, precision, truncation, trust_checkpoint):
    from fklip.config import EncodeConfig

    return EncodeConfig(checkpoint=checkpoint, model=model, trust_checkpoint=trust_checkpoint,
                        truncation=truncation, device=device, precision=precision,
                        image_batch_size=image_batch_size, text_batch_size=text_batch_size,
                        engine=engine, engine_dir=engine_dir, int8=int8, compile=compile_,
                        cuda_graphs=cuda_graphs, fused=fused)


def search_options(f):
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


def echo_recalls(summary: dict) -> None:
    for name in ("text_to_image", "image_to_text"):
        if name in summary:
            r = summary[name]
            click.echo(f"{name.replace('_', ' '):<14} R@1 {r['r1']:6.2f}  R@5 {r['r5']:6.2f}  "
                       f"R@10 {r['r10']:6.2f}  mean {r['mean_recall']:6.2f}  ({r['queries']} queries)")
