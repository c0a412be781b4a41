"""The fused top-k's errors in this process, and its kernel cases (tests/fused_topk_cases.py)
on the CPU under Triton's interpreter, which must be chosen before triton is first imported: a
fresh process runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fklip.errors import ConfigError
from fklip.retrieval import chunked, topk_chunked, topk_reference
from tests.conftest import HANG_S, ROOT
from tests.test_retrieval import assert_same, grid_features


def test_method_errors():
    queries = grid_features(4, 8)
    with pytest.raises(ConfigError, match="method must be one of auto, torch, fused"):
        topk_chunked(queries, queries, 2, method="faiss")
    with pytest.raises(ConfigError, match="method 'fused' cannot run: .*(CUDA|triton)"):
        topk_chunked(queries, queries, 2, method="fused")
    # "auto" on CPU is the torch path: same results as the reference
    assert_same(topk_chunked(queries, queries, 3), topk_reference(queries, queries, 3))


def test_kernel_under_interpreter():
    """Runs the kernel cases on the CPU, under Triton's interpreter, in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                             str(ROOT / "tests" / "fused_topk_cases.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False, timeout=HANG_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed[1]) >= 20, result.stdout[-2000:]  # the kernel tests ran


def test_auto_falls_back_to_torch_when_the_kernel_fails(monkeypatch, caplog):
    """"auto" answers from the torch path when the kernel itself fails (a compile, resource or
    launch error), with a warning; "fused" raises it."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, required: 262144\nmore lines")

    monkeypatch.setattr(chunked, "resolve_method", lambda *args, **kwargs: "fused")
    monkeypatch.setattr(chunked, "search_fused", broken)
    queries, gallery = grid_features(9, 8, seed=1), grid_features(70, 8, seed=2)
    with caplog.at_level("WARNING", logger="fklip.retrieval"):
        got = topk_chunked(queries, gallery, 5, query_chunk=4, gallery_chunk=16)
    assert_same(got, topk_reference(queries, gallery, 5))
    assert "the fused kernel failed (RuntimeError: out of resource: shared memory, required: 262144)" in caplog.text
    with pytest.raises(RuntimeError, match="out of resource"):
        topk_chunked(queries, gallery, 5, method="fused")
