#!/usr/bin/env bash
# GPU checks and benchmarks for a lent H100/H200 machine (the device tool); downloads nothing.
#
# Its image has torch, torchvision, pytest, onnx and onnxruntime (CPU) but not open_clip or ftfy.
# Once, on the dev machine, in the repo root (the wheels are git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 click tqdm
# then run it with the device tool: command "bash benchmarks/gpu.sh [all|checks|bench]", carry [".whl"].
#
# checks: the CUDA tests that skip in CI (exact top-k on CUDA and the fused Triton kernel, the
#   torch engine's CUDA paths, amp training) and benchmarks/gpu_checks.py (1,000,000 x 1,000,000
#   exact top-k both ways, `fklip eval --device cuda` against the CPU); about 2.5 minutes.
# bench: benchmarks/gpu_bench.py, issue 6's figures against open_clip, sections in order of
#   priority (topk, image, text, eval, train) until its budget (GPU_BENCH_BUDGET_S, default 230 s
#   alone, 90 s after the checks) is spent; it writes its JSON after every section.
# all (the default): checks, then bench; under 5 minutes. Logs and JSON lines go to $OUT.
set -uo pipefail
mode="${1:-all}"
case "$mode" in all|checks|bench) ;; *) echo "gpu.sh: expected all, checks or bench, got '$mode'" >&2; exit 2;; esac
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)" \
    | tee -a "$OUT/gpu.txt" || exit 2

status=0
if [ "$mode" != bench ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
        tests/fused_topk_cases.py tests/test_retrieval.py tests/engines/test_runners.py tests/test_train.py \
        -k "cuda or CUDA or kernel or fused" 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
    timeout 60 python3 benchmarks/gpu_checks.py 2>"$OUT/gpu_checks.err" | tee "$OUT/gpu_checks.json" || status=1
fi
if [ "$mode" != checks ]; then
    budget="${GPU_BENCH_BUDGET_S:-$([ "$mode" = bench ] && echo 230 || echo 90)}"
    # a section started before the budget is spent runs to its end: leave it 40 s
    timeout $((budget + 40)) python3 benchmarks/gpu_bench.py --budget-s "$budget" \
        --json-out "$OUT/gpu_bench.json" 2>"$OUT/gpu_bench.err" | tee "$OUT/gpu_bench.txt" || status=1
fi
exit $status
