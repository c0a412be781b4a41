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
from fklip.retrieval import topk_chunked, topk_reference
from tests.conftest import ROOT
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
                            capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed[1]) >= 20, result.stdout[-2000:]  # the kernel tests ran
