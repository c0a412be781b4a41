"""Exact top-k and recall@K: one implementation shared by training and evaluation (spec 4.2).

Modules, each importing only those listed before it (kernel only lazily, from fused):

* codec: the int64 keys (score bits, inverted index) that both top-k paths select and merge;
* inputs: the `Gallery` type, reading gallery rows chunk by chunk, checking a search's arguments;
* fused: the fused Triton path for fp16/bf16 CUDA features (`resolve_method`, `search_fused`);
* chunked: the torch path and the entry points (`topk_chunked`, `topk_both_ways`, `topk_reference`);
* kernel: the Triton kernel itself, the only module that imports triton;
* recall: recall@K and the original's score and failure JSON.

The names below are the package's public surface: `from fklip.retrieval import topk_chunked`.
Importing the package does not import triton.
"""

from fklip.retrieval.chunked import (
                                     SCORE_TILE,
                                     tile_sizes,
                                     topk_both_ways,
                                     topk_chunked,
                                     topk_reference,
)
from fklip.retrieval.inputs import METHODS, Gallery
from fklip.retrieval.recall import (
                                     MissingPredictionError,
                                     failure_json,
                                     recall_at_ks,
                                     score_json,
)

__all__ = [
    "METHODS",
    "SCORE_TILE",
    "Gallery",
    "MissingPredictionError",
    "failure_json",
    "recall_at_ks",
    "score_json",
    "tile_sizes",
    "topk_both_ways",
    "topk_chunked",
    "topk_reference",
]
