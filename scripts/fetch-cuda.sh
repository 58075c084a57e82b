#!/usr/bin/env bash
# Fetches nvcc and the CUDA 13.0 headers from PyPI wheels once into a cache and prints the
# environment a `--features cuda` build needs:
#   eval "$(scripts/fetch-cuda.sh)" && cargo build --features cuda
# 13.0 on purpose: the H200 machines' driver (580) loads PTX of ISA 9.0, which nvcc 13.0 writes;
# newer nvcc writes PTX that driver rejects. CUDA_COMPUTE_CAP defaults to 90 (H100/H200): there
# is no GPU to ask at build time. Idempotent.
set -euo pipefail
dest=${SYNTHRANK_CUDA_HOME:-$HOME/.cache/synthrank/cuda-13.0}
if [[ ! -f $dest/.complete ]]; then
    PYTHON=${PYTHON:-python3}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching nvcc 13.0 from PyPI into $dest (once) ..." >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
        --python-version 3.11 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64
    for wheel in "$tmp"/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$tmp/unpacked"
    done
    rm -rf "$dest.partial"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp/unpacked/nvidia/cu13" "$dest.partial"
    chmod +x "$dest.partial"/bin/* "$dest.partial"/nvvm/bin/*
    touch "$dest.partial/.complete"
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    echo "nvcc ready in $dest" >&2
fi
echo "export CUDA_ROOT=$dest"
echo "export PATH=$dest/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
