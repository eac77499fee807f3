#!/usr/bin/env bash
# Build the llama.cpp peer for the CPU benchmarks from the llama-cpp-python sdist on the package
# index (the issue asks for "llama.cpp built from the llama-cpp-python sdist on the same machine").
#
# Usage: benchmarks/llamacpp_build.sh [native|avx2]...      (default: native)
#   native: -DGGML_NATIVE=ON (every extension this CPU has: AVX-512, AVX512_BF16, ...)
#   avx2:   -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON, AVX-512 off
#           (what a Zen 3 / Haswell-class CPU runs; lets an AVX-512 host measure that path)
#
# Everything is cached under ${LLAMACPP_CACHE:-~/.cache/soberana/llamacpp}: the sdist, its
# sources, and one build folder per flavour. A second run only rebuilds what changed. The
# binaries land in <cache>/build-<flavour>/bin/{llama-bench,llama-batched-bench,llama-quantize};
# the converter is <cache>/llama_cpp_python-<version>/vendor/llama.cpp/convert_hf_to_gguf.py (needs `pip install gguf`).
# Set LLAMACPP_VERSION to pin another sdist (default: the one benchmarks were run with).
set -euo pipefail

VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/soberana/llamacpp}"
JOBS="${JOBS:-$(nproc)}"
FLAVOURS=("$@")
[ ${#FLAVOURS[@]} -eq 0 ] && FLAVOURS=(native)

mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    python3 -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$CACHE"
fi
SRC="$CACHE/llama_cpp_python-$VERSION"
[ -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ] || tar xzf "$SDIST" -C "$CACHE"
LLAMA="$SRC/vendor/llama.cpp"

for flavour in "${FLAVOURS[@]}"; do
    case "$flavour" in
        native) ISA=(-DGGML_NATIVE=ON) ;;
        avx2) ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VNNI=OFF
                   -DGGML_AVX512_VBMI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF
                   -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
        *) echo "unknown flavour '$flavour' (allowed: native, avx2)" >&2; exit 2 ;;
    esac
    BUILD="$CACHE/build-$flavour"
    cmake -S "$LLAMA" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON "${ISA[@]}" >"$BUILD.configure.log" 2>&1 \
        || { tail -30 "$BUILD.configure.log"; exit 1; }
    nice -n 10 cmake --build "$BUILD" -j "$JOBS" \
        --target llama-bench llama-batched-bench llama-quantize
    echo "$flavour: $BUILD/bin"
done

# GGUF files of a Hugging Face checkpoint, one per precision, made with the sdist's converter
# (GGUF_MODEL=<hf dir>; written to <cache>/gguf/<name>-<type>.gguf, kept when present).
if [ -n "${GGUF_MODEL:-}" ]; then
    mkdir -p "$CACHE/gguf"
    name="$(basename "$GGUF_MODEL")"
    for t in ${GGUF_TYPES:-f32 f16 bf16 q8_0}; do
        out="$CACHE/gguf/$name-$t.gguf"
        [ -f "$out" ] && continue
        nice -n 10 python3 "$LLAMA/convert_hf_to_gguf.py" "$GGUF_MODEL" --outtype "$t" \
            --outfile "$out.tmp" >"$CACHE/gguf/convert-$t.log" 2>&1 \
            || { tail -20 "$CACHE/gguf/convert-$t.log"; exit 1; }
        mv "$out.tmp" "$out"
        echo "gguf $t: $out"
    done
fi
