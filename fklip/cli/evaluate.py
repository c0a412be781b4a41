"""`fklip extract` and `fklip eval`: a checkpoint or an export run over image archives and captions."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.cli.options import (
    echo_recalls,
    encode_config,
    encode_options,
    search_options,
)
from fklip.errors import ConfigError


@click.command()
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
@encode_options
def extract(extract_image_feats, extract_text_feats, image_data, text_data, image_feat_output_path,
            text_feat_output_path, fmt, dtype, overwrite, **encode) -> None:
    """Encode images and captions into feature files (the original's eval/extract_features.py)."""
    from engines.extract import run_extract
    from fklip.config import ExtractConfig

    for flag, wanted, data, data_flag in (("--extract-image-feats", extract_image_feats, image_data, "--image-data"),
                                          ("--extract-text-feats", extract_text_feats, text_data, "--text-data")):
        if wanted and data is None:
            raise ConfigError(f"{flag} needs {data_flag}")
        if data is not None and not wanted:
            raise ConfigError(f"{data_flag} is given but {flag} is not; pass {flag} to extract it")
    cfg = ExtractConfig(encode=encode_config(**encode), image_data=image_data, text_data=text_data,
                        image_output=image_feat_output_path, text_output=text_feat_output_path,
                        fmt=fmt, dtype=dtype, overwrite=overwrite)
    for item in run_extract(cfg):
        click.echo(f"{item['kind']} features: {item['count']} rows -> {', '.join(item['files'])}")


@click.command("eval")
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
@encode_options
@search_options
def eval_command(image_data, text_data, image_standard_path, output_dir, save_features, overwrite, top_k,
                 gallery_chunk, query_chunk, **encode) -> None:
    """Checkpoint and raw validation files to predictions, scores and metrics, in one command.

    Under torchrun, encoding and search are sharded across the processes and merged exactly.
    """
    from engines.eval import run_eval
    from fklip.config import EvalConfig, SearchConfig

    enc = encode_config(**encode)
    search = SearchConfig(top_k=top_k, query_chunk=query_chunk, gallery_chunk=gallery_chunk, device=enc.device)
    cfg = EvalConfig(encode=enc, search=search, image_data=image_data, text_data=text_data,
                     output_dir=output_dir, image_standard_path=image_standard_path,
                     save_features=save_features, overwrite=overwrite)
    metrics = run_eval(cfg)
    if metrics is not None:
        echo_recalls(metrics)
        t = metrics["timings_s"]
        click.echo(f"load {t['load']:.1f}s, encode {t['encode']:.1f}s, search {t['search']:.1f}s, "
                   f"total {t['total']:.1f}s; wrote {output_dir}")


COMMANDS = [extract, eval_command]
