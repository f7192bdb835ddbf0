#!/usr/bin/env bash
# The one prepared GPU check of issue 13, for a lent GPU machine (one H200, torch 2.11 + CUDA 13,
# triton, transformers, onnxruntime and pytest preinstalled, no package registry). At most
# ~10 minutes (the sum of the step limits is 605 s; a normal run takes less); every step has its
# own time limit, its log in $OUT/<step>.log, and one line in $OUT/steps.txt as it finishes;
# $OUT/summary.txt (printed at the end) holds them all:
#
#   env        versions, GPU, nvcc, compute-sanitizer
#   build      pip install --no-build-isolation --no-deps -e . (the C++ and CUDA ops)
#   extension  whether eeengine._C loaded, with CUDA kernels
#   tests      GPU tests: CUDA C++ op numerics vs the reference, compiled Triton kernels, graph
#              mode vs the compaction loop and without host syncs (tests/test_cuda_*.py,
#              tests/test_triton_*.py)
#   sst2       graph mode vs the CPU reference on all of SST-2 dev for every policy, and
#              Engine.predict under torch.cuda.set_sync_debug_mode("error") after warm-up
#              (benchmarks/gpu_sst2_check.py, needs the fp16 checkpoint)
#   memcheck   compute-sanitizer --tool memcheck on every op kernel (benchmarks/sanitize_ops.py)
#   racecheck  compute-sanitizer --tool racecheck, same
#   compaction live-row partition vs padding exited rows, batch 32 and 128
#              (benchmarks/benchmark_compaction.py)
#   compare    HF eager, HF torch.compile(reduce-overhead), eeengine eager and graph; MiniLM
#              and a random BERT-base; batch 1 at 16/64/128 tokens, batch 32/128; graph-pool
#              memory (benchmarks/gpu_compare.py)
#
# Without a GPU every GPU step is skipped with the reason, and the script exits 0 (CI runs it
# so: tests/test_gpu_check.py). Exit status 1 when a step fails or times out.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Settings (environment): OUT (default: a new temp dir), PYTHON (default: python),
# GPU_CHECK_CKPT (default: gpu_ckpt/sst2-minilm-l6-fp16, made by
# benchmarks/export_fp16_checkpoint.py), GPU_CHECK_SKIP (space-separated step names to skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT"
PY=${PYTHON:-python}
CKPT=${GPU_CHECK_CKPT:-gpu_ckpt/sst2-minilm-l6-fp16}
SKIP=" ${GPU_CHECK_SKIP:-} "
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
STATUS=0
LINES=()

record() { # step result seconds detail; also appended to $OUT/steps.txt as it happens
    LINES+=("$(printf '%-10s %-4s %4ss  %s' "$1" "$2" "$3" "$4")")
    echo "${LINES[-1]}" >>"$OUT/steps.txt"
}

skip() { # step reason
    record "$1" SKIP 0 "$2"
}

run_step() { # step limit_s command...; a step named in GPU_CHECK_SKIP is skipped
    local step=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [[ "$SKIP" == *" $step "* ]]; then
        skip "$step" "skipped: GPU_CHECK_SKIP"
        return
    fi
    echo "== $step (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$step.log" 2>&1
    rc=$?
    local took=$((SECONDS - start)) last
    last=$(grep -v '^\s*$' "$OUT/$step.log" | tail -n 1 | cut -c1-160)
    if [ "$rc" -eq 0 ]; then
        record "$step" PASS "$took" "$last"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$step" TIME "$took" "timed out after ${limit}s; partial output in $step.log"
        STATUS=1
    else
        record "$step" FAIL "$took" "exit $rc: $last"
        STATUS=1
    fi
}

run_step env 45 "$PY" -c '
import shutil, subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for tool in ("nvcc", "compute-sanitizer", "nvidia-smi"):
    print(tool, shutil.which(tool))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("environment ok")'

NO_GPU=""
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    NO_GPU="no GPU: torch.cuda.is_available() is False"
fi
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi

gpu_step() { # step limit_s command...: run_step, or skip without a GPU
    if [ -n "$NO_GPU" ]; then
        skip "$1" "$NO_GPU"
    else
        run_step "$@"
    fi
}

gpu_step build 140 env MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e .
gpu_step extension 20 "$PY" -c '
import torch
from eeengine import _custom_ops
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("eeengine::exit_head_step", "CUDA")
print("eeengine._C:", _custom_ops.LOAD_ERROR or "loaded", "| CUDA kernels:", cuda)'

gpu_step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py \
    tests/test_cuda_exit_head_step.py tests/test_triton_exit_head_step.py \
    tests/test_triton_token_prune.py

ckpt_step() { # step limit_s command...: gpu_step; fails without the carried checkpoint
    if [ -z "$NO_GPU" ] && [ ! -f "$CKPT/eeengine.json" ]; then
        record "$1" FAIL 0 "no checkpoint at $CKPT (carry it: benchmarks/export_fp16_checkpoint.py)"
        STATUS=1
    else
        gpu_step "$@"
    fi
}

ckpt_step sst2 75 "$PY" benchmarks/gpu_sst2_check.py --ckpt "$CKPT" --out "$OUT/sst2.json"

for tool in memcheck racecheck; do
    if [ -n "$NO_GPU" ]; then
        skip "$tool" "$NO_GPU"
    elif [ -z "$SANITIZER" ]; then
        record "$tool" FAIL 0 "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        STATUS=1
    else
        run_step "$tool" 45 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            "$PY" benchmarks/sanitize_ops.py
    fi
done

ckpt_step compaction 30 "$PY" benchmarks/benchmark_compaction.py --ckpt "$CKPT" \
    --out "$OUT/compaction.json"

ckpt_step compare 85 "$PY" benchmarks/gpu_compare.py --ckpt "$CKPT" --out "$OUT/compare.json" \
    --budget-s 65

{
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s, results in $OUT"
    printf '%s\n' "${LINES[@]}"
} | tee "$OUT/summary.txt"
exit "$STATUS"
