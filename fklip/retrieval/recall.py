"""Recall@K and the original's score and failure JSON (spec 4.2, `compute_score`)."""

from __future__ import annotations

from typing import Mapping, Sequence

from fklip.errors import DataError, preview


class MissingPredictionError(DataError):
    """A gold key has no prediction. `.key` is the key object itself (an int or a str)."""

    def __init__(self, key: object) -> None:
        super().__init__(f"gold key {key!r} has no prediction: it is in the gold file "
                         "but missing from the predictions")
        self.key = key


def recall_at_ks(predictions: Mapping[str, Sequence[str]], gold: Mapping[str, Sequence[str]],
                 ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Any-hit recall over every gold key: a hit at K when any gold id is among the first K
    predicted ids. Keys and ids are already in their `id_key` string form. Predictions for keys
    absent from the gold are ignored.

    Returns {"total": number of gold keys, "hits": {K: count}, "recall": {K: count * 1.0 / total}}.
    Raises MissingPredictionError for the first gold key without a prediction, DataError for an
    empty gold.
    """
    if not gold:
        raise DataError("recall: the gold is empty; expected at least one key")
    hits = {k: 0 for k in ks}
    for key, gold_ids in gold.items():
        if key not in predictions:
            raise MissingPredictionError(key)
        ranked = predictions[key]
        wanted = set(gold_ids)
        for k in ks:
            hits[k] += not wanted.isdisjoint(ranked[:k])
    total = len(gold)
    return {"total": total, "hits": hits, "recall": {k: h * 1.0 / total for k, h in hits.items()}}


def score_json(hits: Mapping[int, int], total: int) -> dict:
    """The original's success output, with its float order: R = hits * 1.0 / total, mean of the
    three R, then each times 100. `json.dumps` of it matches the original's digits."""
    if total <= 0:
        raise DataError(f"recall: the gold has {total} keys; expected at least one")
    missing = [k for k in (1, 5, 10) if k not in hits]
    if missing:
        raise DataError(f"recall: hits lack K = {preview(missing)}; the score needs K = 1, 5, 10")
    r1, r5, r10 = (hits[k] * 1.0 / total for k in (1, 5, 10))
    mean_recall = (r1 + r5 + r10) / 3
    mean_recall, r1, r5, r10 = (x * 100 for x in (mean_recall, r1, r5, r10))
    return {"success": True, "score": mean_recall,
            "scoreJson": {"score": mean_recall, "mean_recall": mean_recall,
                          "r1": r1, "r5": r5, "r10": r10}}


def failure_json(key: object) -> dict:
    """The original's failure output; `key` (e.g. the missing gold key) keeps its type."""
    return {"errorDetail": key, "errorMsg": key, "score": 0, "scoreJson": {}, "success": False}
