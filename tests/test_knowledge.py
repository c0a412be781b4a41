"""fklip.knowledge: vocabularies and concept slots on hand-built and demo files; batched MMR and
concept->image retrieval against pure-Python oracles; prototype features against a loop."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Sequence

import pytest
import torch

from fklip.data.jsonl import TrainQuery, read_train_queries
from fklip.errors import ConfigError, DataError
from fklip.knowledge import (
    PROMPT,
    RowLookup,
    Vocabulary,
    build_concept_table,
    concept_slots,
    data_concepts,
    kb_concepts,
    load_vocabulary,
    mmr,
    prototype_features,
    retrieve_concept_images,
    with_hypernyms,
)
from tests.conftest import HANG_S, ROOT, write_lines

# ---- helpers ----

def make_vocab(tmp_path, fathers: dict[str, str], extra: Sequence[str] = (),
               name: str = "v") -> Vocabulary:
    """A vocabulary of the phrases of `fathers` (and `extra`), ids 100, 101, ... in that order."""
    phrases = [*fathers, *extra]
    queries = [{"query_id": 100 + i, "query_text": PROMPT + p, "phrase": p}
               for i, p in enumerate(phrases)]
    links = [{"query_id": 100 + i, "phrase": p, "phrase_father": f}
             for i, (p, f) in enumerate(fathers.items())]
    return load_vocabulary(write_lines(tmp_path / f"{name}_q.jsonl", queries),
                           write_lines(tmp_path / f"{name}_f.jsonl", links))


def query(phrases=(), match=()) -> TrainQuery:
    return TrainQuery(query_id=1, query_text="x", item_ids=(1,), phrases=tuple(phrases),
                      match_phrases=tuple(match))


CHAIN = {"striped short sleeve t-shirt": "short sleeve t-shirt", "short sleeve t-shirt": "t-shirt",
         "t-shirt": "", "red t-shirt": "t-shirt", "long sleeve shirt": "shirt", "shirt": "",
         "slim trousers": "trousers", "trousers": "", "mini skirt": "skirt", "skirt": "",
         "wide leg trousers": "trousers"}


@pytest.fixture
def chain(tmp_path) -> Vocabulary:
    return make_vocab(tmp_path, CHAIN)


def unit_grid(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Vectors with exactly 4 entries +-1 (norm 2): normalised entries are +-0.5 and every cosine is
    an exact multiple of 1/4, so ties abound and any summation order gives the same bits."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(rows, dim, dtype=torch.float64)
    for r in range(rows):
        cols = torch.randperm(dim, generator=gen)[:4]
        out[r, cols] = torch.randint(0, 2, (4,), generator=gen).double() * 2 - 1
    return out


# ---- the MMR oracle, literally from the spec formula ----

def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else list(v)


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(unit(a), unit(b)))


def mmr_oracle(concept: list[float], cands: list[list[float]], keep: int,
               diversity: float) -> list[int]:
    """Python floats and loops; strict '>' so the lowest position wins a tie; -1 padding."""
    relevance = [cos(c, concept) for c in cands]
    picked: list[int] = []
    while len(picked) < min(keep, len(cands)):
        best, best_i = None, None
        for i in range(len(cands)):
            if i in picked:
                continue
            if not picked:
                s = relevance[i]
            else:
                closest = max(cos(cands[i], cands[p]) for p in picked)
                s = (1 - diversity) * relevance[i] - diversity * closest
            if best is None or s > best:
                best, best_i = s, i
        picked.append(best_i)
    return picked + [-1] * (keep - len(picked))


def mmr_oracle_batch(concept_emb: torch.Tensor, cand_emb: torch.Tensor, keep: int,
                     diversity: float) -> list[list[int]]:
    return [mmr_oracle(c.tolist(), k.tolist(), keep, diversity)
            for c, k in zip(concept_emb, cand_emb)]


# ---- MMR ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep,diversity", [(10, 0.8), (20, 0.8), (5, 0.3), (10, 0.0), (10, 1.0)])
def test_mmr_matches_oracle_on_random_data(dtype, keep, diversity):
    gen = torch.Generator().manual_seed(keep)
    concept = torch.randn(7, 8, generator=gen, dtype=dtype)  # (C, D)
    cands = torch.randn(7, 20, 8, generator=gen, dtype=dtype) * 3  # (C, K, D), not normalised
    got = mmr(concept, cands, keep=keep, diversity=diversity)
    assert got.dtype == torch.int64 and got.shape == (7, keep)
    assert got.tolist() == mmr_oracle_batch(concept.double(), cands.double(), keep, diversity)


@pytest.mark.parametrize("seed", range(5))
def test_mmr_tie_rule_matches_oracle_on_exact_ties(seed):
    concept, cands = unit_grid(7, 8, seed), unit_grid(7 * 20, 8, seed + 100).view(7, 20, 8)
    cands[:, 10:] = cands[:, :10]  # every candidate has an exact twin
    got = mmr(concept, cands, keep=10)
    assert got.tolist() == mmr_oracle_batch(concept, cands, 10, 0.8)


def test_mmr_identical_candidates_are_taken_in_position_order():
    cands = torch.ones(2, 6, 4)
    assert mmr(torch.ones(2, 4), cands, keep=4).tolist() == [[0, 1, 2, 3]] * 2
    # a relevant twin of the first pick is penalised: position 2 (orthogonal) comes next
    cands = torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0]]])
    assert mmr(torch.tensor([[1.0, 0.1]]), cands, keep=3).tolist() == [[0, 2, 1]]


def test_mmr_pads_when_fewer_candidates_than_keep():
    got = mmr(torch.randn(3, 4), torch.randn(3, 4, 4), keep=10)
    assert got.shape == (3, 10) and (got[:, 4:] == -1).all()
    assert sorted(got[0, :4].tolist()) == [0, 1, 2, 3]
    assert (mmr(torch.randn(3, 4), torch.randn(3, 0, 4), keep=2) == -1).all()


def test_mmr_rejects_bad_shapes():
    with pytest.raises(DataError, match="cand_emb"):
        mmr(torch.randn(3, 4), torch.randn(2, 5, 4))


# ---- retrieval over the whole KB against brute force ----

def retrieve_oracle(concept: torch.Tensor, kb: torch.Tensor, k: int, keep: int, diversity: float):
    """Full score matrix + stable sort for the top-k, then the oracle MMR, mapped to KB rows."""
    c = torch.nn.functional.normalize(concept.float(), dim=-1)
    g = torch.nn.functional.normalize(kb.float(), dim=-1)
    order = torch.sort(-(c @ g.T), dim=1, stable=True).indices[:, :k]  # (C, min(k, M))
    out = []
    for ci, rows in enumerate(order.tolist()):
        pos = mmr_oracle(concept[ci].tolist(), [kb[r].tolist() for r in rows], keep, diversity)
        out.append([rows[p] if p >= 0 else -1 for p in pos])
    return out


@pytest.mark.parametrize("n_kb", [1, 7, 19, 20, 57, 300])
@pytest.mark.parametrize("chunks", [(4, 10, 3), (4096, 65536, 1024)])
def test_retrieve_matches_brute_force(n_kb, chunks):
    concept, kb = unit_grid(11, 16, seed=n_kb), unit_grid(n_kb, 16, seed=n_kb + 1)
    query_chunk, gallery_chunk, concept_chunk = chunks
    got = retrieve_concept_images(concept.float(), kb.float(), k=20, keep=10, diversity=0.8,
                                  query_chunk=query_chunk, gallery_chunk=gallery_chunk,
                                  concept_chunk=concept_chunk)
    assert got.shape == (11, 10) and got.dtype == torch.int64
    assert got.tolist() == retrieve_oracle(concept, kb, 20, 10, 0.8)
    if n_kb < 10:
        assert (got[:, n_kb:] == -1).all()


def test_retrieve_random_features_and_no_concepts():
    gen = torch.Generator().manual_seed(3)
    concept, kb = torch.randn(9, 8, generator=gen), torch.randn(123, 8, generator=gen)
    want = retrieve_oracle(concept, kb, 20, 10, 0.8)
    assert retrieve_concept_images(concept, kb).tolist() == want
    assert retrieve_concept_images(torch.zeros(0, 8), kb).shape == (0, 10)
    with pytest.raises(DataError, match="NaN"):
        retrieve_concept_images(concept, torch.full((5, 8), float("nan")))


# ---- vocabulary ----

def test_load_vocabulary_refuses_repeated_phrases_and_ids(tmp_path):
    """The original kept the last line for a repeated phrase (phrase -> id) or id (id -> prompt
    row), silently taking another concept: fklip refuses both, naming the lines."""
    queries = write_lines(tmp_path / "q.jsonl", [
        {"query_id": 0, "query_text": "a photo of bag", "phrase": "bag"},
        {"query_id": 1, "query_text": "a photo of red bag", "phrase": "red bag"},
        {"query_id": 2, "query_text": "a photo of bag!", "phrase": "bag"},
        {"query_id": 1, "query_text": "a photo of blue bag", "phrase": "blue bag"},
    ])
    with pytest.raises(DataError) as e:
        load_vocabulary(queries)
    msg = str(e.value)
    assert "q.jsonl: bad concept queries file: 2 problems" in msg and "\n" not in msg
    assert "line 4: duplicate query_id 1 (first on line 2)" in msg
    assert 'line 3: duplicate phrase "bag" (first on line 1)' in msg
    fathers = write_lines(tmp_path / "f.jsonl", [
        {"query_id": 1, "phrase": "red bag", "phrase_father": "bag"},
        {"query_id": 3, "phrase": "red bag", "phrase_father": "accessory"},
    ])
    good = write_lines(tmp_path / "g.jsonl", [{"query_id": 1, "query_text": "a photo of red bag", "phrase": "red bag"}])
    with pytest.raises(DataError, match=r'f\.jsonl: bad concept fathers file: line 2: duplicate phrase "red bag" '
                                        r"\(first on line 1\)"):
        load_vocabulary(good, fathers)


def test_load_vocabulary_rows_and_unknown_fathers(tmp_path):
    queries = write_lines(tmp_path / "q.jsonl", [
        {"query_id": 5, "query_text": "a photo of bag", "phrase": "bag"},
        {"query_id": 1, "query_text": "a photo of red bag", "phrase": "red bag"},
        {"query_id": 2, "query_text": "a photo of blue bag", "phrase": "blue bag"},
    ])
    fathers = write_lines(tmp_path / "f.jsonl", [
        {"query_id": 1, "phrase": "red bag", "phrase_father": "bag"},
        {"query_id": 3, "phrase": "blue bag", "phrase_father": "accessory"},
        {"query_id": 4, "phrase": "tote", "phrase_father": "accessory"},
    ])
    v = load_vocabulary(queries, fathers)
    assert v.ids == {"bag": 5, "red bag": 1, "blue bag": 2}
    assert v.prompts == ((5, "a photo of bag"), (1, "a photo of red bag"), (2, "a photo of blue bag"))
    assert v.rows == {5: 0, 1: 1, 2: 2}
    assert v.unknown_fathers == ("accessory",) and v.cyclic == ()
    assert "1 fathers are not concepts" in v.summary()
    assert v.id_of("bag") == 5 and v.id_of("") == -1 and v.id_of("tote") == -1
    assert load_vocabulary(queries).fathers == {}


def test_load_vocabulary_on_demo_data(tmp_path):
    from fklip.data.demo_dataset import (
        DemoDataConfig,
        build_vocabularies,
        generate_demo,
    )

    paths = generate_demo(DemoDataConfig(out=tmp_path, train=8, val=4, kb=16, size=32))
    data, kb = build_vocabularies()
    for vocab_dict, q, f in ((data, paths.concept_queries, paths.concept_fathers),
                             (kb, paths.kb_concept_queries, paths.kb_concept_fathers)):
        v = load_vocabulary(q, f)
        assert list(v.ids) == list(vocab_dict) and v.fathers == vocab_dict
        assert v.rows == {i: i for i in range(len(vocab_dict))}
        assert (v.unknown_fathers, v.cyclic) == ((), ())
    v = load_vocabulary(paths.concept_queries, paths.concept_fathers)
    assert with_hypernyms(["striped short sleeve t-shirt"], v) == [
        "striped short sleeve t-shirt", "short sleeve t-shirt", "t-shirt"]

    vocab_kb = load_vocabulary(paths.kb_concept_queries, paths.kb_concept_fathers)
    train = read_train_queries(paths.train_queries)
    for vocab, kind, pick in ((v, "data", data_concepts), (vocab_kb, "kb", kb_concepts)):
        table = build_concept_table(train, vocab, kind=kind)
        assert table.ids.shape == (len(train), 5) and len(table) == len(train)
        for i, q in enumerate(train):  # the table equals the per-query functions
            s = concept_slots(with_hypernyms(pick(q, vocab), vocab), vocab)
            assert table.slots(i) == s
        assert table.unknown == ()  # demo fathers are all concepts
        assert f"{len(train)} queries" in table.summary()


def test_malformed_vocabulary_raises_data_error_from_reader(tmp_path):
    bad = write_lines(tmp_path / "q.jsonl",
                      [{"query_id": "7", "query_text": "a", "phrase": "x"}, "{oops"])
    with pytest.raises(DataError, match="q.jsonl"):
        load_vocabulary(bad)
    good = write_lines(tmp_path / "g.jsonl", [{"query_id": 7, "query_text": "a", "phrase": "x"}])
    with pytest.raises(DataError, match="missing field"):
        load_vocabulary(good, write_lines(tmp_path / "f.jsonl", [{"query_id": 7, "phrase": "x"}]))


# ---- concept lists ----

def test_hypernym_chain_three_levels(chain):
    c = ["striped short sleeve t-shirt"]
    assert with_hypernyms(c, chain) == [
        "striped short sleeve t-shirt", "short sleeve t-shirt", "t-shirt"]
    assert with_hypernyms(c, chain, grandparents=False) == ["striped short sleeve t-shirt",
                                                             "short sleeve t-shirt"]
    s = concept_slots(with_hypernyms(c, chain), chain)
    assert s.ids == (100, 101, 102, -1, -1)
    assert s.prompts == ("a photo of striped short sleeve t-shirt",
                         "a photo of short sleeve t-shirt",
                         "a photo of t-shirt", "a photo of ", "a photo of ")


def test_fathers_in_order_of_first_appearance_dedup_and_truncation(chain):
    c = ["red t-shirt", "slim trousers", "short sleeve t-shirt", "wide leg trousers"]
    # C, then fathers t-shirt, trousers (t-shirt once), then no grandfathers; truncated to 5
    assert with_hypernyms(c, chain) == c + ["t-shirt"]
    assert with_hypernyms(c, chain, slots=7) == c + ["t-shirt", "trousers"]
    assert with_hypernyms(c + c, chain, slots=3) == c[:3]
    assert with_hypernyms([], chain) == []


def test_data_and_kb_filters(chain, tmp_path):
    q = query(phrases=["t-shirt", "red t-shirt", "red t-shirt", "slim trousers", "mini skirt",
                       "a b c d e f g", "not a concept"],
              match=["slim trousers", "t", "skirt", "unknown thing"])
    # 1 word ("t-shirt") out, match_phrases out, duplicates kept until the slots dedup
    assert data_concepts(q, chain) == ["red t-shirt", "red t-shirt", "mini skirt"]
    assert kb_concepts(q, chain) == ["slim trousers", "skirt"]  # "t" is 1 character
    six = make_vocab(tmp_path, {"a b c d e f": "", "a b c d e f g": ""}, name="six")
    assert data_concepts(query(phrases=["a b c d e f", "a b c d e f g"]), six) == ["a b c d e f"]
    assert kb_concepts(query(match=["a b c d e f g"]), six) == ["a b c d e f g"]


def test_table_counts_unknown_fathers_and_dropped_phrases(tmp_path):
    vocab = make_vocab(tmp_path, {"red dress": "dress", "blue dress": "dress", "dress": "garment"},
                       extra=[])
    assert vocab.unknown_fathers == ("garment",)
    qs = [query(phrases=["red dress", "green dress"]), query(phrases=["nothing here"]),
          query(phrases=["blue dress", "red dress"])]
    table = build_concept_table(qs, vocab, kind="data")
    assert table.ids.tolist() == [[100, 102, -1, -1, -1], [-1] * 5, [101, 100, 102, -1, -1]]
    assert table.prompts[0][:3] == (
        "a photo of red dress", "a photo of dress", "a photo of garment")
    assert table.no_concepts == 1
    assert table.unknown == ("garment",) and table.dropped == ("green dress", "nothing here")
    assert table.mean_filled == pytest.approx(7 / 3) and table.mean_known == pytest.approx(5 / 3)
    flat = build_concept_table(qs, vocab, hypernyms=False, slots=2)
    assert flat.ids.tolist() == [[100, -1], [-1, -1], [101, 100]] and flat.unknown == ()
    assert "1 without concepts" in table.summary() and "'garment'" in table.summary()
    with pytest.raises(ConfigError, match="kind.*slots"):
        build_concept_table(qs, vocab, kind="both", slots=0)


def test_father_cycles_terminate(tmp_path):
    vocab = make_vocab(tmp_path, {"a b": "c d", "c d": "a b", "e f": "e f", "g h": "a b"})
    assert set(vocab.cyclic) == {"a b", "c d", "e f"} and len(vocab.cyclic) == 3
    assert with_hypernyms(["a b"], vocab) == ["a b", "c d"]
    assert with_hypernyms(["e f"], vocab) == ["e f"]
    assert with_hypernyms(["g h"], vocab) == ["g h", "a b", "c d"]
    table = build_concept_table([query(phrases=["g h", "e f"])], vocab)
    assert table.ids.tolist() == [[103, 102, 100, 101, -1]]
    assert "father cycles" in vocab.summary()


DETERMINISM_SCRIPT = """
import json, sys
from fklip.data.jsonl import read_train_queries
from fklip.knowledge import build_concept_table, load_vocabulary
q, f, t = sys.argv[1:4]
table = build_concept_table(read_train_queries(t), load_vocabulary(q, f))
print(json.dumps([table.ids.tolist(), table.prompts, table.dropped]))
"""


def test_concept_table_is_independent_of_hash_seed(tmp_path):
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo

    paths = generate_demo(DemoDataConfig(out=tmp_path, train=30, val=4, kb=16, size=32))
    args = [str(paths.concept_queries), str(paths.concept_fathers), str(paths.train_queries)]
    outputs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, *args], capture_output=True,
                             text=True, env=env, timeout=HANG_S)
        assert run.returncode == 0, run.stderr
        outputs.append(json.loads(run.stdout))
    table = build_concept_table(read_train_queries(args[2]), load_vocabulary(args[0], args[1]))
    here = json.loads(json.dumps([table.ids.tolist(), table.prompts, table.dropped]))
    assert outputs[0] == outputs[1] == here
    assert (table.ids >= 0).any(dim=1).sum() > 0  # not vacuous


# ---- prototype features ----

def prototype_oracle(table_ids, rows: dict[int, int], retrieved, kb_emb):
    b, s = table_ids.shape
    out = torch.zeros(b, s, retrieved.shape[1], kb_emb.shape[1], dtype=kb_emb.dtype)
    for i in range(b):
        for j in range(s):
            r = rows.get(int(table_ids[i, j]), -1)
            if r < 0:
                continue
            for m, img in enumerate(retrieved[r].tolist()):
                if img >= 0:
                    out[i, j, m] = kb_emb[img]
    return out


@pytest.mark.parametrize("offset,far", [(0, 700), (10, 700), (-5, 700), (0, 10**12)])
def test_prototype_features_match_loop(offset, far):
    gen = torch.Generator().manual_seed(0)
    kb_emb = torch.randn(9, 3, generator=gen)  # (M, D)
    rows = {offset: 2, offset + 3: 0, offset + far: 1}  # id -> row of `retrieved`
    retrieved = torch.tensor([[4, 5, -1, -1], [0, 8, 1, 2], [3, 3, 6, -1]])  # (C, keep)
    table_ids = torch.tensor([[offset, -1, offset + 3],
                              [offset + far, offset + 1, offset - 3],
                              [-1, -1, -1]])  # (B, S): unknown, below the table, all empty
    lookup = RowLookup(rows)
    assert lookup.dense == (far < 10**6)
    got = prototype_features(table_ids, lookup, retrieved, kb_emb)
    assert got.shape == (3, 3, 4, 3)
    assert torch.equal(got, prototype_oracle(table_ids, rows, retrieved, kb_emb))
    assert torch.equal(prototype_features(table_ids, rows, retrieved, kb_emb), got)  # a Mapping too
    assert (got[2] == 0).all() and (got[0, 1] == 0).all() and (got[0, 2, 2:] == 0).all()
    assert (got[1, 1:] == 0).all() and (got[0, 0, 3] == 0).all()
    assert torch.equal(got[0, 0, 0], kb_emb[3])


def test_row_lookup_dense_and_sparse():
    assert RowLookup({0: 0, 5: 1}).dense and not RowLookup({0: 0, 10**12: 1}).dense
    for lookup in (RowLookup({0: 0, 5: 1}), RowLookup({0: 0, 5: 1, 10**12: 2})):
        assert lookup(torch.tensor([5, 0, -1, 3, 10**12])).tolist()[:4] == [1, 0, -1, -1]
    assert RowLookup({})(torch.tensor([0, -1])).tolist() == [-1, -1]
    empty = prototype_features(torch.tensor([[0]]), {0: 0}, torch.zeros(0, 10, dtype=torch.long),
                               torch.randn(4, 2))
    assert empty.shape == (1, 1, 10, 2) and (empty == 0).all()
