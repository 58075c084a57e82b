#!/usr/bin/env bash
# Builds llama.cpp's OpenAI-compatible server (`llama-server`) once into a cache and prints its
# path. The source is the llama.cpp that the llama-cpp-python sdist on PyPI vendors (no other
# registry carries it); cmake comes from its PyPI wheel. The build is for the instruction sets
# this CPU reports, never `GGML_NATIVE` (these virtual CPUs advertise AMX that traps), so the
# cache key names them. Idempotent; about 10 minutes on 2 cores the first time.
set -euo pipefail
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PYTHON=${PYTHON:-python3}

flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
isa=avx2
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $cpu_flags " == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl && has avx512dq; then
    flags+=(-DGGML_AVX512=ON)
    isa=avx512
    if has avx512_vnni; then
        flags+=(-DGGML_AVX512_VNNI=ON)
        isa=avx512-vnni
    fi
fi

cache=${SYNTHRANK_CACHE:-$HOME/.cache/synthrank}/llama-server-$version-$isa
mkdir -p "$(dirname "$cache")"
# One build at a time: a second caller (CI starts one early in the background) waits for it.
exec 9>"$cache.lock"
flock 9
if [[ -x $cache/llama-server ]]; then
    echo "$cache/llama-server"
    exit 0
fi
echo "building llama-server ($version, $isa) into $cache (once) ..." >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
url=$(curl -fsS "https://pypi.org/simple/llama-cpp-python/" |
    grep -o "https://[^\"#]*llama_cpp_python-$version\.tar\.gz" | head -n1)
curl -fsSL -o "$tmp/src.tar.gz" "$url"
echo "$sha256  $tmp/src.tar.gz" | sha256sum --check --quiet
tar -xzf "$tmp/src.tar.gz" -C "$tmp"
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --only-binary=:all: 'cmake>=3.28,<5'
src=$tmp/llama_cpp_python-$version/vendor/llama.cpp
"$tmp/venv/bin/cmake" -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF >&2
"$tmp/venv/bin/cmake" --build "$tmp/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$cache.partial"
cp "$tmp/build/bin/llama-server" "$cache.partial/"
rm -rf "$cache"
mv "$cache.partial" "$cache"
echo "$cache/llama-server"
