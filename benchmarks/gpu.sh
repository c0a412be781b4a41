#!/usr/bin/env bash
# GPU checks and benchmarks for a lent H100/H200 machine (the device tool); downloads nothing.
#
# Its image has torch, torchvision, pytest, onnx and onnxruntime (CPU) but not open_clip or ftfy.
# Once, on the dev machine, in the repo root (the wheels are git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 click tqdm
# then run it with the device tool: command "bash benchmarks/gpu.sh MODE", carry [".whl"], MODE one of
#
# checks: the CUDA tests that skip in CI (exact top-k on CUDA and the fused Triton kernel, the
#   torch engine's CUDA paths, amp training) and benchmarks/gpu_checks.py (1,000,000 x 1,000,000
#   exact top-k both ways with the fused kernel, `fklip eval --device cuda` against the CPU);
#   limits 100 + 75 s, about 2 minutes.
# towers: benchmarks/gpu_bench.py's topk, image and text sections (TOWER_SECTIONS: 185 s of limits);
# end-to-end: its eval and train sections (END_TO_END_SECTIONS: 260 s of limits);
# bench: towers then end-to-end, issue 6's figures against open_clip. That is two runs: one call
#   with the default deadline runs the towers and records eval and train as skipped, so call
#   `towers`, then `end-to-end`.
# all (the default): checks, then bench, as much as fits (checks and the topk section).
#
# Every step runs in its own process under `timeout`, and a step starts only when its whole limit
# is left before the run's deadline (GPU_TOTAL_S seconds, default 285, so the whole call stays
# under 5 minutes; checks, towers and end-to-end each add up within it); a step skipped or stopped
# is recorded as such. A step that fails or hangs costs only its own figures: a CUDA error in one
# process cannot poison the next, and a gpu_bench section stopped by its limit removes its
# temporary folder. GPU_BENCH_SECTIONS ("name:seconds ...") replaces a bench mode's sections.
# Logs and JSON go to $OUT (7 files; the device tool brings back at most 8): gpu.txt,
# pytest_cuda.log, gpu_checks.json, gpu_checks.err, gpu_bench.json (one object, every section),
# gpu_bench.txt, gpu_bench.err.
set -uo pipefail
mode="${1:-all}"
case "$mode" in
    all|checks|bench|towers|end-to-end) ;;
    *) echo "gpu.sh: expected all, checks, bench, towers or end-to-end, got '$mode'" >&2; exit 2;;
esac
# Seconds each gpu_bench section may take on an H100 (ViT-B-32; archives written, warm-ups, 3
# repeats), with headroom: text needs 40-45 s, eval 60-65 s (and its two `fklip eval` runs of at
# most 45 s each, gpu_bench's --eval-timeout-s, fit in its limit), train about 60 s at gpu_bench's
# sizes (20,000 KB images, 512 products).
TOWER_SECTIONS="topk:45 image:70 text:70"
END_TO_END_SECTIONS="eval:140 train:120"
OUT="${OUT:-/tmp/gpu-out}"
read -r -a GPU_BENCH_ARGS <<< "${GPU_BENCH_ARGS:-}"  # e.g. "--device cpu --small --model fklip-tiny" with TRITON_INTERPRET=1 for a dry run
deadline=$((SECONDS + ${GPU_TOTAL_S:-285}))
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
# step NAME LIMIT LOG ERR COMMAND...: run COMMAND under `timeout` for LIMIT seconds, only if the
# whole LIMIT is left before the deadline (else skipped: a step started short of its limit would
# be killed half-way, its time lost); its output is shown and appended to LOG, its errors
# appended to ERR (- for LOG).
step() {
    local name=$1 limit=$2 log=$3 err=$4 left rc
    shift 4
    left=$((deadline - SECONDS))
    if [ "$left" -lt "$limit" ] || [ "$left" -lt 1 ]; then
        echo "gpu.sh: $name skipped: ${left} s left before the deadline, it needs up to ${limit} s" | tee -a "$OUT/gpu.txt"
        status=1
        return
    fi
    local started=$SECONDS
    if [ "$err" = - ]; then
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    else
        timeout --kill-after=10 "$limit" "$@" 2>>"$err" | tee -a "$log"
    fi
    rc=${PIPESTATUS[0]}
    echo "gpu.sh: $name: exit $rc after $((SECONDS - started)) s (limit ${limit} s)" | tee -a "$OUT/gpu.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$mode" = all ] || [ "$mode" = checks ]; then
    rm -f "$OUT/pytest_cuda.log" "$OUT/gpu_checks.json" "$OUT/gpu_checks.err"
    # torch.compile on CUDA (two parametrised cases) costs a minute of inductor compiles: `bench`
    # does not need it, and `GPU_PYTEST_COMPILE=1` puts it back
    deselect=()
    if [ "${GPU_PYTEST_COMPILE:-0}" != 1 ]; then
        deselect=(--deselect "tests/engines/test_runners.py::test_torch_cuda_matches_the_plain_path_on_cuda[options1]"
                  --deselect "tests/engines/test_runners.py::test_torch_cuda_matches_the_plain_path_on_cuda[options4]")
    fi
    step "pytest (CUDA)" 100 "$OUT/pytest_cuda.log" - python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
        "${deselect[@]}" tests/fused_topk_cases.py tests/test_retrieval.py tests/engines/test_runners.py \
        tests/test_train.py -k "cuda or CUDA or kernel or fused"
    step "gpu_checks" 75 "$OUT/gpu_checks.json" "$OUT/gpu_checks.err" python3 benchmarks/gpu_checks.py
fi
if [ "$mode" != checks ]; then
    rm -f "$OUT/gpu_bench.json" "$OUT/gpu_bench.txt" "$OUT/gpu_bench.err"
    case "$mode" in
        towers) sections=$TOWER_SECTIONS ;;
        end-to-end) sections=$END_TO_END_SECTIONS ;;
        *) sections="$TOWER_SECTIONS $END_TO_END_SECTIONS" ;;
    esac
    for section in ${GPU_BENCH_SECTIONS:-$sections}; do
        name=${section%%:*} limit=${section#*:}
        [ "$limit" = "$section" ] && limit=60  # a section named without its limit
        step "gpu_bench $name" "$limit" "$OUT/gpu_bench.txt" "$OUT/gpu_bench.err" \
            python3 benchmarks/gpu_bench.py --sections "$name" --json-out "$OUT/gpu_bench.json" "${GPU_BENCH_ARGS[@]}"
    done
fi
exit $status
