"""The Triton kernel behind `fklip.retrieval.fused`: exact top-k fused with the score matmul. It
keeps a running top-k per query while it computes query @ gallery.T, so the (Q, N) scores never
reach memory. This module imports triton (the only one of fklip.retrieval that does);
`fklip.retrieval.fused` imports it only when the kernel is used.

The kernel, for a block of BLOCK_M queries and one split of the gallery rows:

* scores of BLOCK_N gallery rows at a time: `tl.dot` over BLOCK_D-wide slices of the features,
  accumulated in float32 (fp16/bf16 products are exact in float32; float32 inputs use IEEE
  float32, never TF32), i.e. the float32 scores of the torch path up to the order of summation;
* a running top-K per query row in registers (values, local indices), and its worst value `thr`.
  A score block with nothing above `thr` in any row costs one compare and one max. Otherwise
  the candidates (scores > thr) go in one at a time: each row's best candidate (the lowest
  column among equal scores) replaces the row's worst entry (the lowest score, and among equal
  scores the highest index), then `thr` is recomputed and the candidates re-filtered. On random
  unit features that loop is the common case, not the exception: 808 of the 869 score blocks of
  one 128-query block held a candidate (a split of 111,232 rows, as 8,192 x 1,000,000 is cut;
  computed on the CPU), since each of 128 rows has a k * BLOCK_N / n chance per block at row n;
* the tie rule holds with a strict `>`: a split reads its rows in increasing order, so a later
  score equal to an entry's can never beat it, and within a block the leftmost of equal scores
  goes in first;
* -0.0 is stored as +0.0, as in the torch path.

Each (query block, split) writes its K entries; the caller packs them into the same int64 keys
as the torch path (score bits, inverted index) and merges the splits with one `torch.topk`, whose
answer is unique because keys are. On a CPU tensor the kernel runs in Triton's interpreter
(numpy; slow; TRITON_INTERPRET=1 must be set before triton is first imported): that is how CI
tests it against `topk_reference`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ELEMENTS = 2**31 - 1  # per operand: the kernel's row * stride offsets are int32
MAX_K = 32  # the running top-k lives in registers: (BLOCK_M, next power of two >= k) per program
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int = 128  # queries per program
    block_n: int = 128  # gallery rows per score block
    block_d: int = 64  # feature slice per tl.dot
    num_warps: int = 8
    num_stages: int = 3


# Small tiles for Triton's interpreter (CPU tensors: tests), so small inputs span several blocks.
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=64, block_d=32)


@triton.jit
def _fused_topk_kernel(q_ptr, g_ptr, val_ptr, idx_ptr, n_query, n_rows, dim, rows_per_split,
                       stride_q, stride_g, stride_out_m, stride_out_s,
                       K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) query rows
    row_ok = rm < n_query
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, n_rows)
    slots = tl.arange(0, KP)  # (KP,) places of the running top-k; those >= K hold +inf for good
    cols = tl.arange(0, BLOCK_N)  # (BN,)
    best_v = tl.where(slots[None, :] < K, tl.full((BLOCK_M, KP), float("-inf"), tl.float32),
                      tl.full((BLOCK_M, KP), float("inf"), tl.float32))  # (BM, KP)
    best_i = tl.full((BLOCK_M, KP), -1, tl.int32)  # (BM, KP) row numbers in the gallery chunk
    thr = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # (BM,) each row's worst kept score
    for n0 in range(start, stop, BLOCK_N):
        rn = n0 + cols  # (BN,) gallery rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)  # (BD,)
            q = tl.load(q_ptr + rm[:, None] * stride_q + rd[None, :],
                        mask=row_ok[:, None] & (rd[None, :] < dim), other=0.0)  # (BM, BD)
            g = tl.load(g_ptr + rn[None, :] * stride_g + rd[:, None],
                        mask=(rn[None, :] < stop) & (rd[:, None] < dim), other=0.0)  # (BD, BN)
            if IEEE:
                acc = tl.dot(q, g, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, g, acc)
        s = tl.where(row_ok[:, None] & (rn[None, :] < stop), acc, float("-inf"))  # (BM, BN)
        s = tl.where(s > thr[:, None], s, float("-inf"))  # candidates only
        while tl.max(tl.max(s, axis=1), axis=0) > float("-inf"):
            m = tl.max(s, axis=1)  # (BM,) each row's best candidate
            j = tl.argmax(s, axis=1, tie_break_left=True)  # (BM,) its column, leftmost of equals
            hit = m > float("-inf")
            worst = tl.min(best_v, axis=1)  # (BM,)
            at_worst = best_v == worst[:, None]  # (BM, KP)
            worst_i = tl.max(tl.where(at_worst, best_i, -1), axis=1)  # highest index among them
            victim = at_worst & (best_i == worst_i[:, None])
            slot = tl.argmax(victim.to(tl.int32), axis=1, tie_break_left=True)  # (BM,)
            put = hit[:, None] & (slots[None, :] == slot[:, None])  # (BM, KP)
            best_v = tl.where(put, tl.where(m == 0.0, 0.0, m)[:, None], best_v)  # -0.0 -> +0.0
            best_i = tl.where(put, (n0 + j)[:, None], best_i)
            thr = tl.min(best_v, axis=1)
            s = tl.where(cols[None, :] == j[:, None], float("-inf"), s)
            s = tl.where(s > thr[:, None], s, float("-inf"))
    out = rm[:, None] * stride_out_m + pid_s * stride_out_s + slots[None, :]  # (BM, KP)
    keep = row_ok[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, best_v, mask=keep)
    tl.store(idx_ptr + out, best_i, mask=keep)


def interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was
    first imported): then the kernel takes CPU tensors."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _splits(n_query_blocks: int, n_rows: int, device: torch.device, cfg: KernelConfig) -> int:
    """Gallery splits per query block: enough programs to fill the GPU (4 per SM), each split
    still long enough (8 score blocks) that the running top-k settles and most blocks are cheap."""
    if device.type != "cuda":  # the interpreter: a few splits, so the tests exercise the merge
        return max(1, min(3, n_rows // (2 * cfg.block_n)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-4 * sms // n_query_blocks), n_rows // (8 * cfg.block_n)))


def operand_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both operands are given to tl.dot in: their own when they agree (fp16, bf16 or
    float32), float32 otherwise (products of fp16 or bf16 values are exact in float32 either way)."""
    return a if a == b else torch.float32


def fused_topk(queries: Tensor, rows: Tensor, k: int, *, splits: int | None = None,
               config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Each query's k best rows, unsorted, from split-wise running top-k: values (Q, S*k) float32
    and indices (Q, S*k) int64 into `rows`, -1 (with value -inf) where a split had fewer than k
    rows. Every one of a row's k best (under the tie rule) is among them.

    queries (Q, D) and rows (N, D): float16, bfloat16 or float32 tensors on one device, contiguous
    rows; k <= MAX_K. `splits` overrides the number of gallery splits (tests)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"fused top-k supports 1 <= k <= {MAX_K}, got {k}")
    if queries.device != rows.device:
        raise ValueError(f"queries on {queries.device} but rows on {rows.device}")
    if queries.device.type != "cuda" and not interpreted():
        raise ValueError("fused top-k needs CUDA tensors; CPU tensors only under Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    cfg = config or (KernelConfig() if queries.device.type == "cuda" else INTERPRETER_CONFIG)
    dtype = operand_dtype(queries.dtype, rows.dtype)
    if dtype == torch.bfloat16 and interpreted():
        dtype = torch.float32  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
    queries = queries.to(dtype).contiguous()  # (Q, D)
    rows = rows.to(dtype).contiguous()  # (N, D)
    n_query, dim = queries.shape
    n_rows = rows.shape[0]
    if max(n_query, n_rows) * dim > MAX_ELEMENTS:
        raise ValueError(f"fused top-k takes at most {MAX_ELEMENTS} elements per operand, got "
                         f"({n_query} and {n_rows}) x {dim}; call it on chunks")
    m_blocks = -(-n_query // cfg.block_m)
    n_splits = splits or _splits(m_blocks, n_rows, queries.device, cfg)
    rows_per_split = -(-n_rows // n_splits)
    rows_per_split = -(-rows_per_split // cfg.block_n) * cfg.block_n  # whole score blocks
    n_splits = -(-n_rows // rows_per_split)  # no empty split
    values = torch.empty((n_query, n_splits, k), dtype=torch.float32, device=queries.device)
    index = torch.empty((n_query, n_splits, k), dtype=torch.int32, device=queries.device)
    options = {} if interpreted() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    # Triton launches on the current CUDA device: make it the tensors' (cuda:1 while the current
    # device is 0 would be an illegal access)
    on_device = torch.cuda.device(queries.device) if queries.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _fused_topk_kernel[(m_blocks, n_splits)](
            queries, rows, values, index, n_query, n_rows, dim, rows_per_split,
            queries.stride(0), rows.stride(0), values.stride(0), values.stride(1),
            K=k, KP=max(2, 1 << math.ceil(math.log2(k))), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d, IEEE=dtype == torch.float32, **options)
    return values.view(n_query, -1), index.view(n_query, -1).to(torch.int64)

