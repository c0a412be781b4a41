"""Feature files: the original's JSON lines (spec 1.7) and fklip's memory-mapped `.npy` form.

JSON lines hold `{"image_id": id, "feature": [D floats]}` or `{"query_id": id, ...}`, the floats
being float32 values as `json.dumps` prints them. fklip writes these byte for byte as the original
and reads them to exactly `np.float32(json.loads(line)["feature"])`. Both directions have a
vectorised fast path and a slow oracle: numbers are parsed in bulk as integers, and any value whose
float32 rounding is not certain goes through `json.loads`; rows are printed by an exact numpy
shortest-repr, and any row outside its proven range goes through `json.dumps`.
The `.npy` form is a float16/float32 matrix beside `<name>.ids.jsonl`: a header object
`{"id_field", "count", "dim", "dtype"}`, then one JSON id per line, in row order.
Both forms follow the readers' rules (fklip.data.jsonl): a repeated id is an error, blank lines are
skipped with one warning; and a row of NaN, infinite or only zero values is an error (an
L2-normalised feature is never all zero: such a row comes from a broken extraction).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fklip.data.jsonl import Id, id_key, warn_blank_lines
from fklip.errors import (
    ConfigError,
    DataError,
    check_input_file,
    preview,
    raise_collected,
)
from fklip.io import OutputSet, atomic_output

ID_FIELDS = ("image_id", "query_id")
FORMATS = ("jsonl", "npy")
NPY_DTYPES = ("float16", "float32")
_CHUNK_BYTES = 1 << 22  # JSON text parsed per bulk call; its temporaries are a few times this
_PROGRESS_BYTES = 1 << 20  # the progress bar moves every this many bytes read
_CHUNK_VALUES = 1 << 17  # values printed, or checked for NaN, per step
_REWRITE = "write both again with `fklip extract --format npy` (or `fklip eval --save-features npy`)"


@dataclass
class Features:
    """Ids (their types kept, file order) and their (N, D) feature matrix."""

    path: Path
    id_field: str  # "image_id" or "query_id"; for .npy, as recorded in the ids file's header
    ids: list[Id]
    matrix: np.ndarray  # (N, D) float32 or float16; a read-only np.memmap for .npy files

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self) -> list[str]:
        """The ids as compared across files: 94 and "94" are the same."""
        return [id_key(i) for i in self.ids]


def npy_ids_path(npy_path: str | os.PathLike) -> Path:
    """x.npy -> x.ids.jsonl, the ids file that travels with a matrix."""
    return Path(npy_path).with_suffix(".ids.jsonl")


def check_same_dim(a: Features, b: Features) -> None:
    """Raise DataError unless both files hold features of the same width (the same model)."""
    if a.dim != b.dim:
        raise DataError(f"{a.path} has {a.dim}-dim features but {b.path} has {b.dim}-dim ones; "
                        "extract both with the same model")


def _is_id(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _check_rows(matrix: np.ndarray, ids: Sequence[Id], places: Sequence[int], unit: str) -> list[str]:
    """Problems: rows with NaN/inf and rows of zeros (checked in chunks, so a memmap is never loaded
    whole), and ids met more than once (by id_key, so 94 and "94" collide). `places[i]` names row i
    as a `unit`."""
    step = max(1, _CHUNK_VALUES // max(1, matrix.shape[1]))
    bad, zero = [], []
    for s in range(0, len(matrix), step):
        chunk = matrix[s:s + step]
        bad += [places[s + i] for i in np.flatnonzero(~np.isfinite(chunk).all(axis=1)).tolist()]
        zero += [places[s + i] for i in np.flatnonzero(~chunk.any(axis=1)).tolist()]  # NaN counts as nonzero
    problems = []
    if bad:
        problems.append(f"NaN or infinite values on {len(bad)} {unit}{'s' * (len(bad) > 1)}: {preview(bad)}")
    if zero:
        problems.append(f"only zeros on {len(zero)} {unit}{'s' * (len(zero) > 1)}: {preview(zero)} (an "
                        "L2-normalised feature is never all zero: the extraction that wrote it is broken)")
    first: dict[str, int] = {}
    dups: dict[str, list[int]] = {}
    for key, at in zip(map(id_key, ids), places):
        dups.setdefault(key, [first[key]]).append(at) if key in first else first.setdefault(key, at)
    if dups:
        shown = ", ".join(f"{k!r} ({unit}s {str(at[:3])[1:-1]})" for k, at in list(dups.items())[:5])
        problems.append(f"{len(dups)} ids occur more than once: {shown}" + (", ..." if len(dups) > 5 else ""))
    return problems


# ---- reading ----

def read_features(path: str | os.PathLike, *, expect: str | None = None, progress: bool = False) -> Features:
    """Read a feature file: `.npy` (with its ids file) or JSON lines. `expect` ("image" or
    "text") only words the messages. Every problem is collected and raised once as DataError.
    `progress` shows a bar over the bytes of a JSON-lines file while it is parsed."""
    if expect not in (None, "image", "text"):
        raise ValueError(f"expect must be None, 'image' or 'text', got {expect!r}")
    path = Path(path)
    what = f"{expect} features" if expect else "features"
    check_input_file(path, f"{what} (.jsonl, or .npy beside its .ids.jsonl)")
    if path.suffix == ".npy":
        return _read_npy(path, what)

    with tqdm(total=path.stat().st_size, desc=f"read {path.name}", unit="B", unit_scale=True,
              disable=not progress) as bar:
        return _read_jsonl(path, what, bar.update)


def _read_npy(path: Path, what: str) -> Features:
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy matrix ({e})") from None
    if not isinstance(matrix, np.ndarray) or matrix.ndim != 2 or matrix.dtype not in NPY_DTYPES:
        got = f"shape {matrix.shape}, dtype {matrix.dtype.str}" if isinstance(matrix, np.ndarray) else ".npz"
        raise DataError(f"{path}: expected a 2-D float16 or float32 matrix of {what}, got {got}")
    ids_path = npy_ids_path(path)
    if not ids_path.exists() and not ids_path.is_symlink():
        raise DataError(f"{path}: its ids file {ids_path} is missing; {_REWRITE}")
    check_input_file(ids_path, f"the ids file of {path}")
    header, ids, problems = _read_ids_file(ids_path)
    field, described = header.get("id_field"), tuple(header.get(k) for k in ("count", "dim", "dtype"))
    if field not in ID_FIELDS or described != (*matrix.shape, matrix.dtype.name) or len(ids) != len(matrix):
        problems.append(f'{ids_path} (header {{"id_field": {field!r}, "count", "dim", "dtype": {described}}}, '
                        f"{len(ids)} ids) does not describe {path} ({matrix.shape[0]} x {matrix.shape[1]} "
                        f"{matrix.dtype.name}); {_REWRITE}")
    problems += _check_rows(matrix, ids, range(len(matrix)), "0-based row") if len(matrix) else ["no rows"]
    raise_collected(problems, f"{path}: bad {what} file")
    return Features(path, field, ids, matrix)


def _read_ids_file(ids_path: Path) -> tuple[dict, list[Id], list[str]]:
    """The header and ids of a `.ids.jsonl` file, and its problems (named by line)."""
    problems, header, ids, blank = [], None, [], []
    with open(ids_path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                blank.append(lineno)
                continue
            try:
                value = json.loads(raw)
            except ValueError as e:
                problems.append(f"{ids_path.name} line {lineno}: malformed JSON ({e})")
                continue
            if header is None:
                header = value if isinstance(value, dict) else {}
                continue
            if not _is_id(value):
                problems.append(f"{ids_path.name} line {lineno}: expected an int or string id, "
                                f"got {value!r:.40}")
            ids.append(value)
    if header is not None:
        warn_blank_lines(ids_path, blank)
    return header or {}, ids, problems


_HEADS = {b'{"image_id": ': "image_id", b'{"query_id": ': "query_id"}  # both 13 bytes, as json.dumps
_KEY = b', "feature": ['
_PLAIN_ID = re.compile(rb'"([^"\\\x00-\x1f]+)"|-?(?:0|[1-9][0-9]*)')  # what json.loads reads as is


def _id_from(text: bytes) -> object:
    plain = _PLAIN_ID.fullmatch(text)
    return json.loads(text) if not plain else plain[1].decode() if plain[1] else int(text)


def _read_jsonl(path: Path, what: str, advance=lambda n: None) -> Features:
    ids, rows, lines, problems = [], [], [], []
    first: dict = {}  # id field, dim and line of the first good row
    pending: list[tuple[int, str, Id, bytes, int]] = []  # lines awaiting the bulk parse

    def accept(lineno: int, field: str, id_: Id, row: np.ndarray) -> None:
        if not first:
            first.update(field=field, dim=row.size, line=lineno)
        if field != first["field"]:
            problems.append(f'line {lineno}: id field "{field}" but line {first["line"]} has '
                            f'"{first["field"]}"; a file holds either image or text features')
        elif row.size != first["dim"]:
            problems.append(f"line {lineno}: {row.size} feature values, expected {first['dim']} "
                            f"as on line {first['line']}")
        else:
            ids.append(id_), rows.append(row), lines.append(lineno)

    def slow(lineno: int, raw: bytes) -> None:  # json.loads decides: the reference behaviour
        try:
            obj = json.loads(raw)
        except ValueError as e:
            problems.append(f"line {lineno}: malformed JSON ({e})")
            return
        # as predict_evaluate.py (spec 4.2): the line's id is its query_id if it has one, else its image_id
        field = next((f for f in ("query_id", "image_id") if isinstance(obj, dict) and f in obj), None)
        if field is None or "feature" not in obj:
            problems.append(f'line {lineno}: expected an object with "feature" and "image_id" or "query_id"')
            return
        feat = obj["feature"]
        if not _is_id(obj[field]):
            problems.append(f'line {lineno}: "{field}" must be an int or a non-empty string, '
                            f"got {obj[field]!r:.40}")
        elif not isinstance(feat, list) or not feat or not all(type(v) in (int, float) for v in feat):
            problems.append(f'line {lineno}: "feature" must be a non-empty list of numbers')
        else:
            try:
                with np.errstate(over="ignore"):  # beyond float32 is inf, reported as such
                    accept(lineno, field, obj[field], np.array(feat, dtype=np.float32))
            except OverflowError:
                problems.append(f"line {lineno}: a feature value is too large for float32")

    def flush() -> None:
        if not pending:
            return
        parsed = _parse_numbers([raw[k + len(_KEY):-2] for *_, raw, k in pending])
        if parsed is None:  # something unusual in this chunk: json.loads judges it line by line
            for lineno, _, _, raw, _ in pending:
                slow(lineno, raw)
        else:
            values, ends = parsed
            for (lineno, field, id_, _, _), start, end in zip(pending, [0] + ends[:-1], ends):
                accept(lineno, field, id_, values[start:end])
        pending.clear()

    size, blank = 0, []  # bytes of the pending lines; blank line numbers
    with open(path, "rb") as f:
        unreported = 0  # bytes read since the progress bar last moved
        for lineno, raw in enumerate(f, start=1):
            unreported += len(raw)
            if unreported >= _PROGRESS_BYTES:
                advance(unreported)
                unreported = 0
            raw = raw.rstrip()
            field, k = _HEADS.get(raw[:13]), raw.find(_KEY, 13)
            try:
                fast = field and 0 < k < len(raw) - len(_KEY) - 2 and raw.endswith(b"]}")
                id_ = _id_from(raw[13:k]) if fast else None
            except ValueError:
                id_ = None
            if not _is_id(id_):
                if raw:
                    flush()  # rows stay in file order
                    slow(lineno, raw)
                else:
                    blank.append(lineno)
                continue
            size = len(raw) + (size if pending else 0)
            pending.append((lineno, field, id_, raw, k))
            if size >= _CHUNK_BYTES:
                flush()
        advance(unreported)
    flush()
    matrix = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    if not rows and not problems:
        problems.append("the file is empty; expected one JSON object per line")
    else:
        warn_blank_lines(path, blank)
    raise_collected(problems + _check_rows(matrix, ids, lines, "line"), f"{path}: bad {what} file")
    return Features(path, first["field"], ids, matrix)


_E_TO_COMMA = bytes.maketrans(b"eE", b",,")
_POW10 = np.array([float(f"1e{e}") for e in range(-340, 309)])  # correctly rounded 10^e


def _digit(v: np.ndarray) -> np.ndarray:
    return (v - 48).astype(np.uint8) < 10  # uint8 wraps below "0"


def _parse_numbers(texts: list[bytes]) -> tuple[np.ndarray, list[int]] | None:
    """Parse the insides of JSON number lists written with ", " separators, in bulk.

    Returns the float32 values of all lists and where each list ends, or None when some text is
    not such a list of valid JSON numbers (the caller then asks json.loads). Each number is read as
    an integer (its digits without the dot) and a power of ten; their float64 product is within
    two float64 ulps of the decimal, so its float32 rounding is the exact one unless it lies near
    a float32 rounding midpoint; those values (never seen in files json.dumps wrote) go through
    json.loads, as do overflowing digit strings and extreme exponents.
    """
    blob = b", ".join(texts)
    b = np.frombuffer(blob, np.uint8)
    seps = np.flatnonzero(b == 44)
    # the grammar is ", " between numbers -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?: checked here where
    # fromstring (strtoll) is lenient (signs, dots, leading zeros, whitespace); the rest it rejects
    if not _digit(b[-1:]).all() or not (b[seps + 1] == 32).all():
        return None
    start, end = np.append(0, seps + 2), np.append(seps, b.size)
    neg = b[start] == 45
    is_float = np.zeros(start.size, bool)  # json reads "-0" as the int 0, but "-0.0" as -0.0
    lead = np.minimum(start + neg, b.size - 1)
    zero_digit = (b[lead] == 48) & (lead + 1 < b.size) & _digit(b[np.minimum(lead + 1, b.size - 1)])
    dots, exps = np.flatnonzero(b == 46), np.flatnonzero(b > 57)  # e, E (or junk fromstring rejects)
    one_each = dots.size == start.size and (dots < end).all() and (dots[1:] > seps).all()  # usual
    dot_of = np.arange(dots.size) if one_each else np.searchsorted(seps, dots)  # numbers they are in
    exp_of = np.searchsorted(seps, exps)
    sign = b[np.minimum(exps + 1, b.size - 1)]
    after = np.where((sign == 43) | (sign == 45), b[np.minimum(exps + 2, b.size - 1)], sign)
    mant_end = end.copy()
    mant_end[exp_of], is_float[exp_of], is_float[dot_of] = exps, True, True
    digits_around = b[lead], b[end - 1], b[exps - 1], after, b[np.minimum(dots + 1, b.size - 1)]
    if not all(_digit(v).all() for v in digits_around) or zero_digit.any() \
            or (np.diff(dot_of) <= 0).any() or (np.diff(exp_of) <= 0).any() or (dots > mant_end[dot_of]).any():
        return None
    try:
        with warnings.catch_warnings():  # numpy < 2 warned (and stopped early) where 2 raises
            warnings.simplefilter("ignore", DeprecationWarning)
            ints = np.fromstring(blob.translate(_E_TO_COMMA, b"."), dtype=np.int64, sep=",")
    except ValueError:
        return None
    if ints.size != seps.size + 1 + exps.size:  # numpy < 2 stops early (with a warning) on bad text
        return None
    exp10 = np.zeros(seps.size + 1, np.int64)
    if exps.size:  # each exponent was parsed as the integer after its mantissa
        at = exp_of + np.arange(1, exps.size + 1)
        exp10[exp_of], ints = ints[at], np.delete(ints, at)
    exp10[dot_of] -= mant_end[dot_of] - dots - 1
    fine = (exp10 >= -340) & (exp10 < 309) & (ints < 10**18) & (ints > -10**18)  # no clipped digits
    value = np.abs(ints) * _POW10[np.where(fine, exp10 + 340, 0)]
    np.negative(value, out=value, where=neg & (is_float | (ints != 0)))
    with np.errstate(over="ignore", invalid="ignore"):  # inf is reported by the caller
        out = value.astype(np.float32)
        fine &= np.abs(value - out) <= np.abs(out) * 2.0**-27  # far from a float32 rounding midpoint
        try:
            for t in np.flatnonzero(~fine).tolist():
                out[t] = np.array([json.loads(blob[start[t]:end[t]])], dtype=np.float32)[0]
        except OverflowError:  # an integer beyond float: json.loads reports it line by line
            return None
    line_ends = np.cumsum([len(t) + 2 for t in texts]) - 2
    return out, (np.searchsorted(seps, line_ends) + 1).tolist()


# ---- writing ----

def write_features(path: str | os.PathLike, ids: Sequence[Id], matrix: np.ndarray, *, id_field: str,
                   fmt: str = "jsonl", dtype: str = "float32", staged: OutputSet | None = None) -> list[Path]:
    """Write features atomically; returns the files written.

    fmt="jsonl": the original's lines, byte for byte, with float32 values whatever `dtype` says.
    fmt="npy": a `dtype` matrix, then its ids file; on any error neither is left.
    With `staged`, the files go to the output set's staging paths for `path` (and its ids file),
    to appear with the set's other outputs.
    """
    path = Path(path)
    if id_field not in ID_FIELDS or fmt not in FORMATS or dtype not in NPY_DTYPES:
        raise ConfigError(f"write_features: id_field must be one of {ID_FIELDS}, fmt one of {FORMATS}, "
                          f"dtype one of {NPY_DTYPES}; got {id_field!r}, {fmt!r}, {dtype!r}")
    if (path.suffix == ".npy") != (fmt == "npy"):
        raise ConfigError(f"{path}: fmt={fmt!r} does not match the suffix; readers pick the format by "
                          "suffix, so use .npy exactly for fmt='npy'")
    ids = [int(i) if isinstance(i, np.integer) else i for i in ids]
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.size == 0 or not np.issubdtype(matrix.dtype, np.number) \
            or np.issubdtype(matrix.dtype, np.complexfloating):
        raise DataError(f"{path}: expected a non-empty 2-D (rows, dim) float matrix, got shape "
                        f"{matrix.shape}, dtype {matrix.dtype}")
    with np.errstate(over="ignore"):  # values beyond the format's range become inf, reported below
        values = matrix.astype(np.float16 if fmt == "npy" and dtype == "float16" else np.float32, copy=False)
    bad_ids = [i for i in ids if not _is_id(i)]
    problems = [f"{len(ids)} ids for {len(matrix)} rows"] if len(ids) != len(matrix) else []
    problems += [f"ids must be ints or non-empty strings: {preview(bad_ids)}"] if bad_ids else \
        _check_rows(values, ids, range(len(values)), "0-based row")
    raise_collected(problems, f"{path}: cannot write {values.dtype} features")
    ids_path = npy_ids_path(path)
    if staged is not None:
        out, out_ids = nullcontext(staged.path(path)), nullcontext(staged.path(ids_path) if fmt == "npy" else None)
    else:
        out, out_ids = atomic_output(path), (atomic_output(ids_path) if fmt == "npy" else nullcontext())
    if fmt == "jsonl":
        step = max(1, _CHUNK_VALUES // values.shape[1])
        with out as tmp, open(tmp, "wb") as f:
            f.writelines(_jsonl_lines(ids[s:s + step], values[s:s + step], id_field) for s in range(0, len(ids), step))
        return [path]
    header = {"id_field": id_field, "count": len(ids), "dim": values.shape[1], "dtype": dtype}
    # both temporaries are complete before either rename: the matrix first, then its ids
    with out_ids as tmp_ids, out as tmp_npy:
        with open(tmp_npy, "wb") as f:
            np.save(f, np.ascontiguousarray(values))
        with open(tmp_ids, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x) + "\n" for x in [header, *ids])
    return [path, ids_path]


def _jsonl_lines(ids: list[Id], rows: np.ndarray, id_field: str) -> bytes:
    """`json.dumps({id_field: id, "feature": row.tolist()}) + "\\n"` for each float32 row."""
    body, ends, exact = _format_rows(rows)
    out = []
    for i, (start, end, ok) in enumerate(zip([0] + ends[:-1], ends, exact)):
        if ok:  # the head comes from json.dumps too, so ids are escaped exactly as the original
            out += [json.dumps({id_field: ids[i], "feature": []})[:-2].encode(), body[start:end], b"]}\n"]
        else:
            out.append(json.dumps({id_field: ids[i], "feature": rows[i].tolist()}).encode() + b"\n")
    return b"".join(out)


_P5 = np.array([5**k for k in range(27)], dtype=np.int64)
_P10 = np.array([10**k for k in range(18)], dtype=np.int64)
_P_OF_EXP = np.array([math.floor((e - 127) * math.log10(2)) for e in range(256)])  # by float32 exponent
_LUT4 = np.frombuffer("".join(f"{i:04d}" for i in range(10000)).encode(), np.uint32)  # "0042" as a word
_LUT_EXP = np.frombuffer(b"".join(b"e-%02d" % i for i in range(11)), np.uint32)  # "e-05" as a word
_TEMPLATE = np.frombuffer(b"-0.000d.dddddddddddddddde-00,   ", np.uint32)  # 32 bytes for one value


def _keep_table() -> np.ndarray:
    """The template bytes a value keeps, by code ((neg*5 + mode)*18 + n)*2 + not_last, where mode
    is the number of zeros after "0." (0 to 3), or 4 for the 1.5e-05 style, and n the digits."""
    grid = np.meshgrid(range(2), range(5), range(18), range(2), indexing="ij")
    neg, mode, n, not_last = (g.ravel() for g in grid)
    pos = mode < 4
    keep = np.zeros((neg.size, 32), bool)
    keep[:, 0], keep[:, 1], keep[:, 2], keep[:, 6], keep[:, 7] = neg, pos, pos, True, ~pos & (n > 1)
    keep[:, 3:6] = pos[:, None] & (np.arange(3) < mode[:, None])
    keep[:, 8:24] = np.arange(2, 18) <= n[:, None]
    keep[:, 24:28] = ~pos[:, None]
    keep[:, 28:30] = not_last[:, None] == 1
    return keep


_KEEP = _keep_table()
_KEEP_LEN = _KEEP.sum(axis=1)


def _shortest(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """repr() digits of float32 values widened to float64, for a = 0 or 2^-33 <= a < 1.

    Returns (N, n, p, exact): the shortest decimal that reads back as a is N * 10^(p-16), with n
    significant digits (N has 17, the last 17-n being zeros) and p = floor(log10 a); where exact is
    False, repr must decide. Python's repr (David Gay's dtoa) takes the fewest digits that read
    back as a and, of those, the nearest to a (ties to even); this decides the same in exact int64
    arithmetic on a = M * 2^E with M < 2^24.
    """
    zero = a == 0
    u = np.where(zero, np.float32(0.5), a).view(np.uint32).astype(np.int64)
    M, E = (u & 0x7FFFFF) | 0x800000, (u >> 23) - 150
    p = _P_OF_EXP[u >> 23]  # floor(log10 a), or one less
    p += (p < -1) & (M * _P10[-p - 1] >= (1 << -E))  # a >= 10^(p+1) iff M * 10^-(p+1) >= 2^-E
    k = 16 - p  # a * 10^k is in [1e16, 1e17)
    s = -(E + k)  # a * 10^k = M * 5^k / 2^s exactly, with 6 <= s <= 31
    p5 = _P5[k]
    hi, lo = M * (p5 >> 32), M * (p5 & 0xFFFFFFFF)  # M * 5^k = hi * 2^32 + lo
    q = (hi << (32 - s)) + (lo >> s)  # floor(a * 10^k) < 2^57
    rem = lo & ((1 << s) - 1)  # the fraction, in units of 2^-s
    # a decimal reads back as a iff within half a float64 ulp of a: 5^k / 2^30 units of 2^-s (never
    # an integer, so never a tie). Below a power of two the gap is half as wide, and dtoa may then
    # take a farther decimal: those are left to repr
    half_ulp = p5 >> 30
    unit_s = 1 << s
    up = (rem > unit_s >> 1) | ((rem == unit_s >> 1) & (q & 1 == 1))
    N = q + up
    dist = rem - up * unit_s  # (a - N) * 10^k, in units of 2^-s
    exact = (np.abs(dist) <= half_ulp) & (N < _P10[17]) & (M != 0x800000)
    n = np.full(a.shape, 17, np.int64)
    idx = np.flatnonzero(exact & ~zero)  # the values still being shortened
    q, rem, unit_s, half_ulp = (v[idx] for v in (q, rem, unit_s, half_ulp))
    for j in range(1, 17):  # one digit fewer while that still reads back (if n fail, fewer fail)
        unit = _P10[j]
        base = q // unit
        r = q - base * unit
        cand = (base + ((r > unit // 2) | ((r == unit // 2) & ((rem > 0) | (base & 1 == 1))))) * unit
        gap = q - cand  # half a float64 ulp is under 12 units of 10^-k
        dist = np.clip(gap, -64, 64) * unit_s + rem
        ok = np.flatnonzero((np.abs(gap) < 64) & (np.abs(dist) <= half_ulp))
        idx, q, rem, unit_s, half_ulp, cand = (v[ok] for v in (idx, q, rem, unit_s, half_ulp, cand))
        N[idx], n[idx] = cand, 17 - j
        if not idx.size:
            break
    N[zero], n[zero], p[zero] = 0, 1, -1
    return N, n, p, exact | zero


def _format_rows(rows: np.ndarray) -> tuple[bytes, list[int], list[bool]]:
    """The ", "-joined repr() of each float32 row: (all rows' bytes, where each ends, exact rows).

    Rows with a value outside the proven range (|x| >= 1, tiny, or undecided) are not exact: their
    bytes here are placeholders and json.dumps must print them.
    """
    R, D = rows.shape
    x = rows.ravel()
    a = np.abs(x)
    inside = ((a >= 2.0**-33) & (a < 1)) | (a == 0)
    N, n, p, exact = _shortest(np.where(inside, a, np.float32(0.5)))
    mode = np.where(p >= -4, -p - 1, 4)  # repr switches to 1.5e-05 below 1e-4
    code = ((np.signbit(x) * 5 + mode) * 18 + n) * 2 + (np.arange(x.size) % D != D - 1)
    words = np.empty((x.size, 8), np.uint32)  # (values, 8 words): the template, filled in
    words[:] = _TEMPLATE
    words[:, 6] = _LUT_EXP[-p]
    rest = N % _P10[16]
    high, low = rest // _P10[8], rest % _P10[8]
    for col, group in enumerate((high // 10000, high % 10000, low // 10000, low % 10000), start=2):
        words[:, col] = _LUT4[group]
    chars = words.view(np.uint8)
    chars[:, 6] = 48 + N // _P10[16]
    ends = np.cumsum(_KEEP_LEN[code].reshape(R, D).sum(axis=1)).tolist()
    return chars[_KEEP[code]].tobytes(), ends, (inside & exact).reshape(R, D).all(axis=1).tolist()
