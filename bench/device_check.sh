#!/usr/bin/env bash
# One call on a lent GPU: build, check correctness, time everything beside its peers.
#
#   bench/device_check.sh            # on the GPU machine: at most $BUDGET s (default 540)
#   DEVICE=cpu bench/device_check.sh # the same steps at tiny shapes, to test the script here
#
# The GPU machine has torch, triton, cmake, ninja and pybind11 but not diffusers (nor its
# importlib_metadata): carry them as wheels in .whl/ (see the device tool's README), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata==8.7.0
# Every step has its own time limit and writes its log and JSON under $OUT (default
# bench/out/device); a step that fails is reported and the next one still runs. The last
# lines printed are the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/out/device}
PY=${PY:-python3}
mkdir -p "$OUT"
rm -f "$OUT"/*.log
declare -a SUMMARY=()

BUDGET=${BUDGET:-540}   # seconds for the whole script: the device tool allows 600 per call

step() {   # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS left=$((BUDGET - SECONDS - 10))
    if [ $left -lt 30 ]; then
        SUMMARY+=("$(printf '%-12s %-16s' "$name" "SKIPPED (budget)")")
        return
    fi
    [ "$limit" -gt $left ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    local what=ok
    [ $rc -eq 124 ] && what="TIMED OUT"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (rc $rc)"
    SUMMARY+=("$(printf '%-12s %-16s %4ds' "$name" "$what" $((SECONDS - t0)))")
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
    cat "$OUT/gpu.txt"
    # The package with its CUDA extension (sm_80/sm_90), built here with this machine's nvcc.
    step build 150 $PY -m pip install -v --no-deps --no-build-isolation --no-index -e .
    step tests 180 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py \
        tests/test_triton_attention.py tests/test_triton_group_norm.py
    step kernels 150 $PY bench/kernels.py --device cuda --out "$OUT"
    step throughput 240 $PY bench/throughput.py --device cuda --frames 32 --steps 3 \
        --out "$OUT/throughput-cuda.json"
    if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
        step trace 240 $PY bench/trace_overlap.py --device cuda --frames 32 --out-dir "$OUT"
    fi
else
    step build 300 $PY -m pip install -q --no-deps --no-build-isolation -e .
    step tests 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_triton_attention.py \
        -k "not bench"
    step kernels 240 $PY bench/kernels.py --device cpu --out "$OUT"
    step throughput 420 $PY bench/throughput.py --frames 8 --steps 1 --modes overlap,loopback \
        --out "$OUT/throughput-cpu.json"
    step trace 240 $PY bench/trace_overlap.py --frames 8 --out-dir "$OUT"
fi

echo
echo "=== summary ($DEVICE; logs and JSON in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/tests.log" ] && grep -h -E "passed|failed" "$OUT/tests.log" | tail -n 1
# Exit status: 1 if a step failed or timed out (skipped steps are said above, not failures).
! printf '%s\n' "${SUMMARY[@]}" | grep -q -E "FAILED|TIMED OUT"
