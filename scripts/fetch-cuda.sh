#!/usr/bin/env bash
# Fetches nvcc and the CUDA 13.0 headers from PyPI wheels once into a cache, makes the link
# stubs a `--features cuda` binary links against, and prints the environment such a build needs:
#   eval "$(scripts/fetch-cuda.sh)" && cargo build --features cuda
# 13.0 on purpose: the H200 machines' driver (580) loads PTX of ISA 9.0, which nvcc 13.0 writes;
# newer nvcc writes PTX that driver rejects. CUDA_COMPUTE_CAP defaults to 90 (H100/H200): there
# is no GPU to ask at build time. Idempotent.
#
# Link stubs (lib/): candle links cuBLAS, cuBLASLt, cuRAND, NVRTC and the driver's libcuda
# by name. The first four are made from the real 13.0 libraries (PyPI wheels, ~570 MB, fetched
# once and thrown away): same sonames, same versioned exported symbols, no code, so a symbol
# 13.0 lacks fails the link here and the binary binds to the real libraries on the GPU machine.
# libcuda comes with the NVIDIA driver only; its stub exports every driver entry point cudarc
# (the locked version) declares.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${SYNTHRANK_CUDA_HOME:-$HOME/.cache/synthrank/cuda-13.0}
PYTHON=${PYTHON:-python3}
platforms=(--python-version 3.11 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)

fetch_wheels() { # DIR PACKAGE...
    local dir=$1
    shift
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" "$@" "${platforms[@]}"
    for wheel in "$dir"/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$dir/unpacked"
    done
}

# A shared object named SONAME exporting SYMBOLS (one per line, `name` or `name@@version`).
make_stub() { # OUT SONAME SYMBOLS_FILE
    local out=$1 soname=$2 symbols=$3 work
    work="$tmp/stub"
    rm -rf "$work" && mkdir -p "$work"
    sed 's/@.*//' "$symbols" | sort -u | awk '{ print "void " $1 "(void) {}" }' >"$work/stub.c"
    if grep -q '@@' "$symbols"; then
        local version
        version=$(sed -n 's/.*@@//p' "$symbols" | sort -u | head -1)
        { echo "$version {"; echo "  global:"; sed 's/@.*//; s/$/;/' "$symbols" | sort -u; echo "  local: *;"; echo "};"; } >"$work/version.map"
        cc -shared -fPIC -o "$out" -Wl,-soname,"$soname" -Wl,--version-script="$work/version.map" "$work/stub.c"
    else
        cc -shared -fPIC -o "$out" -Wl,-soname,"$soname" "$work/stub.c"
    fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ ! -f $dest/.complete ]]; then
    echo "fetching nvcc 13.0 from PyPI into $dest (once) ..." >&2
    fetch_wheels "$tmp/toolkit" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
    rm -rf "$dest.partial"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp/toolkit/unpacked/nvidia/cu13" "$dest.partial"
    chmod +x "$dest.partial"/bin/* "$dest.partial"/nvvm/bin/*
    ln -sf libcudart.so.13 "$dest.partial/lib/libcudart.so"
    touch "$dest.partial/.complete"
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    echo "nvcc ready in $dest" >&2
fi
# The link stubs (added to the cache after the toolkit, so older caches get them too). They
# sit in lib/ beside libcudart: every build searches there.
if [[ ! -f $dest/lib/.stubs-complete ]]; then
    echo "making link stubs from the CUDA 13.0 libraries (fetched once, then removed) ..." >&2
    fetch_wheels "$tmp/libs" nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    for lib in "$tmp/libs/unpacked/nvidia/cu13/lib/"{libcublas.so.13,libcublasLt.so.13,libcurand.so.10,libnvrtc.so.13}; do
        soname=$(basename "$lib")
        nm -D --defined-only "$lib" | awk '$2 == "T" { print $3 }' >"$tmp/symbols"
        make_stub "$dest/lib/${soname%%.so*}.so" "$soname" "$tmp/symbols"
    done
    cudarc=$(cd "$repo" && cargo metadata --locked --format-version 1 --features cuda --filter-platform x86_64-unknown-linux-gnu 2>/dev/null |
        "$PYTHON" -c 'import json, sys, os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
    grep -oh 'load::<_F>("cu[A-Za-z0-9_]*")' "$cudarc/src/driver/sys/mod.rs" |
        sed 's/.*("\(.*\)")/\1/' >"$tmp/symbols"
    make_stub "$dest/lib/libcuda.so" libcuda.so.1 "$tmp/symbols"
    touch "$dest/lib/.stubs-complete"
    echo "link stubs ready in $dest/lib" >&2
fi
echo "export CUDA_ROOT=$dest"
echo "export PATH=$dest/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
