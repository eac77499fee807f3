#!/usr/bin/env bash
# One device session's worth of work for the Triton attention kernels: the GPU tests, then the
# microbenchmark (or, with --sweep, the launch-shape sweep). Raw output goes to $OUT.
#   OUT=dir COMMIT=<hash> bash benchmarks/gpu/run_attention_checks.sh [--sweep]
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m gpu tests/gpu -q -n 8 -p no:cacheprovider \
    --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-100}" python3 benchmarks/gpu/attention_kernels.py --out "$OUT" \
    --commit "${COMMIT:-uncommitted}" 2>&1 | tee "$OUT/bench.log"
if [[ "${1:-}" == "--sweep" ]]; then
    timeout "${SWEEP_TIMEOUT:-90}" python3 benchmarks/gpu/attention_kernels.py --out "$OUT" \
        --commit "${COMMIT:-uncommitted}" --sweep 2>&1 | tee "$OUT/sweep.log"
fi
