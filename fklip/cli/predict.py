"""`fklip predict`: exact top-k predictions and recall scores from feature files."""

from __future__ import annotations

from pathlib import Path

import click

from fklip.cli.options import echo_recalls, search_options


@click.command()
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
@search_options
def predict(image_feats, text_feats, output_images, output_texts, text_standard_path, image_standard_path,
            text_out_path, image_out_path, device, overwrite, top_k, gallery_chunk, query_chunk) -> None:
    """Exact top-k predictions and recall scores from feature files (the original's eval/predict_evaluate.py)."""
    from fklip.config import PredictConfig, SearchConfig, check_device
    from fklip.predict import run_predict

    search = SearchConfig(top_k=top_k, query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                          device=check_device(device))
    cfg = PredictConfig(image_feats=image_feats, text_feats=text_feats, search=search,
                        output_images=output_images, output_texts=output_texts,
                        text_standard_path=text_standard_path, image_standard_path=image_standard_path,
                        text_out_path=text_out_path, image_out_path=image_out_path, overwrite=overwrite)
    echo_recalls(run_predict(cfg))


COMMANDS = [predict]
