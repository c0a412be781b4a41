import pytest

from fklip.data import jsonl
from fklip.errors import DataError
from tests.conftest import write_lines


def test_train_queries_keep_id_types(tmp_path):
    p = write_lines(tmp_path / "train.jsonl", [
        {"query_id": 1, "query_text": "red dress", "item_ids": ["10", 11], "phrases": ["red dress"],
         "match_phrases": ["dress"]},
        "",  # blank lines are skipped
        {"query_id": "q2", "query_text": "navy coat", "item_ids": [12], "phrases": [], "match_phrases": []},
    ])
    records = jsonl.read_train_queries(p)
    assert [r.query_id for r in records] == [1, "q2"]
    assert records[0].item_ids == ("10", 11)
    assert records[0].phrases == ("red dress",) and records[0].match_phrases == ("dress",)
    assert jsonl.id_key(11) == "11" and jsonl.id_key("11") == "11"


def test_malformed_json_names_file_and_line(tmp_path):
    p = write_lines(tmp_path / "q.jsonl", [
        {"query_id": 1, "query_text": "a", "item_ids": ["1"]},
        '{"query_id": 2, "query_text": ',
    ])
    with pytest.raises(DataError, match=r"q\.jsonl, line 2: malformed JSON"):
        jsonl.read_val_queries(p)


def test_missing_fields_are_all_reported_once(tmp_path):
    p = write_lines(tmp_path / "train.jsonl", [
        {"query_id": 1, "query_text": "a", "item_ids": ["1"], "phrases": []},
        {"query_id": 2, "item_ids": ["2"], "phrases": [], "match_phrases": []},
        {"query_id": 3, "query_text": "c", "item_ids": ["3"], "phrases": [], "match_phrases": []},
    ])
    with pytest.raises(DataError) as e:
        jsonl.read_train_queries(p)
    msg = str(e.value)
    assert "2 problems" in msg
    assert 'line 1: missing field "match_phrases"' in msg
    assert 'line 2: missing field "query_text"' in msg
    assert "line 3" not in msg
    assert "\n" not in msg  # one line


def test_wrong_types_are_named(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [
        {"query_id": "15", "query_text": "a photo of woman sunglasses", "phrase": "woman sunglasses"},
    ])
    with pytest.raises(DataError, match=r'line 1: field "query_id" must be an int'):
        jsonl.read_concept_queries(p)
    p2 = write_lines(tmp_path / "v.jsonl", [{"query_id": 1, "query_text": "a", "item_ids": "12"}])
    with pytest.raises(DataError, match=r'field "item_ids" must be a list'):
        jsonl.read_val_queries(p2)
    p3 = write_lines(tmp_path / "t.jsonl", [[1, 2, 3]])
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        jsonl.read_val_queries(p3)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        jsonl.read_concept_fathers(empty)
    with pytest.raises(DataError, match="no such file"):
        jsonl.read_concept_fathers(tmp_path / "nope.jsonl")


def test_concept_files(tmp_path):
    q = write_lines(tmp_path / "q.jsonl", [
        {"query_id": 15, "query_text": "a photo of woman sunglasses", "phrase": "woman sunglasses"}])
    f = write_lines(tmp_path / "f.jsonl", [
        {"query_id": 15, "phrase": "woman sunglasses", "phrase_father": "sunglasses"},
        {"query_id": 16, "phrase": "sunglasses", "phrase_father": ""}])
    assert jsonl.read_concept_queries(q)[0] == jsonl.ConceptQuery(15, "a photo of woman sunglasses",
                                                                    "woman sunglasses")
    fathers = jsonl.read_concept_fathers(f)
    assert [(x.phrase, x.phrase_father) for x in fathers] == [("woman sunglasses", "sunglasses"),
                                                              ("sunglasses", "")]


def test_image_gold_item_ids_or_text(tmp_path):
    p = write_lines(tmp_path / "g.jsonl", [
        {"image_id": "94", "item_ids": [10, 11]},
        {"image_id": "95", "text": 12},
    ])
    gold = jsonl.read_image_gold(p)
    assert gold == [jsonl.ImageGold("94", (10, 11)), jsonl.ImageGold("95", (12,))]
    bad = write_lines(tmp_path / "b.jsonl", [{"image_id": "94"}, {"item_ids": [1]}])
    with pytest.raises(DataError) as e:
        jsonl.read_image_gold(bad)
    assert 'line 1: missing field "item_ids" (or "text")' in str(e.value)
    assert 'line 2: missing field "image_id"' in str(e.value)


def test_many_problems_are_truncated_with_a_count(tmp_path):
    p = write_lines(tmp_path / "v.jsonl", [{"query_id": i} for i in range(50)])
    with pytest.raises(DataError) as e:
        jsonl.read_val_queries(p)
    assert "100 problems" in str(e.value) and "more" in str(e.value)
