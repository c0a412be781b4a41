"""Shared fixtures: tiny models built once per session, small generated files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Time limits in tests only catch hangs. A busy laptop or a shared 2-core runner can run a command
# tens of times slower than usual (`fklip demo`, about a minute on 2 idle cores, took 39 minutes
# beside 4 busy loops and two other test suites), and that is no bug: every subprocess and wait in
# the suite gets an hour.
HANG_S = 3600


@pytest.fixture(scope="session")
def tiny_spec():
    from fklip.model import ModelSpec

    return ModelSpec.from_name("fklip-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_spec):
    import torch

    from fklip.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_spec)


def write_lines(path: Path, lines: list) -> Path:
    """Write JSON lines; str items are written verbatim (to build malformed files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def free_port() -> int:
    """A free TCP port on the loopback, for torchrun's rendezvous in tests."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fklip(*args: str, cwd: Path | None = None, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`python -m fklip`), capturing output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fklip", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo dataset at the tiny model's image size."""
    from fklip.data.demo_dataset import DemoDataConfig, generate_demo

    out = tmp_path_factory.mktemp("demo")
    return generate_demo(DemoDataConfig(out=out, seed=1, size=64, train=8, val=12, kb=8))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_spec):
    from fklip.model import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_model, tiny_spec)
    return path
