#!/usr/bin/env bash
# GPU checks for a lent H100/H200 machine (the device tool); downloads nothing, about 3 minutes.
#
# Its image has torch, torchvision, pytest, onnx and onnxruntime (CPU) but not open_clip or ftfy.
# Once, on the dev machine, in the repo root (the wheels are git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 click tqdm
# then run it with the device tool: command "bash benchmarks/gpu.sh", carry [".whl"].
#
# It runs the CUDA tests that skip in CI (exact top-k on CUDA and the fused Triton kernel, the
# torch engine's CUDA paths, amp training), benchmarks/gpu_checks.py (1,000,000 x 1,000,000 exact
# top-k both ways, `fklip eval --device cuda` against the CPU) and benchmarks/gpu_bench.py
# (issue 6's figures against open_clip, sections in order of priority within a time budget),
# and copies the logs and JSON lines to $OUT. About 4.5 minutes in all.
set -uo pipefail
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
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/test_fused_topk.py tests/test_retrieval.py tests/engines/test_runners.py tests/test_train.py \
    -k "(cuda or CUDA or kernel or fused) and not interpreter" 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
timeout 60 python3 benchmarks/gpu_checks.py 2>"$OUT/gpu_checks.err" | tee "$OUT/gpu_checks.json" || status=1
# gpu_bench writes its JSON after every section, so a run cut short keeps what it finished
timeout 130 python3 benchmarks/gpu_bench.py --budget-s 90 --json-out "$OUT/gpu_bench.json" \
    2>"$OUT/gpu_bench.err" | tee "$OUT/gpu_bench.txt" || status=1
exit $status
