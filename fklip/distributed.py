"""torch.distributed plumbing for torchrun: one process per device, gloo on CPU, nccl on CUDA.

Only rank 0 logs and writes. Helpers split work into contiguous shards and gather rows back in
rank order, so a sharded computation reproduces the single-process one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    logger.info("rank %d of %d on %s", rank, world, device)
    return DistContext(rank, world, local_rank, device)


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
