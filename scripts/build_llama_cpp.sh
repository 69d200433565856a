#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench, llama-batched-bench and llama-quantize (the benchmark peer and
# the tool that makes K-quant copies of the synthetic models) from the source that the llama-cpp-python sdist
# vendors, and cache the binaries outside the source tree.
#
# Usage: scripts/build_llama_cpp.sh            (idempotent: skips the build when the binaries exist)
# Env:   PAGEDLLM_CACHE_DIR      cache root (default ~/.cache/pagedllm)
#        LLAMA_CPP_PYTHON_VERSION sdist version to build from (default 0.3.36)
#        PYTHON                   interpreter whose pip downloads the sdist (default .venv/bin/python)
#        JOBS                     parallel compile jobs (default 2)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE_ROOT="${PAGEDLLM_CACHE_DIR:-$HOME/.cache/pagedllm}"
PREFIX="$CACHE_ROOT/llama.cpp/$VERSION"
BIN="$PREFIX/bin"
JOBS="${JOBS:-2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"

TOOLS=(llama-server llama-bench llama-batched-bench llama-quantize)

# GGML_NATIVE=OFF with explicit ISA flags: the native build enables AMX, whose `tilezero` dies with SIGILL on
# hosts (VMs) that advertise AMX without enabling it. Every other extension this CPU has that ggml's x86 kernels
# use is on, as a native build would have it: the peer must run at its best on each machine. The binaries are
# rebuilt when the CPU differs from the one they were built for (machines vary between sessions on one disk).
has() { grep -qw "$1" /proc/cpuinfo; }
ISA=()
CMAKE_ISA=()
for pair in avx512f:GGML_AVX512 avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16 \
    avx512vbmi:GGML_AVX512_VBMI avx_vnni:GGML_AVX_VNNI; do
    flag="${pair%%:*}"
    option="${pair#*:}"
    if has "$flag"; then
        ISA+=("$flag")
        CMAKE_ISA+=("-D$option=ON")
    else
        CMAKE_ISA+=("-D$option=OFF")
    fi
done
ISA_FILE="$PREFIX/isa"

built=1
for tool in "${TOOLS[@]}"; do
    [[ -x "$BIN/$tool" ]] || built=0
done
if [[ $built == 1 && "$(cat "$ISA_FILE" 2>/dev/null)" == "avx2 ${ISA[*]}" ]]; then
    echo "llama.cpp $VERSION already built: $BIN"
    exit 0
fi
rm -f "$ISA_FILE"

WORK="$PREFIX/work"
mkdir -p "$WORK" "$BIN"

SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
    echo "downloading the llama-cpp-python $VERSION source distribution"
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
    SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz)"
fi

SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar -xzf "$SDIST" -C "$WORK"
fi

# Static libraries keep the cached binaries self-contained once the work folder is gone.
GENERATOR="Unix Makefiles"
command -v ninja >/dev/null && GENERATOR=Ninja
nice -n 19 cmake -S "$SRC" -B "$WORK/build" -G "$GENERATOR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    "${CMAKE_ISA[@]}" \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

nice -n 19 cmake --build "$WORK/build" --config Release -j "$JOBS" --target "${TOOLS[@]}"

for tool in "${TOOLS[@]}"; do
    cp "$WORK/build/bin/$tool" "$BIN/"
done
"$BIN/llama-bench" --help >/dev/null
rm -rf "$WORK"
echo "avx2 ${ISA[*]}" > "$ISA_FILE"
echo "llama.cpp $VERSION built for avx2 ${ISA[*]}: $BIN"
