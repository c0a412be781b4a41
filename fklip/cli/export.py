"""`fklip export` and `fklip bench`: a checkpoint to ONNX/TensorRT, and engines timed against open_clip."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.precision import EXPORT

# ---------------------------------------------------------------- export


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Export folder: image.onnx, text.onnx, manifest.json (and int8 graphs, engines).")
@click.option("--onnx", "onnx_", is_flag=True, help="ONNX graphs (always written; the default).")
@click.option("--trt", is_flag=True, help="Also TensorRT engines (needs the trt extra and a CUDA GPU).")
@click.option("--precision", type=click.Choice(EXPORT), default="fp32", show_default=True,
              help="Compute precision written into the graphs; LayerNorm, softmax and the output norm stay fp32.")
@click.option("--opt-batch", type=int, default=64, show_default=True, help="TensorRT profile: the batch to tune for.")
@click.option("--max-batch", type=int, default=256, show_default=True,
              help="TensorRT profile: the largest batch (runners split larger ones).")
@click.option("--int8", is_flag=True, help="Also onnxruntime dynamic-int8 graphs for CPU serving (fp32 only).")
@click.option("--uint8-input", is_flag=True, help="The image graph takes uint8 (B, H, W, 3) pixels.")
@click.option("--ids-dtype", type=click.Choice(["int32", "int64"]), default="int32", show_default=True,
              help="Dtype of the text graph's token ids (runners accept either).")
@click.option("--parity-images", type=click.Path(path_type=Path),
              help="Image archive (.npz) whose first --parity-samples images join the parity check.")
@click.option("--parity-texts", type=click.Path(path_type=Path),
              help="Queries (JSON lines) whose first --parity-samples captions join the parity check.")
@click.option("--parity-samples", type=int, default=64, show_default=True)
@click.option("--model", default=None, help="Architecture for checkpoints that do not record one; the "
              "original's, PAI and OpenAI checkpoints get its QuickGELU variant.")
@click.option("--truncation", type=click.Choice(["original", "openai"]), default=None,
              help="Override the checkpoint's tokenizer truncation (recorded in the manifest).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that hold Python objects beyond tensors.")
@click.option("--overwrite", "--force", "overwrite", is_flag=True, help="Replace an earlier export in --out.")
def export(checkpoint, out, onnx_, trt, precision, opt_batch, max_batch, int8, uint8_input, ids_dtype,
           parity_images, parity_texts, parity_samples, model, truncation, trust_checkpoint, overwrite) -> None:
    """Export a checkpoint's towers to ONNX (and TensorRT), each checked against PyTorch.

    A failed check leaves nothing behind; manifest.json records files, hashes, IO, the tolerances
    met and the figures measured.
    """
    from engines.trt_build import build_trt_engines
    from export.pipeline import run_export
    from fklip.config import ExportConfig

    cfg = ExportConfig(checkpoint=checkpoint, out=out, model=model, truncation=truncation,
                       trust_checkpoint=trust_checkpoint, trt=trt, precision=precision, opt_batch=opt_batch,
                       max_batch=max_batch, int8=int8, uint8_input=uint8_input, ids_dtype=ids_dtype,
                       parity_images=parity_images, parity_texts=parity_texts,
                       parity_samples=parity_samples, overwrite=overwrite)
    # --trt: the engines are built and checked by engines/ (a runner's job) in export's staging folder
    manifest = run_export(cfg, build_trt_engines if trt else None)
    sections = [("onnx", manifest.towers), ("int8", manifest.int8),
                ("trt", manifest.trt.engines() if manifest.trt else None)]
    for kind, entries in sections:
        for tower, entry in (entries or {}).items():
            checks = ", ".join(f"{k} min cos {v.min_cosine:.6f} max abs {v.max_abs:.2g} ({v.samples})"
                               for k, v in entry.parity.figures().items())
            click.echo(f"{kind:<4} {tower:<5} {entry.file}: {checks}")
    click.echo(f"wrote {out} ({precision}); manifest {out / 'manifest.json'}")


# ---------------------------------------------------------------- bench


def _command_line(ctx: click.Context) -> str:
    """The command with every flag that has a value, as a user would retype it (for the record)."""
    import shlex

    argv = ["fklip", ctx.info_name or "bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is False and getattr(param, "secondary_opts", None):  # --no-fused and the like
            argv.append(param.secondary_opts[0])
            continue
        if value is None or value is False or value == ():
            continue
        flag = param.opts[0]
        values = [] if value is True else [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        argv += [flag] if not values else [x for v in values for x in (flag, v)]
    return shlex.join(argv)


@click.command()
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--model", default=None, help="Architecture with random weights (default ViT-B-32), or for --checkpoint.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Measure these weights instead of random ones.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow checkpoints that hold Python objects beyond tensors.")
@click.option("--engine", "engines", multiple=True,
              help="torch, onnx or trt; repeatable (default: every engine that can run here).")
@click.option("--precision", "precisions", multiple=True,
              help="fp32, amp, fp16, bf16 or int8; repeatable (default: fp32 int8 on the CPU, fp32 amp fp16 "
                   "bf16 on CUDA). Pairs an engine lacks are listed as skipped.")
@click.option("--batch", type=int, default=None, help="Images or texts per call [CPU 32, CUDA 1024].")
@click.option("--images", type=int, default=None, help="Demo images encoded per round [CPU 64, CUDA 8192].")
@click.option("--texts", type=int, default=None, help="Demo captions encoded per round [CPU 128, CUDA 16384].")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed rounds (figures are medians).")
@click.option("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads.")
@click.option("--topk-queries", type=int, default=None, help="Top-k queries [CPU 2048, CUDA 8192].")
@click.option("--topk-gallery", type=int, default=None, help="Top-k gallery vectors [CPU 65536, CUDA 1000000].")
@click.option("--k", type=int, default=10, show_default=True, help="Top-k: neighbours per query.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the inputs.")
@click.option("--fused/--no-fused", default=None,
              help="--engine torch: fklip's towers (SDPA attention) for fp32/fp16/bf16 [on for CUDA].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="--engine torch: CUDA graphs [on for CUDA].")
@click.option("--compile", "compile_", is_flag=True, help="--engine torch: torch.compile the towers.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the JSON line to this file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json-out file.")
def bench(device, model, checkpoint, trust_checkpoint, engines, precisions, batch, images, texts, repeats,
          threads, topk_queries, topk_gallery, k, seed, fused, cuda_graphs, compile_, json_out, overwrite) -> None:
    """Images/s, texts/s and top-k queries/s of fklip's engines against plain open_clip/PyTorch,
    measured in the same run. Prints a table, then one JSON line."""
    import json

    from fklip.config import BenchConfig, check_device

    cfg = BenchConfig(device=device, model=model, checkpoint=checkpoint, trust_checkpoint=trust_checkpoint,
                      engines=tuple(engines), precisions=tuple(precisions), batch=batch, images=images,
                      texts=texts, repeats=repeats, threads=threads, topk_queries=topk_queries,
                      topk_gallery=topk_gallery, k=k, seed=seed, json_out=json_out, fused=fused,
                      cuda_graphs=cuda_graphs, compile=compile_)
    check_device(device)
    if checkpoint is not None and not checkpoint.is_file():
        from fklip.errors import ConfigError

        raise ConfigError(f"--checkpoint {checkpoint}: no such file")
    from engines.bench import format_table, run_bench
    from fklip.io import OutputSet, check_outputs

    check_outputs({"--json-out": json_out}, {"--checkpoint": checkpoint}, overwrite=overwrite)
    with OutputSet([json_out] if json_out is not None else []) as outputs:  # claimed for the run
        result = run_bench(cfg, command=_command_line(click.get_current_context()))
        line = json.dumps(result)
        click.echo(format_table(result))
        click.echo(line)
        if json_out is not None:
            outputs.path(json_out).write_text(line + "\n", encoding="utf-8")


COMMANDS = [export, bench]
