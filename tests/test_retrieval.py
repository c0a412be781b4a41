"""fklip.retrieval: chunked top-k against its full-matrix and pure-Python oracles; recall and the
score JSON against hand-computed values and the README's digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fklip.errors import ConfigError, DataError
from fklip.retrieval import (
    MissingPredictionError,
    chunked,
    failure_json,
    recall_at_ks,
    score_json,
    topk_both_ways,
    topk_chunked,
    topk_reference,
)
from fklip.retrieval.chunked import _chunk_top_keys, _group_size, _top_keys
from fklip.retrieval.codec import decode, keys_from, merge


def grid_features(rows: int, dim: int, levels: int = 8, seed: int = 0) -> torch.Tensor:
    """Features on the grid {-1, ..., -1/levels, 0, ..., 1}, levels a power of two: every dot product
    is exact in float32 (and fp16, bf16 hold the features exactly), so any summation order gives the
    same bits, and ties abound."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, (rows, dim), generator=gen).float() / levels


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]):
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert got[0].shape == want[0].shape == got[1].shape
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))  # bitwise


# ---- top-k against the full-matrix reference ----

@pytest.mark.parametrize("n_query,n_gallery,dim", [(1, 1, 1), (5, 3, 4), (13, 301, 16), (33, 129, 2)])
@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1, 1), (3, 7), (16, 100), (4096, 65536)])
@pytest.mark.parametrize("k", [1, 5, 10, 128, 1000, 5000])
def test_topk_matches_reference(n_query, n_gallery, dim, query_chunk, gallery_chunk, k):
    queries, gallery = grid_features(n_query, dim, seed=1), grid_features(n_gallery, dim, seed=2)
    got = topk_chunked(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert_same(got, topk_reference(queries, gallery, k))
    assert got[0].shape == (n_query, min(k, n_gallery))


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(7, 300), (16, 1024), (40, 999)])
@pytest.mark.parametrize("k", [999, 1000, 1500])
def test_topk_large_k(query_chunk, gallery_chunk, k):
    queries, gallery = grid_features(37, 8, levels=2, seed=14), grid_features(2503, 8, levels=2, seed=15)
    got = topk_chunked(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert_same(got, topk_reference(queries, gallery, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_half_dtypes_are_scored_in_float32(dtype):
    queries, gallery = grid_features(20, 8, seed=3), grid_features(300, 8, seed=4)
    got = topk_chunked(queries.to(dtype), gallery.to(dtype), 17, query_chunk=6, gallery_chunk=50)
    assert_same(got, topk_reference(queries, gallery, 17))
    assert_same(got, topk_reference(queries.to(dtype), gallery.to(dtype), 17))


def test_topk_matches_python_stable_sort():
    """The original: (id, score) pairs sorted by score with Python's stable sort, reverse=True."""
    queries, gallery = grid_features(9, 3, levels=2, seed=5), grid_features(40, 3, levels=2, seed=6)
    values, indices = topk_chunked(queries, gallery, 12, query_chunk=4, gallery_chunk=5)
    for qi, query in enumerate(queries.tolist()):
        pairs = [(gi, sum(a * b for a, b in zip(query, row))) for gi, row in enumerate(gallery.tolist())]
        ranked = sorted(pairs, key=lambda p: p[1], reverse=True)[:12]
        assert indices[qi].tolist() == [gi for gi, _ in ranked]
        assert values[qi].tolist() == [score for _, score in ranked]


def test_topk_all_tied_keeps_gallery_order():
    queries, gallery = torch.ones(3, 4), torch.ones(50, 4)
    values, indices = topk_chunked(queries, gallery, 20, query_chunk=2, gallery_chunk=7)
    assert indices.tolist() == [list(range(20))] * 3
    assert torch.all(values == 4.0)


@pytest.mark.parametrize("k", [1, 7, 30])
def test_topk_every_row_tied_matches_reference(k):
    """A gallery of 40 vectors each repeated 25 times (as an eval set with duplicate images): every
    row of every tile takes the exact tie path (whole tiles at once), with entries above the tied
    value and ties straddling the cut; both functions, both directions, against the reference."""
    queries = grid_features(70, 6, levels=2, seed=3)
    gallery = grid_features(40, 6, levels=2, seed=4).repeat(25, 1)  # row i == row i + 40 == ...
    assert_same(topk_chunked(queries, gallery, k, query_chunk=32, gallery_chunk=300),
                topk_reference(queries, gallery, k))
    forward, backward = topk_both_ways(queries, gallery, k, query_chunk=32, gallery_chunk=300)
    assert_same(forward, topk_reference(queries, gallery, k))
    assert_same(backward, topk_reference(gallery, queries, k))


def test_topk_negative_zero_ties_with_positive_zero():
    queries = torch.tensor([[1.0], [-1.0]])
    gallery = torch.tensor([[-0.0], [0.0], [-0.0], [-1.0], [2.0]])
    values, indices = topk_chunked(queries, gallery, 5, gallery_chunk=2)
    assert indices.tolist() == [[4, 0, 1, 2, 3], [3, 0, 1, 2, 4]]
    assert not torch.signbit(values[values == 0]).any()  # every zero reported as +0.0
    assert_same((values, indices), topk_reference(queries, gallery, 5))


def test_keys_order_like_scores_then_index():
    special = [float("-inf"), -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 0.5, 1.0, 3e38, float("inf")]
    values = torch.tensor(special * 2, dtype=torch.float32)
    indices = torch.arange(values.numel())
    keys = keys_from(values, indices)
    order = torch.argsort(keys, descending=True).tolist()
    want = sorted(range(values.numel()), key=lambda i: (-(values[i].item() + 0.0), i))
    assert order == want
    decoded_values, decoded_indices = decode(keys)
    assert torch.equal(decoded_indices, indices)
    assert torch.equal(decoded_values, values + 0.0)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16])
def test_topk_memmap_gallery(tmp_path, np_dtype):
    queries, gallery = grid_features(11, 6, seed=7), grid_features(333, 6, seed=8)
    path = tmp_path / "gallery.bin"
    mm = np.memmap(path, dtype=np_dtype, mode="w+", shape=tuple(gallery.shape))
    mm[:] = gallery.numpy()
    mm.flush()
    mm = np.memmap(path, dtype=np_dtype, mode="r", shape=tuple(gallery.shape))
    got = topk_chunked(queries, mm, 40, query_chunk=4, gallery_chunk=64)
    assert_same(got, topk_reference(queries, gallery, 40))


def assert_close_to_reference(got, queries, gallery, min_clear: int) -> None:
    """Top-10 `got` (values, indices) of arbitrary floats against the full-matrix reference:
    values within 1e-5, indices equal on the rows (at least `min_clear`) whose reference ranking
    has gaps above 1e-4 (elsewhere rounding may swap neighbours), values sorted."""
    values, indices = got
    ref_values, ref_indices = topk_reference(queries, gallery, 11)
    torch.testing.assert_close(values, ref_values[:, :10], rtol=0, atol=1e-5)
    clear = (ref_values[:, :-1] - ref_values[:, 1:]).min(dim=1).values > 1e-4  # (rows,)
    assert clear.sum() >= min_clear
    assert torch.equal(indices[clear], ref_indices[clear, :10])
    assert torch.all(values[:, :-1] >= values[:, 1:])


def test_topk_float_features_close_to_reference():
    """Arbitrary floats: BLAS may round a chunk's dot products differently in the last bit, so
    compare values with a tolerance and indices wherever the reference ranking has clear gaps."""
    gen = torch.Generator().manual_seed(9)
    queries = torch.nn.functional.normalize(torch.randn(30, 64, generator=gen), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(700, 64, generator=gen), dim=1)
    got = topk_chunked(queries, gallery, 10, query_chunk=7, gallery_chunk=90)
    assert_close_to_reference(got, queries, gallery, min_clear=21)


def test_topk_progress_and_no_grad(capsys):
    queries = grid_features(10, 4, seed=10).requires_grad_()
    gallery = grid_features(30, 4, seed=11)
    values, indices = topk_chunked(queries, gallery, 3, query_chunk=3, progress=True)
    assert not values.requires_grad
    assert "top-k" in capsys.readouterr().err
    assert_same((values, indices), topk_reference(queries.detach(), gallery, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_cuda_matches_cpu_reference(dtype):
    queries, gallery = grid_features(50, 32, seed=12), grid_features(2000, 32, seed=13)
    want = topk_reference(queries, gallery, 100)
    on_gpu = topk_chunked(queries.to("cuda", dtype), gallery.to(dtype), 100,
                          query_chunk=16, gallery_chunk=300)
    assert on_gpu[0].device.type == "cuda"
    assert_same((on_gpu[0].cpu(), on_gpu[1].cpu()), want)
    from_numpy = topk_chunked(queries.cuda(), gallery.numpy(), 100, gallery_chunk=333)
    assert_same((from_numpy[0].cpu(), from_numpy[1].cpu()), want)


# ---- the group-max selection and the score tiles ----

def scores_for(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) score block: random floats, few distinct values (ties everywhere), or a
    transposed view (the layout `topk_both_ways` selects columns from)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(rows, cols, generator=gen)
    if kind == "ties":
        return torch.randint(-6, 7, (rows, cols), generator=gen).float() / 4
    return torch.randn(cols, rows, generator=gen).T  # "transposed": stride 1 along rows


@pytest.mark.parametrize("kind", ["random", "ties", "transposed"])
@pytest.mark.parametrize("cols", [1000, 1003, 4099])
@pytest.mark.parametrize("m", [1, 3, 10, 40])
def test_group_selection_matches_plain_topk(kind, cols, m):
    """`_top_keys` (group maxima, then candidates) against `_chunk_top_keys` (topk on the whole
    row) on the same scores: the same key sets (each in any order; `merge` sorts them), ties and
    unread groups included."""
    scores = scores_for(kind, 57, cols, seed=cols + m)
    assert _group_size(cols, m) >= 4 and cols // _group_size(cols, m) > m  # the grouped path runs
    assert torch.equal(merge(None, _top_keys(scores, m, 123), m),
                       merge(None, _chunk_top_keys(scores.contiguous(), m, 123), m))


def test_group_selection_tie_with_an_unread_group():
    """Row 0 holds 5.0 in two groups (columns 5 and 6) but m = 3 reads only one of them: the unread
    group's max ties the 3rd value, so the row is re-ranked and the lower column, 5, wins."""
    scores = torch.zeros(2, 64)
    scores[0, [7, 9]] = 9.0  # the two best, in two groups
    scores[0, [5, 6]] = 5.0  # heads of two more groups: the maxima's topk may read either first
    scores[1] = torch.arange(64.0)
    for m in (1, 2, 3, 4):
        assert torch.equal(merge(None, _top_keys(scores, m, 0), m),
                           merge(None, _chunk_top_keys(scores, m, 0), m))
    assert decode(merge(None, _top_keys(scores, 3, 0), 3))[1][0].tolist() == [7, 9, 5]


def test_score_tiles_smaller_than_chunks(monkeypatch):
    """Tiles capped below the chunk sizes: several tiles per gallery chunk, offsets still right."""
    monkeypatch.setattr(chunked, "SCORE_TILE", (7, 50))
    queries, gallery = grid_features(40, 8, seed=16), grid_features(333, 8, seed=17)
    for k in (1, 10, 60):
        got = topk_chunked(queries, gallery, k, query_chunk=16, gallery_chunk=120)
        assert_same(got, topk_reference(queries, gallery, k))
        ab, ba = topk_both_ways(queries, gallery, k, query_chunk=16, gallery_chunk=120)
        assert_same(ab, topk_reference(queries, gallery, k))
        assert_same(ba, topk_reference(gallery, queries, k))


# ---- both directions from one matmul ----

BOTH_WAYS_CASES = [  # (n_query, n_gallery, dim, query_chunk, gallery_chunk)
    *[(1, 1, 1, *chunks) for chunks in [(1, 1), (3, 7)]],
    *[(5, 3, 4, *chunks) for chunks in [(1, 1), (3, 7), (4096, 65536)]],
    *[(13, 301, 16, *chunks) for chunks in [(3, 7), (16, 100), (4096, 65536)]],
    # large enough for the grouped selection in both directions
    *[(n_query, n_gallery, 8, *chunks) for n_query, n_gallery in [(300, 701), (1200, 90)]
      for chunks in [(61, 256), (128, 500), (4096, 65536)]],
]


@pytest.mark.parametrize("n_query,n_gallery,dim,query_chunk,gallery_chunk", BOTH_WAYS_CASES)
@pytest.mark.parametrize("k", [1, 10, 128])
def test_topk_both_ways_matches_reference(n_query, n_gallery, dim, query_chunk, gallery_chunk, k):
    queries, gallery = grid_features(n_query, dim, seed=18), grid_features(n_gallery, dim, seed=19)
    ab, ba = topk_both_ways(queries, gallery, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert_same(ab, topk_reference(queries, gallery, k))
    assert_same(ba, topk_reference(gallery, queries, k))
    assert ab[0].shape == (n_query, min(k, n_gallery)) and ba[0].shape == (n_gallery, min(k, n_query))


def test_topk_both_ways_equals_two_calls():
    queries = grid_features(500, 16, levels=2, seed=20)
    gallery = grid_features(2100, 16, levels=2, seed=21)
    ab, ba = topk_both_ways(queries, gallery, 25, query_chunk=200, gallery_chunk=1000)
    assert_same(ab, topk_chunked(queries, gallery, 25, query_chunk=64, gallery_chunk=333))
    assert_same(ba, topk_chunked(gallery, queries, 25, query_chunk=1000, gallery_chunk=200))


def test_topk_both_ways_float_features_close_to_reference():
    """Arbitrary floats, as `test_topk_float_features_close_to_reference`, in both directions."""
    gen = torch.Generator().manual_seed(22)
    queries = torch.nn.functional.normalize(torch.randn(300, 64, generator=gen), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(900, 64, generator=gen), dim=1)
    both = topk_both_ways(queries, gallery, 10, query_chunk=128, gallery_chunk=400)
    for got, (a, b) in zip(both, [(queries, gallery), (gallery, queries)]):
        assert_close_to_reference(got, a, b, min_clear=101)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_both_ways_half_dtypes_and_memmap(tmp_path, dtype):
    queries, gallery = grid_features(60, 8, seed=23), grid_features(700, 8, seed=24)
    ab, ba = topk_both_ways(queries.to(dtype), gallery.to(dtype), 12, query_chunk=25,
                            gallery_chunk=300)
    assert_same(ab, topk_reference(queries, gallery, 12))
    assert_same(ba, topk_reference(gallery, queries, 12))
    mm = np.memmap(tmp_path / "gallery.bin", dtype=np.float16, mode="w+",
                   shape=tuple(gallery.shape))
    mm[:] = gallery.numpy()
    ab, ba = topk_both_ways(queries, mm, 12, query_chunk=25, gallery_chunk=300)
    assert_same(ab, topk_reference(queries, gallery, 12))
    assert_same(ba, topk_reference(gallery, queries, 12))


def test_topk_both_ways_progress(capsys):
    queries, gallery = grid_features(10, 4, seed=25), grid_features(30, 4, seed=26)
    ab, _ = topk_both_ways(queries.requires_grad_(), gallery, 3, query_chunk=3, progress=True)
    assert not ab[0].requires_grad
    assert "top-k both ways" in capsys.readouterr().err


# ---- top-k errors ----

def test_topk_reports_every_non_finite_row():
    queries, gallery = torch.zeros(4, 3), torch.zeros(10, 3)
    queries[2, 1] = float("inf")
    gallery[[1, 7], 0] = float("nan")
    gallery[8, 2] = float("-inf")
    with pytest.raises(DataError) as info:
        topk_chunked(queries, gallery, 2, query_chunk=3, gallery_chunk=4)
    message = str(info.value)
    assert "queries: 1 of 4 rows" in message and "(rows 2)" in message
    assert "gallery: 3 of 10 rows" in message and "(rows 1, 7, 8)" in message


def test_topk_large_finite_rows_are_not_flagged():
    queries = torch.tensor([[3e38, 3e38]])  # the row sum overflows, the row itself is finite
    gallery = torch.tensor([[1e-30, 0.0], [0.0, 2e-30]])
    _, indices = topk_chunked(queries, gallery, 2)
    assert indices.tolist() == [[1, 0]]


def test_topk_overflow_to_nan_is_an_error():
    queries, gallery = torch.tensor([[1e30, 1e30]]), torch.tensor([[1e30, -1e30], [1.0, 1.0]])
    with pytest.raises(DataError, match="NaN"):
        topk_chunked(queries, gallery, 1)


@pytest.mark.parametrize("kind", ["random", "transposed"])
@pytest.mark.parametrize("nan_col", [0, 517, 1002])
def test_nan_score_in_grouped_selection_is_an_error(kind, nan_col):
    """Whether a NaN lands in a picked group, an unpicked one or the tail, amax carries it into
    the group maxima and topk picks it first. (A score block is used directly: whether a BLAS
    turns an overflow into NaN or inf depends on its kernel.)"""
    scores = scores_for(kind, 70, 1003, seed=27)
    scores[33, nan_col] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        _top_keys(scores, 3, 0)


@pytest.mark.parametrize("queries,gallery,match", [
    (torch.zeros(2, 3), torch.zeros(5, 4), "dim 3 but gallery rows have dim 4"),
    (torch.zeros(3), torch.zeros(5, 3), "queries must be 2-D"),
    (torch.zeros(2, 3), torch.zeros(0, 3), "gallery is empty"),
    (torch.zeros(0, 3), torch.zeros(5, 3), "queries is empty"),
    (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(5, 3), "queries must be float32"),
    (torch.zeros(2, 3), np.zeros((5, 3), dtype=np.int64), "gallery must be float32 or float16"),
    (np.zeros((2, 3), dtype=np.float32), torch.zeros(5, 3), "queries must be a torch tensor"),
    ([[0.0]], torch.zeros(5, 3), "queries must be a torch tensor"),
])
def test_topk_bad_inputs(queries, gallery, match):
    with pytest.raises(DataError, match=match):
        topk_chunked(queries, gallery, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k must be an int >= 1"),
    ({"k": 2.0}, "k must be an int >= 1"),
    ({"k": 1, "query_chunk": 0}, "query_chunk must"),
    ({"k": 1, "gallery_chunk": -1}, "gallery_chunk must"),
])
def test_topk_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        topk_chunked(torch.zeros(2, 3), torch.zeros(5, 3), **kwargs)
    with pytest.raises(ConfigError, match=match):
        topk_both_ways(torch.zeros(2, 3), torch.zeros(5, 3), **kwargs)


# ---- recall and the score JSON ----

def test_recall_any_hit_hand_computed():
    gold = {"q1": ["a"], "q2": ["b", "z"], "q3": ["c"], "q4": ["d", "e"]}
    predictions = {
        "q1": ["a", "x", "y"],                                 # hit at 1
        "q2": ["x", "y", "z", "b"],                            # hit at 5 (z at rank 3)
        "q3": ["x"] * 9 + ["c"],                               # hit at 10 only (rank 10)
        "q4": ["x"] * 10 + ["d"],                              # past 10: no hit
        "extra": ["a"],                                        # not in the gold: ignored
    }
    result = recall_at_ks(predictions, gold)
    assert result["total"] == 4
    assert result["hits"] == {1: 1, 5: 2, 10: 3}
    assert result["recall"] == {1: 0.25, 5: 0.5, 10: 0.75}
    assert recall_at_ks(predictions, gold, ks=(3, 11))["hits"] == {3: 2, 11: 4}


def test_recall_missing_prediction():
    with pytest.raises(MissingPredictionError) as info:
        recall_at_ks({"q1": ["a"]}, {"q1": ["a"], "94": ["b"]})
    assert isinstance(info.value, DataError)
    assert info.value.key == "94"
    assert "'94'" in str(info.value) and "predictions" in str(info.value)
    assert failure_json(info.value.key)["errorDetail"] == "94"


def test_recall_empty_gold():
    with pytest.raises(DataError, match="gold is empty"):
        recall_at_ks({"q1": ["a"]}, {})


def test_score_json_reproduces_readme_digits():
    expected = ('{"success": true, "score": 12.189873028560887, "scoreJson": '
                '{"score": 12.189873028560887, "mean_recall": 12.189873028560887, '
                '"r1": 4.60233037169121, "r5": 13.078365665447167, "r10": 18.88892304854429}}')
    assert json.dumps(score_json({1: 1497, 5: 4254, 10: 6144}, 32527)) == expected


def test_score_json_from_recall():
    gold = {"a": ["1"], "b": ["2"], "c": ["3"]}
    result = recall_at_ks({"a": ["1"], "b": ["0", "2"], "c": ["0"]}, gold)
    scores = score_json(result["hits"], result["total"])
    r1, r5, r10 = 1 * 1.0 / 3, 2 * 1.0 / 3, 2 * 1.0 / 3
    assert scores["scoreJson"] == {"score": (r1 + r5 + r10) / 3 * 100,
                                   "mean_recall": (r1 + r5 + r10) / 3 * 100,
                                   "r1": r1 * 100, "r5": r5 * 100, "r10": r10 * 100}
    assert list(scores) == ["success", "score", "scoreJson"]


@pytest.mark.parametrize("hits,total,match", [({1: 0, 5: 0, 10: 0}, 0, "0 keys"),
                                              ({1: 0, 5: 0}, 3, "K = 10")])
def test_score_json_errors(hits, total, match):
    with pytest.raises(DataError, match=match):
        score_json(hits, total)


@pytest.mark.parametrize("key", [94, "94"])
def test_failure_json_keeps_key_type(key):
    expected = {"errorDetail": key, "errorMsg": key, "score": 0, "scoreJson": {}, "success": False}
    assert failure_json(key) == expected
    assert list(failure_json(key)) == list(expected)
    assert json.dumps(failure_json(key)) == json.dumps(expected)
