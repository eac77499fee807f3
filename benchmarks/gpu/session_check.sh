#!/usr/bin/env bash
# One device call: install the carried wheels, then the phases named in PHASES, each with its
# own time limit so one call fits the device's 10 minutes. Raw output goes to $OUT.
#   tests       every GPU test (tests/gpu, tests/quantization, tests/telemetry)
#   pytest      pytest -m gpu $PYTEST_ARGS (a few test files)
#   quant       quantization benchmark, all SCHEMES in one process (batch-1; 128/128 for OFFLINE)
#   quant_each  the same, one process per scheme (each gets the whole card for its KV pool)
#   spec        speculative decoding, 8B shape (benchmarks/gpu/spec_decode_gpu.py)
#   structured  64 json_schema requests vs unconstrained, 8B shape
#   sweep       batch-1 GEMV tile shapes per weight format (benchmarks/gpu/quant_gemv_sweep.py)
#   fp8kv       the 12k-token multi-turn warehouse workload with an FP8 KV cache vs bf16
#   profile     top CUDA kernels of a 512-sequence decode step per scheme (profile_offline.py)
#   embeddings  BERT-base embeddings: serve over HTTP, LLM.embed, the peer (embeddings_gpu.py);
#               needs bert-base-uncased's tokenizer files carried in EMB_TOKENIZER (.carry/...)
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
    pytest)
        timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu $PYTEST_ARGS -q -p no:cacheprovider \
            -rs 2>&1 | tee "$OUT/pytest.log" ;;
    quant_each)
        for scheme in $(echo "${SCHEMES:-none,int8,int4,fp8}" | tr , ' '); do
            mkdir -p "$OUT/quant_$scheme"
            timeout "${QUANT_TIMEOUT:-150}" python3 benchmarks/gpu/quant_engine.py \
                --schemes "$scheme" --offline "$scheme" --out "$OUT/quant_$scheme" 2>&1 \
                | grep -v "^INFO" | tee "$OUT/quant_$scheme.log"
        done ;;
    spec)
        timeout "${SPEC_TIMEOUT:-240}" python3 benchmarks/gpu/spec_decode_gpu.py \
            --batches "${SPEC_BATCHES:-1,8,64}" --disagreement "${SPEC_DISAGREE:-0,0.25,0.5,1}" \
            --methods "${SPEC_METHODS:-oracle,auto,draft_model,layer_skip}" --dtype "${SPEC_DTYPE:-auto}" \
            --out "$OUT/spec" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/spec.log" ;;
    structured)
        timeout "${STRUCT_TIMEOUT:-180}" python3 benchmarks/gpu/structured_gpu.py --out "$OUT" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/structured.log" ;;
    embeddings)
        timeout "${EMB_TIMEOUT:-200}" python3 benchmarks/gpu/embeddings_gpu.py \
            --tokenizer "${EMB_TOKENIZER:-.carry/bert-base-uncased}" --n "${EMB_N:-10000}" \
            --rounds "${EMB_ROUNDS:-1}" --commit "${COMMIT:-}" --out "$OUT" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/embeddings.log" ;;
    sweep)
        timeout "${SWEEP_TIMEOUT:-150}" python3 benchmarks/gpu/quant_gemv_sweep.py --out "$OUT" --formats "${SWEEP_FORMATS:-bf16,int8,fp8,int4}" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/sweep.log" ;;
    fp8kv)
        timeout "${FP8KV_TIMEOUT:-240}" python3 benchmarks/gpu/kv_warehouse_h200.py --only long,long_fp8kv \
            2>&1 | grep -v "^INFO" | tee "$OUT/fp8kv.log" ;;
    profile)
        timeout "${PROFILE_TIMEOUT:-180}" python3 benchmarks/gpu/profile_offline.py \
            --schemes "${SCHEMES:-none,fp8,int8}" --out "$OUT" 2>&1 \
            | grep -v "^INFO" | tee "$OUT/profile.log" ;;
    *)
        echo "unknown phase $phase" ;;
    esac
done
