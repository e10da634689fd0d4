#!/usr/bin/env bash
# One call on a lent GPU, ordered so that a run cut short has returned the most first.
#
#   bench/device_check.sh                 # on the GPU machine: at most $BUDGET s (default 480)
#   ONLY=tests,kernels bench/device_check.sh    # rerun chosen steps on the warm machine
#   DEVICE=cpu bench/device_check.sh      # the same steps at tiny shapes (CI runs this)
#
# Steps, in order: env (versions), build (the CUDA extension asserted where nvcc exists; a
# failed build falls back to one without it, so the Python and Triton steps still run),
# smoke (one call per backend, each in its own process), tests (GPU tests, verbose, a
# per-test timeout, JUnit XML, no -x), invariance (two gloo processes on one GPU), onegpu
# (UNet3D 1.41B on one GPU at 64 and 256 frames: engine vs diffusers, eager, then compiled:
# bench/one_gpu.py), wan (Wan2.1-1.3B shape at 21/42/84 frames), kernels
# (every kernel beside its peers), heavy (the tens-of-GiB tests). Each step has a limit; the
# limits add up to the budget, and a step that no longer fits is skipped and said so. With a
# 15-minute device allowance (start included), the default budget leaves ~4 minutes for a
# rerun of chosen steps (ONLY=...).
#
# The GPU machine has torch, triton, cmake, ninja, pybind11, pytest(-timeout), transformers
# and accelerate but not diffusers (nor its importlib_metadata): carry them as wheels in
# .whl/ (see the device tool's README), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata==8.7.0
# What comes back is at most 8 files under $OUT: summary.txt, env.txt, logs.tgz (every
# step's log, re-packed after each step), junit.xml and the benchmarks' JSON, each written
# row by row as it is measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/out/device}
PY=${PY:-python3}
BUDGET=${BUDGET:-480}   # seconds for the whole script (one device call allows 600)
ONLY=${ONLY:-}
# The step limits are the GPU's. The CPU dry run checks that every step passes, not that it
# fits the GPU's budget; on a loaded 2-core box its steps take several times their idle time.
SLACK=${SLACK:-$([ "$DEVICE" = cpu ] && echo 6 || echo 1)}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
declare -a SUMMARY=()

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

summarize() {
    { echo "=== summary ($DEVICE; logs in $OUT/logs.tgz)"; printf '%s\n' "${SUMMARY[@]}"; } \
        > "$OUT/summary.txt"
    tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
}

step() {   # step NAME SECONDS CMD...: run with a limit, log it, record the outcome
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    local t0=$SECONDS left=$((BUDGET * SLACK - SECONDS - 5))
    limit=$((limit * SLACK))
    if [ $left -lt 15 ]; then
        SUMMARY+=("$(printf '%-11s %-16s' "$name" "SKIPPED (budget)")")
        summarize
        return
    fi
    [ "$limit" -gt $left ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$LOGS/$name.log"
    local what=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && what="FAILED (rc $rc)"
    SUMMARY+=("$(printf '%-11s %-16s %4ds' "$name" "$what" $((SECONDS - t0)))")
    summarize
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# pytest-timeout bounds each test where it is installed (the GPU image has it).
TIMEOUT_ARGS=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(-p timeout --timeout=60)

env_report() {
    { date -u; uname -a; command -v nvidia-smi > /dev/null && nvidia-smi \
        --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      command -v nvcc > /dev/null && nvcc --version | tail -n 2 || echo "nvcc: none"
      $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
      $PY -c "import triton; print('triton', triton.__version__)" 2>&1
      $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
      $PY -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -n 1
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

build() {   # the package; the CUDA extension must come with it where nvcc exists
    if [ "$DEVICE" = cpu ]; then    # CI: the installed package is what is checked
        $PY -c "import vinf_engine, vinf_engine.kernels; print('vinf_engine', vinf_engine.__version__)"
        return
    fi
    if $PY -m pip install -v --no-deps --no-build-isolation --no-index -e . \
        && { ! command -v nvcc > /dev/null \
             || $PY -c "from vinf_engine import _C; assert _C.with_cuda, 'built without CUDA'; print('_C with CUDA')"; }
    then
        return 0
    fi
    echo "BUILD FAILED: installing without the native extension, so later steps still run"
    VINF_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
    return 1
}

export -f build
export PY DEVICE
if [ "$DEVICE" = cuda ]; then
    GPU_TESTS=(tests/test_cuda_kernels.py tests/test_triton_attention.py
               tests/test_triton_group_norm.py tests/test_triton_engine.py tests/test_dispatch.py
               tests/test_cuda_graph.py)
    ONEGPU=(--device cuda --frames 64,256 --steps 2 --compile)
    WAN=(--model wan --device cuda --ranks 1 --steps 1 --methods engine1,dense)
else
    GPU_TESTS=(tests/test_dispatch.py tests/test_triton_engine.py -k "frame_major")
    ONEGPU=(--frames 4,8 --steps 1 --warmup 1 --latent 8x8)
    WAN=(--model wan --preset tiny --frames 3,6)
fi

if wanted env; then env_report; fi
step build      100 bash -c build
step smoke       25 $PY bench/smoke.py --device "$DEVICE"
step tests       90 $PY -m pytest -v -p no:cacheprovider "${TIMEOUT_ARGS[@]}" \
    --junitxml="$OUT/junit.xml" -m "not heavy" "${GPU_TESTS[@]}"
step invariance  40 $PY bench/gpu_invariance.py --device "$DEVICE" --out "$OUT/invariance.json"
step onegpu      70 $PY bench/one_gpu.py "${ONEGPU[@]}" --out "$OUT/one_gpu.json"
step wan         90 $PY bench/throughput.py "${WAN[@]}" --out "$OUT/throughput-wan.json"
step kernels     45 $PY bench/kernels.py --device "$DEVICE" --out "$OUT"
if [ "$DEVICE" = cuda ]; then
    step heavy   20 $PY -m pytest -v -p no:cacheprovider "${TIMEOUT_ARGS[@]}" -m heavy \
        tests/test_cuda_kernels.py tests/test_triton_attention.py
fi

echo
summarize
cat "$OUT/summary.txt"
rm -rf "$LOGS"
# Exit status: 1 if a step failed or timed out (skipped steps are said above, not failures).
# No pipe into `grep -q` here: under pipefail its early exit can SIGPIPE printf and the
# pipeline's status would then hide the failure.
for line in "${SUMMARY[@]}"; do
    [[ $line == *FAILED* || $line == *"TIMED OUT"* ]] && exit 1
done
exit 0
