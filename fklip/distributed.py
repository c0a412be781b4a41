"""torch.distributed plumbing for torchrun: one process per device, gloo on CPU, nccl on CUDA.

Only rank 0 logs and writes. Helpers split work into contiguous shards and gather rows back in
rank order, so a sharded computation reproduces the single-process one exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fklip.errors import ConfigError

logger = logging.getLogger(__name__)

DIST_TIMEOUT_S = 7200  # a collective's limit (torch's own: 10 minutes under NCCL, 30 under gloo)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone.

    Under torchrun `--device cuda` means this process's GPU (cuda:LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise ConfigError(f"--device {device} under torchrun: process {local_rank} of this machine needs "
                              f"cuda:{local_rank}, and torch sees {count} CUDA device(s); start at most "
                              f"{count} processes per machine (--nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # NCCL's default timeout (10 minutes) would abort the ranks that wait in a barrier while
        # rank 0 alone evaluates, saves or writes a large set; FKLIP_DIST_TIMEOUT_S sets it
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout(),
                                device_id=torch.device(device) if cuda else None)
    logger.info("rank %d of %d on %s", rank, world, device)
    return DistContext(rank, world, local_rank, device)


def _timeout() -> datetime.timedelta:
    value = os.environ.get("FKLIP_DIST_TIMEOUT_S", str(DIST_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 10**9:  # NaN and inf fail too
        raise ConfigError(f"FKLIP_DIST_TIMEOUT_S: expected a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def shutdown(ctx: DistContext, finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on every rank, wait for all of them
    first: a rank that tears gloo down while another still talks to it can abort at exit."""
    if ctx.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistContext]:
    """`init_distributed(device)` for the block, then `shutdown`, finished when the block raised
    nothing."""
    ctx = init_distributed(device)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        shutdown(ctx, finished)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of n items for `rank`; sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(local: torch.Tensor, n_total: int, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows (shards from `shard_range`) in rank order, on every rank."""
    if not ctx.distributed:
        return local
    sizes = [shard_range(n_total, r, ctx.world_size) for r in range(ctx.world_size)]
    longest = max(stop - start for start, stop in sizes)
    # all_gather needs equal shapes: pad each shard to the longest, then cut the padding off
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    padded[: len(local)] = local.to(ctx.device)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: stop - start] for p, (start, stop) in zip(parts, sizes)]).cpu()
