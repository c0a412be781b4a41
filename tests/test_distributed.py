"""fklip.distributed's start under torchrun, without starting processes: what it hands
torch.distributed and what it refuses. The real multi-process runs (gloo) are in test_eval.py
and test_train.py."""

from __future__ import annotations

import datetime

import pytest
import torch

from fklip import distributed
from fklip.errors import ConfigError


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives process 1 of 2, and a process group that records its start."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FKLIP_DIST_TIMEOUT_S", raising=False)
    started = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: started.append((backend, kw)))
    return started


def test_process_group_gets_a_long_timeout(torchrun_env, monkeypatch):
    """Waiting ranks sit in a barrier while rank 0 alone evaluates or writes: torch's 10 minutes
    (NCCL) would abort them, so the group gets 2 hours, or FKLIP_DIST_TIMEOUT_S."""
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (1, 2, 1, "cpu")
    assert torchrun_env == [("gloo", {"timeout": datetime.timedelta(hours=2), "device_id": None})]
    monkeypatch.setenv("FKLIP_DIST_TIMEOUT_S", "90")
    distributed.init_distributed("cpu")
    assert torchrun_env[-1][1]["timeout"] == datetime.timedelta(seconds=90)
    for bad in ("soon", "0", "-5", "inf", "nan", "1e20"):
        monkeypatch.setenv("FKLIP_DIST_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match=f"FKLIP_DIST_TIMEOUT_S: expected a positive number of seconds, got '{bad}'"):
            distributed.init_distributed("cpu")


def test_more_processes_than_gpus_is_a_clear_error(torchrun_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # LOCAL_RANK 1 needs a second GPU
    with pytest.raises(ConfigError, match=r"needs cuda:1, and torch sees 1 CUDA device\(s\).*--nproc_per_node"):
        distributed.init_distributed("cuda")
    assert torchrun_env == []  # refused before joining anything


def test_cuda_ranks_bind_their_own_gpu(torchrun_env, monkeypatch):
    """--device cuda:0 under torchrun still means cuda:LOCAL_RANK, and NCCL is bound to it."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    ctx = distributed.init_distributed("cuda:0")
    assert ctx.device == "cuda:1" and chosen == [1]
    assert torchrun_env == [("nccl", {"timeout": datetime.timedelta(hours=2), "device_id": torch.device("cuda:1")})]


def test_one_process_joins_nothing(torchrun_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed("cpu") == distributed.DistContext(device="cpu")
    assert torchrun_env == []
