#!/usr/bin/env bash
# One device call's worth of work for the fused kernels: their GPU tests, the per-op
# microbenchmark, batch-1 decode with torch vs fused layers, then the engine's end-to-end
# GPU test against transformers (which now runs the fused layers). Raw output goes to $OUT.
#   OUT=dir COMMIT=<hash> bash benchmarks/gpu/run_fused_checks.sh
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
sha256sum soberana/ops/triton/layers.py soberana/ops/layers.py benchmarks/gpu/fused_*.py \
    tests/gpu/test_fused_gpu.py >"$OUT/files.sha256"
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -m gpu tests/gpu/test_fused_gpu.py -q -n 8 \
    -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-70}" python3 benchmarks/gpu/fused_ops.py --out "$OUT" \
    --commit "${COMMIT:-uncommitted}" 2>&1 | tee "$OUT/bench.log"
timeout "${DECODE_TIMEOUT:-90}" python3 benchmarks/gpu/fused_decode_step.py --out "$OUT" 2>&1 \
    | grep -v "^INFO" | tee "$OUT/decode_step.log"
timeout "${E2E_TIMEOUT:-80}" python3 -m pytest -m gpu tests/gpu/test_engine_gpu.py -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/engine_gpu_tests.log"
