"""The fused top-k kernel compiled ahead of time for H100 (sm_90) and A100 (sm_80), without a GPU.

Triton's wheel carries its NVIDIA backend and ptxas, so CI can check what the GPU will run: the
kernel compiles for every dtype and k the search uses, its loads are pipelined (cp.async into
shared memory), its products run on tensor cores (wgmma on sm_90, mma on sm_80), and ptxas
reports no register spills for the default tiles. Arguments are specialised as the JIT does at
run time for 512-dim features (pointers and strides divisible by 16).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import triton  # comes with PyTorch's Linux x86_64 wheels, which CI installs


def _ptxas() -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert path.is_file(), f"this triton ({triton.__version__}) has no NVIDIA backend: no {path}"
    return path


SIGNATURE = {"q_ptr": "*fp16", "g_ptr": "*fp16", "val_ptr": "*fp32", "idx_ptr": "*i32", "n_query": "i32",
             "n_rows": "i32", "dim": "i32", "rows_per_split": "i32", "stride_q": "i32", "stride_g": "i32",
             "stride_out_m": "i32", "stride_out_s": "i32"}
ALIGNED = ("q_ptr", "g_ptr", "val_ptr", "idx_ptr", "dim", "rows_per_split", "stride_q", "stride_g")
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def compile_kernel(dtype: str, k: int, capability: int, tmp_path: Path):
    """(ptx, ptxas -v output, shared bytes) of the kernel for `dtype` features and `k`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fklip.retrieval.kernel import KernelConfig, _fused_topk_kernel

    cfg = KernelConfig()
    signature = {**SIGNATURE, "q_ptr": DTYPES[dtype], "g_ptr": DTYPES[dtype]}
    constants = {"K": k, "KP": max(2, 1 << (k - 1).bit_length()), "BLOCK_M": cfg.block_m,
                 "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "IEEE": dtype == "fp32"}
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    kernel = triton.compile(ASTSource(fn=_fused_topk_kernel, signature=signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = kernel.asm["ptx"]
    source = tmp_path / f"topk_{dtype}_{k}_sm{capability}.ptx"
    source.write_text(ptx)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    report = subprocess.run([str(_ptxas()), f"-arch={arch}", "-v", str(source), "-o", str(source.with_suffix(".cubin"))],
                            capture_output=True, text=True, check=True)
    return ptx, report.stdout + report.stderr, kernel.metadata.shared


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize(("dtype", "k"), [("fp16", 10), ("fp16", 1), ("fp16", 32), ("bf16", 20)])
def test_kernel_compiles_pipelined_on_tensor_cores_without_spills(dtype, k, capability, tmp_path):
    ptx, report, shared = compile_kernel(dtype, k, capability, tmp_path)
    assert ("wgmma" in ptx) if capability >= 90 else ("mma.sync" in ptx)
    assert "cp.async" in ptx and shared >= 2 * (128 * 64 + 64 * 128) * 2  # at least two stages in flight
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report


def test_float32_features_compile_with_ieee_products(tmp_path):
    """float32 features take IEEE products (never TF32): slower, exact, and they compile."""
    ptx, _, _ = compile_kernel("fp32", 10, 90, tmp_path)
    assert "tf32" not in ptx
