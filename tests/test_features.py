"""Feature files: byte-exact JSON lines, exact fast parsing, the npy form, every validation error."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fklip.data import features
from fklip.data.features import (
    Features,
    check_same_dim,
    npy_ids_path,
    read_features,
    write_features,
)
from fklip.errors import ConfigError, DataError, OutputError


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def reference_lines(ids, matrix, field="image_id") -> bytes:
    """What the original's extract_features.py writes: json.dumps of each float32 row's tolist()."""
    return b"".join(json.dumps({field: i, "feature": row.tolist()}).encode() + b"\n"
                    for i, row in zip(ids, np.asarray(matrix, np.float32)))


def awkward_values(seed: int = 0) -> np.ndarray:
    """float32 values that stress repr(): random bits over [2^-40, 2) with 0 to 20 low bits cleared
    (exact short decimals, digit ties), powers of two, zeros, tiny, huge and subnormal values."""
    rng = np.random.default_rng(seed)
    lo, hi = np.float32(2.0**-40).view(np.uint32), np.float32(2.0).view(np.uint32)
    bits = rng.integers(lo, hi, 60000, dtype=np.uint32)
    bits &= ~((np.uint32(1) << rng.integers(0, 21, bits.size).astype(np.uint32)) - np.uint32(1))
    special = [0.0, -0.0, 1.0, -1.0, 0.5, 0.25, 0.125, 2.0**-20, 2.0**-33, 2.0**-34, 1e-4, 1e-5, 9.99999e-5,
               1e-8, 1e-12, 1e-30, 1.5e-45, 1e-40, 3.4028235e38, 1e20, 123.456, 0.1, 0.3, 0.7, 0.9999999]
    x = np.concatenate([bits.view(np.float32), np.float32(special)])
    return x * np.where(rng.random(x.size) < 0.5, -1, 1).astype(np.float32)


# ---- writing JSON lines: byte for byte as the original ----

def test_jsonl_bytes_identical_to_json_dumps(tmp_path):
    values = awkward_values()
    matrix = values[: values.size // 7 * 7].reshape(-1, 7)
    ids = [f"{i}" if i % 3 else f'id "{i}" \u00e9' for i in range(len(matrix))]
    written = write_features(tmp_path / "img.jsonl", ids, matrix, id_field="image_id")
    assert written == [tmp_path / "img.jsonl"]
    assert (tmp_path / "img.jsonl").read_bytes() == reference_lines(ids, matrix)


def test_jsonl_bytes_identical_for_unit_features_and_int_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "_CHUNK_VALUES", 100)  # 4 rows per write chunk
    matrix = unit_rows(53, 24, seed=1).astype(np.float64)  # float64 input is written as float32
    write_features(tmp_path / "txt.jsonl", range(1000, 1053), matrix, id_field="query_id")
    assert (tmp_path / "txt.jsonl").read_bytes() == reference_lines(range(1000, 1053), matrix, "query_id")


def test_fast_formatter_is_exact_and_used():
    # the vectorised repr must agree with repr() itself, and cover the usual values (no fallback)
    rows = unit_rows(64, 512, seed=2)
    body, ends, exact = features._format_rows(rows)
    assert all(exact)
    expected = [", ".join(map(repr, row.tolist())).encode() for row in rows]
    assert [body[s:e] for s, e in zip([0] + ends[:-1], ends)] == expected
    x = np.abs(awkward_values(seed=3))
    inside = (x == 0) | ((x >= 2.0**-33) & (x < 1))
    N, n, p, exact = features._shortest(x[inside])
    pow2 = x[inside].view(np.uint32) & 0x7FFFFF == 0
    assert exact[~pow2].all()  # only powers of two are left to repr
    for value, digits, count, ok in zip(x[inside].tolist(), N.tolist(), n.tolist(), exact):
        if ok and value:  # the same significant digits as repr
            assert repr(value).split("e")[0].replace(".", "").strip("0") == str(digits).zfill(17)[:count]


# ---- reading JSON lines: exactly np.float32(json.loads(line)["feature"]) ----

TRICKY = ["1e-08", "-0.0", "0", "-0", "0.0", "1E5", "1e+05", "2.5e-3", "-7", "123456789", "0.1",
          "1.000000059604644775390625", "1.0000000596046448", "1.0000000596046449", "3.4028234663852886e+38",
          "1.401298464324817e-45", "7e-46", "1e-50", "5e-324", "123456789012345678901234567890",
          "-99999999999999999999e-20", "0.000000000000000000000000000001", "1e0", "9.999999e-05"]


def test_fast_parser_matches_json_loads_on_tricky_numbers():
    texts = [", ".join(TRICKY).encode(), b"0.5", ", ".join(TRICKY[::-1]).encode()]
    values, ends = features._parse_numbers(texts)
    expected = np.float32(json.loads("[" + ", ".join(t.decode() for t in texts) + "]"))
    assert ends == [len(TRICKY), len(TRICKY) + 1, 2 * len(TRICKY) + 1]
    assert values.view(np.uint32).tolist() == expected.view(np.uint32).tolist()


def test_fast_parser_reads_what_the_writer_wrote():
    x = awkward_values(seed=4)
    texts = [", ".join(map(repr, x[i:i + 500].tolist())).encode() for i in range(0, x.size, 500)]
    values, _ = features._parse_numbers(texts)
    assert values.view(np.uint32).tolist() == x.view(np.uint32).tolist()


@pytest.mark.parametrize("text", ["+1", ".5", "1.", "01", "-01", "00.5", "1.2.3", "1e5.5", "1e", "1e+", "--1",
                                  "1 2", "1,,2", "1, ", "NaN", "Infinity", "1e+-5", "0x10", "1_0", "[1]",
                                  "1 ,2", "1,2", "1.e5", "1e5e3", "-", "1-2", "1.-2", "\"1\"", "1, true",
                                  "1, \x0b2", "1, \x0c2", "1 e5", "1\x0be5"])  # strtoll skips \v, \f
def test_fast_parser_rejects_what_json_rejects_or_it_cannot_read(text):
    assert features._parse_numbers([b"0.25, " + text.encode()]) is None


def test_round_trip_jsonl_keeps_id_types(tmp_path):
    matrix = unit_rows(9, 16)
    for field, ids in (("image_id", [str(i) for i in range(9)]), ("query_id", list(range(9)))):
        path = tmp_path / f"{field}.jsonl"
        write_features(path, ids, matrix, id_field=field)
        feats = read_features(path, expect="image")
        assert (feats.id_field, feats.ids, len(feats), feats.dim) == (field, ids, 9, 16)
        assert [type(i) for i in feats.ids] == [type(i) for i in ids]
        assert feats.keys() == [str(i) for i in range(9)]
        assert feats.matrix.dtype == np.float32 and np.array_equal(feats.matrix, matrix)


def test_slow_path_lines_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "_CHUNK_BYTES", 200)  # many bulk chunks, some holding odd lines
    m = unit_rows(40, 6, seed=5)
    lines = [json.dumps({"image_id": str(i), "feature": r.tolist()}) for i, r in enumerate(m)]
    lines[3] = json.dumps({"feature": m[3].tolist(), "image_id": "3"})  # other key order
    lines[7] = json.dumps({"image_id": "7", "feature": m[7].tolist()}, separators=(",", ":"))
    lines[8] = '  {"image_id" : "8", "feature" : [ ' + " ,  ".join(map(repr, m[8].tolist())) + " ] }\r"
    lines[9] = json.dumps({"image_id": "9", "extra": {"x": [1]}, "feature": m[9].tolist()})
    lines[12] = json.dumps({"image_id": "12", "feature": m[12].tolist()}).replace(", ", ",  ")  # 2 spaces
    lines.insert(20, "")  # blank lines are skipped, and counted
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    feats = read_features(path)
    assert feats.ids == [str(i) for i in range(40)] and np.array_equal(feats.matrix, m)


def test_query_id_wins_over_image_id(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"image_id": "5", "query_id": 7, "feature": [0.5]}) + "\n"
                    + json.dumps({"query_id": 8, "feature": [0.25]}) + "\n")
    feats = read_features(path)
    assert (feats.id_field, feats.ids) == ("query_id", [7, 8])


# ---- the validation errors ----

def bad_file(tmp_path, lines: list[str], expect=None) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError) as e:
        read_features(path, expect=expect)
    assert str(path) in str(e.value)
    return str(e.value)


def line(i, feature, field="image_id"):
    return json.dumps({field: i, "feature": feature})


def test_errors_name_lines_and_are_collected(tmp_path):
    msg = bad_file(tmp_path, [
        line("1", [0.5, 0.5]),
        '{"image_id": "2", "feature": [0.5, 0.5]',  # 2: malformed
        json.dumps({"image_id": "3"}),  # 3: no feature
        json.dumps({"feature": [0.5, 0.5]}),  # 4: no id
        line(5, [0.5, 0.5], "query_id"),  # 5: mixed id fields
        line("6", ["a", 0.5]), line("7", [True, 0.5]), line("8", [[0.5], 0.5]), line("9", "x"), line("10", []),
        line("11", [0.5, 0.5, 0.5]),  # 11: dim 3, not 2
        line("12", [0.5, 0.5]),
    ], expect="text")
    assert "bad text features file" in msg and "10 problems" in msg
    assert "line 2: malformed JSON" in msg and 'line 3: expected an object with "feature"' in msg
    assert "line 4: expected" in msg and 'line 5: id field "query_id" but line 1 has "image_id"' in msg
    assert "line 6: \"feature\" must be a non-empty list" in msg and "... and 5 more" in msg  # five shown


@pytest.mark.parametrize("lines, expected", [
    ([line("1", ["a"])], 'line 1: "feature" must be a non-empty list of numbers'),
    ([line("1", [True])], 'line 1: "feature" must be a non-empty list of numbers'),
    ([line("1", [])], 'line 1: "feature" must be a non-empty list of numbers'),
    ([line(None, [0.5])], 'line 1: "image_id" must be an int or a non-empty string'),
    ([line("1", [0.5, 0.5]), line("2", [0.5, 0.5, 0.5])], "line 2: 3 feature values, expected 2 as on line 1"),
    ([line("1", [0.5]), line(2, [0.5], "query_id")], 'line 2: id field "query_id" but line 1 has "image_id"'),
    (["[1, 2]"], 'line 1: expected an object with "feature" and "image_id" or "query_id"'),
    (['{"image_id": "1", "feature": [+1]}'], "line 1: malformed JSON"),
    (['{"image_id": "1", "feature": [01]}'], "line 1: malformed JSON"),
    (['{"image_id": "1", "feature": [1e400]}', line("2", [0.5])], "NaN or infinite values on 1 line: 1"),
    (['{"image_id": "1", "feature": [1' + "0" * 400 + "]}"], "line 1: a feature value is too large for float32"),
    (['{"image_id": "1", "feature": [NaN]}', line("2", [0.5]), line("3", [float("inf")])],
     "NaN or infinite values on 2 lines: 1, 3"),
    ([line("1", [1e40])], "NaN or infinite values on 1 line: 1"),  # beyond float32
    ([line(94, [0.5]), line("7", [0.5]), line("94", [0.5]), line("7", [0.5])],
     "2 ids occur more than once: '94' (lines 1, 3), '7' (lines 2, 4)"),
    ([], "the file is empty"),
    (["", "  "], "the file is empty"),
])
def test_each_error(tmp_path, lines, expected):
    assert expected in bad_file(tmp_path, lines)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="none.jsonl: no such file; expected image features"):
        read_features(tmp_path / "none.jsonl", expect="image")


def test_directories_and_devices_are_named_as_such(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory; expected text features"):
        read_features(tmp_path / "d.jsonl", expect="text")
    with pytest.raises(DataError, match=r"/dev/null: is not a regular file \(a character device\); expected features"):
        read_features("/dev/null")
    path = write_features(tmp_path / "f.npy", [1, 2], unit_rows(2, 4), id_field="query_id", fmt="npy")[0]
    npy_ids_path(path).unlink()
    npy_ids_path(path).mkdir()
    with pytest.raises(DataError, match=r"f\.ids\.jsonl: is a directory; expected the ids file of .*f\.npy"):
        read_features(path)


def test_all_zero_rows_are_refused(tmp_path):
    """An L2-normalised feature is never all zero: such a row means a broken extraction."""
    m = unit_rows(5, 3)
    m[1] = m[3] = 0.0
    m[3, 2] = -0.0
    msg = bad_file(tmp_path, [line(str(i), row.tolist()) for i, row in enumerate(m)])
    assert "only zeros on 2 lines: 2, 4 (an L2-normalised feature is never all zero" in msg
    path = npy_pair(tmp_path, m.astype(np.float16), [1, 2, 3, 4, 5])
    with pytest.raises(DataError, match=r"f\.npy: bad features file: only zeros on 2 0-based rows: 1, 3"):
        read_features(path)
    with pytest.raises(DataError, match="cannot write float32 features: only zeros on 2 0-based rows: 1, 3"):
        write_features(tmp_path / "w.jsonl", list(range(5)), m, id_field="image_id")
    tiny = np.full((1, 3), 1e-8, np.float32)  # nonzero in float32, zero once written as float16
    with pytest.raises(DataError, match="cannot write float16 features: only zeros on 1 0-based row: 0"):
        write_features(tmp_path / "w.npy", [1], tiny, id_field="image_id", fmt="npy", dtype="float16")
    assert not (tmp_path / "w.jsonl").exists() and not (tmp_path / "w.npy").exists()


def test_blank_lines_warn_once_in_feature_and_ids_files(tmp_path, caplog):
    m = unit_rows(3, 4)
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join([line("a", m[0].tolist()), "", line("b", m[1].tolist()), "  ",
                               line("c", m[2].tolist())]) + "\n")
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        assert read_features(path).ids == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == [f"{path}: skipped 2 blank lines (lines 2, 4)"]
    caplog.clear()
    npy = write_features(tmp_path / "g.npy", [1, 2, 3], m, id_field="query_id", fmt="npy")[0]
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        read_features(npy)
    assert caplog.records == []  # the newline ending the last line is not a blank line
    ids = npy_ids_path(npy)
    ids.write_text(ids.read_text() + "\n")
    with caplog.at_level("WARNING", logger="fklip.data.jsonl"):
        assert read_features(npy).ids == [1, 2, 3]
    assert [r.getMessage() for r in caplog.records] == [f"{ids}: skipped 1 blank line (line 5)"]


# ---- the npy form ----

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_npy_is_a_read_only_memmap(tmp_path, dtype):
    matrix, ids = unit_rows(11, 8), ["a", 7, "94", 30]
    ids = [str(i) for i in range(7)] + ids
    written = write_features(tmp_path / "f.npy", ids, matrix, id_field="image_id", fmt="npy", dtype=dtype)
    assert written == [tmp_path / "f.npy", tmp_path / "f.ids.jsonl"]
    assert json.loads((tmp_path / "f.ids.jsonl").read_text().splitlines()[0]) == \
        {"id_field": "image_id", "count": 11, "dim": 8, "dtype": dtype}
    feats = read_features(tmp_path / "f.npy")
    assert isinstance(feats.matrix, np.memmap) and not feats.matrix.flags.writeable
    assert feats.matrix.dtype == dtype and np.array_equal(feats.matrix, matrix.astype(dtype))
    assert feats.ids == ids and (feats.id_field, feats.dim, len(feats)) == ("image_id", 8, 11)
    with pytest.raises(ValueError):
        feats.matrix[0, 0] = 1


def test_npy_ids_path():
    assert npy_ids_path("out/val.img.npy").as_posix() == "out/val.img.ids.jsonl"


def npy_pair(tmp_path, matrix, ids, header=None):
    path = tmp_path / "f.npy"
    np.save(path, matrix)
    header = header or {"id_field": "query_id", "count": len(ids), "dim": matrix.shape[-1], "dtype": matrix.dtype.name}
    npy_ids_path(path).write_text("".join(json.dumps(x) + "\n" for x in [header, *ids]))
    return path


@pytest.mark.parametrize("matrix, ids, header, expected", [
    (np.zeros((3, 2), np.float64), [1, 2, 3], None, "expected a 2-D float16 or float32 matrix"),
    (np.zeros(3, np.float32), [1, 2, 3], None, "got shape (3,)"),
    (np.zeros((3, 2), np.int32), [1, 2, 3], None, "dtype <i4"),
    (np.zeros((3, 2), np.float32), [1, 2], None, "2 ids) does not describe"),
    (np.zeros((3, 2), np.float32), [1, 2], {"id_field": "query_id", "count": 3, "dim": 2, "dtype": "float32"},
     "2 ids) does not describe"),
    (np.zeros((3, 2), np.float32), [1, 2, 3], {"id_field": "query_id", "count": 3, "dim": 4, "dtype": "float32"},
     "does not describe"),
    (np.zeros((3, 2), np.float32), [1, 2, 3], {"id_field": "x", "count": 3, "dim": 2, "dtype": "float32"},
     "'x'"),
    (np.array([[0, 1], [np.nan, 0], [0, np.inf]], np.float32), [1, 2, 3], None,
     "NaN or infinite values on 2 0-based rows: 1, 2"),
    (np.zeros((3, 2), np.float16), [1, "x", "1"], None, "1 ids occur more than once: '1' (0-based rows 0, 2)"),
    (np.zeros((3, 2), np.float32), [1, True, 3], None, "f.ids.jsonl line 3: expected an int or string id, got True"),
])
def test_npy_errors(tmp_path, matrix, ids, header, expected):
    path = npy_pair(tmp_path, matrix, ids, header)
    with pytest.raises(DataError) as e:
        read_features(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_npy_header_mismatch_names_both_files(tmp_path):
    path = npy_pair(tmp_path, np.zeros((3, 2), np.float32), [1, 2, 3],
                    {"id_field": "query_id", "count": 4, "dim": 2, "dtype": "float32"})
    with pytest.raises(DataError, match=r"f\.ids\.jsonl .*does not describe .*f\.npy \(3 x 2 float32\)"):
        read_features(path)


def test_npy_without_ids_file(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(DataError, match="f.ids.jsonl is missing"):
        read_features(tmp_path / "f.npy")


def test_not_an_npy_file(tmp_path):
    (tmp_path / "f.npy").write_text("hello")
    with pytest.raises(DataError, match="not a readable .npy matrix"):
        read_features(tmp_path / "f.npy")


# ---- write validation and atomicity ----

@pytest.mark.parametrize("kwargs, error, expected", [
    (dict(id_field="item_id"), ConfigError, "id_field must be one of"),
    (dict(fmt="csv"), ConfigError, "fmt one of"),
    (dict(dtype="float64"), ConfigError, "dtype one of"),
    (dict(fmt="npy"), ConfigError, "does not match the suffix"),
    (dict(matrix=np.zeros(3, np.float32)), DataError, "expected a non-empty 2-D"),
    (dict(matrix=np.zeros((0, 4), np.float32), ids=[]), DataError, "expected a non-empty 2-D"),
    (dict(ids=["a", "b"]), DataError, "2 ids for 3 rows"),
    (dict(ids=["a", True, ""]), DataError, "ids must be ints or non-empty strings: True, ''"),
    (dict(ids=[94, "a", "94"]), DataError, "'94' (0-based rows 0, 2)"),
    (dict(matrix=np.array([[0, 1], [np.nan, 0], [0, 1]])), DataError, "NaN or infinite values on 1 0-based row: 1"),
    (dict(matrix=np.array([[0, 1e39], [0, 0], [0, 1]])), DataError, "cannot write float32 features"),
])
def test_write_validation_leaves_no_files(tmp_path, kwargs, error, expected):
    args = dict(path=tmp_path / "f.jsonl", ids=["a", "b", "c"], matrix=np.zeros((3, 2), np.float32), id_field="image_id")
    args.update(kwargs)
    with pytest.raises(error) as e:
        write_features(args.pop("path"), args.pop("ids"), args.pop("matrix"), **args)
    assert expected in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_is_rejected(tmp_path):
    with pytest.raises(DataError, match="cannot write float16 features: NaN or infinite values on 1 0-based row: 0"):
        write_features(tmp_path / "f.npy", [1], np.array([[1e5, 0.0]]), id_field="query_id", fmt="npy", dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_failed_npy_write_leaves_neither_file(tmp_path, monkeypatch):
    path = tmp_path / "f.npy"
    write_features(path, [1, 2], unit_rows(2, 4), id_field="query_id", fmt="npy")
    before = path.read_bytes(), npy_ids_path(path).read_bytes()

    def fail(obj):
        raise OSError("disk full")

    # the ids file is written after the matrix: make it fail, over an old pair and for a new one
    monkeypatch.setattr(features, "json", SimpleNamespace(dumps=fail, loads=json.loads))
    for target in (path, tmp_path / "new.npy"):
        with pytest.raises(OutputError, match="cannot write .*disk full; nothing was written"):
            write_features(target, [3, 4, 5], unit_rows(3, 4), id_field="query_id", fmt="npy")
    assert (path.read_bytes(), npy_ids_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.ids.jsonl", "f.npy"]  # no temporaries left


def test_check_same_dim(tmp_path):
    a = Features(tmp_path / "img.jsonl", "image_id", ["1"], np.zeros((1, 512), np.float32))
    b = Features(tmp_path / "txt.npy", "query_id", [1], np.zeros((1, 768), np.float16))
    check_same_dim(a, a)
    with pytest.raises(DataError, match=r"img\.jsonl has 512-dim features but .*txt\.npy has 768-dim"):
        check_same_dim(a, b)


def test_progress_bar_counts_every_byte(tmp_path, monkeypatch):
    """`read_features(progress=True)` moves a bar over the file's bytes; the result is unchanged."""
    import tqdm

    from fklip.data.features import read_features, write_features

    rng = np.random.default_rng(0)
    path = tmp_path / "f.jsonl"
    write_features(path, list(range(3000)), rng.standard_normal((3000, 64)).astype(np.float32),
                   id_field="image_id", fmt="jsonl")
    seen = []
    real_update = tqdm.tqdm.update
    monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: (seen.append(n), real_update(self, n))[1])
    with_bar = read_features(path, progress=True)
    assert sum(seen) == path.stat().st_size and len(seen) > 1
    plain = read_features(path)
    assert with_bar.ids == plain.ids and np.array_equal(with_bar.matrix, plain.matrix)
