#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine that has no Rust and no network, into
# gpu-bundle/ (git-ignored), in two parts of under 64 MiB each (the most one copy to such a
# machine may carry):
#   gpu-bundle/model  all-MiniLM-L6-v2 for the golden and parity checks, its word embedding
#                     rows kept only for the tokens those checks use (the other rows are zero
#                     and compress away; training never touches them: their gradient is zero)
#   gpu-bundle/run    the `--features cuda` synthrank (dev profile, stripped, xz), the golden
#                     file and SciFact's queries and first 2,000 documents
# Usage: scripts/gpu-bundle.sh   (then see scripts/gpu-check.sh). Needs python with the
# `tokenizers` package (PYTHON=..., e.g. .peers/bin/python) to choose the embedding rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import tokenizers' 2>/dev/null || {
    echo "$PYTHON has no tokenizers package: pip install tokenizers, or set PYTHON" >&2
    exit 2
}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}-cuda"
shared=${SYNTHRANK_SHARED:-../shared}
bash scripts/fetch-models.sh >/dev/null
cuda_env=$(bash scripts/fetch-cuda.sh)
eval "$cuda_env"
cargo build --locked --features cuda --bin synthrank
bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/run/golden" "$bundle/run/data" "$bundle/model/all-MiniLM-L6-v2"

strip -o "$bundle/run/synthrank" "$CARGO_TARGET_DIR/debug/synthrank"
xz -T0 -6 "$bundle/run/synthrank"
cp "$shared/golden/train_steps.json" "$bundle/run/golden/"
cp "$shared/datasets/scifact/queries.jsonl" "$bundle/run/data/"
head -n 2000 "$shared/datasets/scifact/corpus.jsonl" >"$bundle/run/data/corpus.jsonl"

"$PYTHON" - "$bundle" <<'EOF'
import json, shutil, struct, sys
from pathlib import Path
from tokenizers import Tokenizer
bundle = Path(sys.argv[1])
src, dst = Path("models/all-MiniLM-L6-v2"), bundle / "model/all-MiniLM-L6-v2"
for f in src.rglob("*"):
    if f.is_file() and f.name != "model.safetensors" and "onnx" not in f.name:
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.relative_to(src))
golden = json.loads((bundle / "run/golden/train_steps.json").read_text())
texts = [golden["wasserstein"]["probe_text"]]
for item in golden["batch"]:
    texts += [item["query"], *item["passages"]]
texts += [(d.get("title", "") + " " + d["text"]).strip()
          for d in map(json.loads, open(bundle / "run/data/corpus.jsonl"))]
tok = Tokenizer.from_file(str(src / "tokenizer.json"))
keep = {i for e in tok.encode_batch(texts) for i in e.ids}
raw = (src / "model.safetensors").read_bytes()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
data = bytearray(raw[8 + n:])
meta = header["embeddings.word_embeddings.weight"]
start, _ = meta["data_offsets"]
rows, dim = meta["shape"]
assert meta["dtype"] == "F32"
for row in range(rows):
    if row not in keep:
        data[start + row * dim * 4:start + (row + 1) * dim * 4] = bytes(dim * 4)
(dst / "model.safetensors").write_bytes(raw[:8 + n] + bytes(data))
print(f"kept {len(keep)} of {rows} word embedding rows", file=sys.stderr)
EOF
tar -C "$bundle/model" -cJf "$bundle/model.tar.xz" all-MiniLM-L6-v2
rm -rf "$bundle/model/all-MiniLM-L6-v2"
mv "$bundle/model.tar.xz" "$bundle/model/"
du -sh "$bundle"/model "$bundle"/run
