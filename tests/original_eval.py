"""A literal, slow re-statement of the original eval/predict_evaluate.py (spec 4.2): the oracle.

Pure Python: per-query lists of (id, score) pairs, Python's stable sort on descending score,
ids compared exactly as written (no normalisation), the original's float order for the scores.
"""

from __future__ import annotations

import json


def read_feature_lines(path):
    ids, feats = [], []
    with open(path) as f:
        for line in f:
            obj = json.loads(line)
            ids.append(obj["query_id"] if "query_id" in obj else obj["image_id"])
            feats.append(obj["feature"])
    return ids, feats


def predict(query_ids, query_feats, gallery_ids, gallery_feats, top_k):
    """{query id: [top-k gallery ids]}, in query order, and the prediction lines."""
    out = {}
    for qid, q in zip(query_ids, query_feats):
        pairs = [(gid, sum(a * b for a, b in zip(q, g))) for gid, g in zip(gallery_ids, gallery_feats)]
        pairs = sorted(pairs, key=lambda x: x[1], reverse=True)  # stable: ties keep file order
        out[qid] = [gid for gid, _ in pairs[:top_k]]
    return out


def compute_score(gold: dict, predictions: dict) -> dict:
    """The original's compute_score: any-hit at 1/5/10 over every gold key; KeyError if missing."""
    r1 = r5 = r10 = 0
    for key, gold_ids in gold.items():
        pred = predictions[key]
        r1 += bool(set(gold_ids) & set(pred[:1]))
        r5 += bool(set(gold_ids) & set(pred[:5]))
        r10 += bool(set(gold_ids) & set(pred[:10]))
    r1, r5, r10 = r1 * 1.0 / len(gold), r5 * 1.0 / len(gold), r10 * 1.0 / len(gold)
    mean = (r1 + r5 + r10) / 3
    return {"success": True, "score": mean * 100,
            "scoreJson": {"score": mean * 100, "mean_recall": mean * 100, "r1": r1 * 100,
                          "r5": r5 * 100, "r10": r10 * 100}}


def evaluate(gold: dict, predictions: dict) -> str:
    """The score file's text, success or failure, as the original writes it."""
    try:
        result = compute_score(gold, predictions)
    except Exception as e:  # the original catches everything
        result = {"errorDetail": e.args[0], "errorMsg": e.args[0], "score": 0, "scoreJson": {},
                  "success": False}
    return json.dumps(result)
