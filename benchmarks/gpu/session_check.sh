#!/usr/bin/env bash
# One device call: install the carried wheels, run every GPU test, then the quantization
# benchmark (batch-1 for each scheme; offline 128/128 for the schemes in OFFLINE). Raw output
# goes to $OUT; each phase has its own time limit so one call fits the device's 10 minutes.
#   PHASES="tests quant" OFFLINE=none bash benchmarks/gpu/session_check.sh
set -uo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site"
if [ -f .gpubin/prometheus.xz ] && ! command -v prometheus >/dev/null; then
    mkdir -p /tmp/bin && xz -dc .gpubin/prometheus.xz >/tmp/bin/prometheus && chmod +x /tmp/bin/prometheus
    export PATH="/tmp/bin:$PATH"
fi
{ git rev-parse HEAD 2>/dev/null || echo "${COMMIT:-unknown}"; nvidia-smi; lscpu | head -20; } \
    >"$OUT/hardware.txt" 2>&1
for phase in ${PHASES:-tests quant}; do
    case "$phase" in
    tests)
        timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu tests/gpu tests/quantization \
            tests/telemetry -q -p no:cacheprovider --durations=10 -rs 2>&1 | tee "$OUT/gpu_tests.log" ;;
    quant)
        timeout "${QUANT_TIMEOUT:-300}" python3 benchmarks/gpu/quant_engine.py \
            --schemes "${SCHEMES:-none,int8,int4,fp8}" --offline "${OFFLINE:-none}" --out "$OUT" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/quant.log" ;;
    *)
        echo "unknown phase $phase" ;;
    esac
done
