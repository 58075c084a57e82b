#!/usr/bin/env bash
# The GPU checks (scripts/gpu_check.py says what each measures and its bar), on a GPU machine
# with CUDA 13, PyTorch, transformers and sentence-transformers but no Rust and no network.
#
# On the CPU machine: scripts/gpu-bundle.sh (builds gpu-bundle/model and gpu-bundle/run). Then
# two copies to the GPU machine, each under 64 MiB, while it stays up between them:
#   1. carry gpu-bundle/model, run `true`
#   2. carry gpu-bundle/run, run `bash scripts/gpu-check.sh` (about 5 minutes)
# Results: a Markdown table on stdout, and $OUT/gpu-check.json when OUT is set.
#
# `scripts/gpu-check.sh --cpu` runs the same checks at toy sizes on this (CPU) machine with the
# local build and models, with python from .peers/ (PyTorch, sentence-transformers): the
# plumbing check before spending GPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --cpu ]]; then
    shift
    shared=${SYNTHRANK_SHARED:-../shared}
    exec "${PYTHON:-.peers/bin/python}" scripts/gpu_check.py --device cpu --quick \
        --bin "${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}/debug/synthrank" \
        --model models/all-MiniLM-L6-v2 --data "$shared/datasets/scifact" \
        --golden "$shared/golden" --work /tmp/synthrank-gpu-check-cpu "$@"
fi
bundle=gpu-bundle
for part in model/model.tar.xz run/synthrank.xz; do
    [[ -f $bundle/$part ]] || { echo "$bundle/$part is missing: see the top of $0" >&2; exit 2; }
done
work=${GPU_CHECK_WORK:-/tmp/synthrank-gpu-check}
mkdir -p "$work/bin"
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$bundle/run/synthrank.xz" "$work/bin/synthrank"
chmod +x "$work/bin/synthrank"
tar -C "$work" -xJf "$bundle/model/model.tar.xz"
# The CUDA 13 libraries synthrank links (cuBLAS, cuBLASLt, cuRAND, NVRTC, the runtime): the
# ones PyTorch's wheels bring, else the system toolkit's. libcuda is the driver's.
libs=$(python3 - <<'EOF'
import glob, os, site
dirs = []
for root in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)
export LD_LIBRARY_PATH="$libs:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
python3 -c 'import torch, transformers, sentence_transformers as st; print(f"PyTorch {torch.__version__}, transformers {transformers.__version__}, sentence-transformers {st.__version__}")'
if ldd "$work/bin/synthrank" | grep 'not found'; then
    echo "synthrank's CUDA libraries are not all found (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
    exit 2
fi
exec python3 scripts/gpu_check.py --device cuda --bin "$work/bin/synthrank" \
    --model "$work/all-MiniLM-L6-v2" --data "$bundle/run/data" --golden "$bundle/run/golden" \
    --work "$work/runs" "$@"
