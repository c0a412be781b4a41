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


# ---- one rule set for every reader: repeated ids, blank lines, what the input is ----

TRAIN = {"query_text": "a", "item_ids": ["1"], "phrases": [], "match_phrases": []}
READERS = [  # reader, a good line without its id, the id field
    (jsonl.read_train_queries, TRAIN, "query_id"),
    (jsonl.read_val_queries, {"query_text": "a", "item_ids": ["1"]}, "query_id"),
    (jsonl.read_text_queries, {"query_text": "a"}, "query_id"),
    (jsonl.read_text_gold, {"item_ids": ["1"]}, "query_id"),
    (jsonl.read_image_gold, {"item_ids": [1]}, "image_id"),
    (jsonl.read_concept_fathers, {"phrase_father": ""}, "query_id"),
]


@pytest.mark.parametrize("reader, rest, field", READERS, ids=[r[0].__name__ for r in READERS])
def test_repeated_ids_are_refused_naming_the_lines(tmp_path, reader, rest, field):
    """The original kept the last line of a repeated key (so scored fewer queries): every reader
    refuses it, comparing ids as strings."""
    def rec(i, n):
        return {field: i, **rest, **({"phrase": f"p{n}"} if "phrase_father" in rest else {})}

    p = write_lines(tmp_path / "f.jsonl", [rec(94, 1), rec(7, 2), rec("94", 3), rec(7, 4), rec(8, 5)])
    with pytest.raises(DataError) as e:
        reader(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: bad ") and "2 problems" in msg and "\n" not in msg
    assert f'line 3: duplicate {field} "94" (first on line 1 as 94; ids compare as strings)' in msg
    assert f"line 4: duplicate {field} 7 (first on line 2)" in msg
    assert len(reader(write_lines(tmp_path / "g.jsonl", [rec(94, 1), rec("95", 2)]))) == 2


def test_repeated_concepts_are_refused_by_id_and_by_phrase(tmp_path):
    p = write_lines(tmp_path / "q.jsonl", [{"query_id": 1, "query_text": "a", "phrase": "bag"},
                                           {"query_id": 2, "query_text": "b", "phrase": "bag"},
                                           {"query_id": 1, "query_text": "c", "phrase": "tote"}])
    with pytest.raises(DataError) as e:
        jsonl.read_concept_queries(p)
    assert "line 3: duplicate query_id 1 (first on line 1)" in str(e.value)
    assert 'line 2: duplicate phrase "bag" (first on line 1)' in str(e.value)


def test_text_gold_needs_only_query_id_and_item_ids(tmp_path):
    """The original's predict_evaluate.py reads only these two fields of --text-standard-path."""
    p = write_lines(tmp_path / "gold.jsonl", [{"query_id": 10, "item_ids": ["94", 95]},
                                              {"query_id": "11", "item_ids": [], "query_text": "x"}])
    assert jsonl.read_text_gold(p) == [jsonl.TextGold(10, ("94", 95)), jsonl.TextGold("11", ())]
    with pytest.raises(DataError, match='line 1: missing field "query_text"'):
        jsonl.read_val_queries(p)


def test_blank_lines_are_skipped_with_one_warning(tmp_path, caplog):
    p = tmp_path / "v.jsonl"
    line = '{"query_id": %d, "query_text": "a", "item_ids": ["1"]}\n'
    p.write_text(line % 1 + "\n" + line % 2 + "   \r\n" + line % 3 + "\n")  # the last "\n" ends a blank line
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        assert [q.query_id for q in jsonl.read_val_queries(p)] == [1, 2, 3]
    assert [r.getMessage() for r in caplog.records] == [f"{p}: skipped 3 blank lines (lines 2, 4, 6)"]
    caplog.clear()
    p.write_text(line % 1 + line % 2)  # the newline ending the last line is not a blank line
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        jsonl.read_val_queries(p)
    assert caplog.records == []
    g = write_lines(tmp_path / "g.jsonl", [{"image_id": "1", "item_ids": [1]}, ""])
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        jsonl.read_image_gold(g)
    assert [r.getMessage() for r in caplog.records] == [f"{g}: skipped 1 blank line (line 2)"]


def test_inputs_that_are_not_regular_files_say_what_they_are(tmp_path):
    import os

    (tmp_path / "d.jsonl").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "gone.jsonl")
    cases = [(tmp_path / "nope.jsonl", "nope.jsonl: no such file; expected val queries"),
             (tmp_path / "d.jsonl", "d.jsonl: is a directory; expected val queries"),
             ("/dev/null", "/dev/null: is not a regular file (a character device); expected val queries"),
             (tmp_path / "pipe.jsonl", "pipe.jsonl: is not a regular file (a named pipe)"),
             (tmp_path / "link.jsonl", "link.jsonl: is a broken symbolic link; expected val queries")]
    for path, expected in cases:
        with pytest.raises(DataError) as e:
            jsonl.read_val_queries(path)
        assert expected in str(e.value)
    with pytest.raises(DataError, match="is a directory"):
        jsonl.read_concept_fathers(tmp_path / "d.jsonl")
