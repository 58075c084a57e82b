#!/usr/bin/env bash
# The MS MARCO-scale benchmark: generates MS MARCO-shaped inputs (8.8M passages, 500k queries,
# 2M graded passages by default), runs every stage of benches/scale/scale.yaml alone under
# /usr/bin/time (wall time, peak RSS), times `status` on the result, and runs the `tokenizers`
# library's encode_batch on the same passages as the peer of `tokenize`.
# Usage: scripts/scale-bench.sh [PASSAGES QUERIES GRADED] (env SCALE_DIR, default /tmp/synthrank-scale)
# The peer runs in the peers' Python (PEERS_PYTHON, default .peers/bin/python: scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
passages=${1:-8800000} queries=${2:-500000} graded=${3:-2000000}
dir=${SCALE_DIR:-/tmp/synthrank-scale}
data=$dir/data-$passages-$queries-$graded work=$dir/work-$passages-$queries-$graded
bash scripts/fetch-models.sh >/dev/null
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/synthrank
spec=benches/scale/scale.yaml
if [ ! -f "$data/graded.tsv" ]; then
  python3 benches/scale/make_data.py "$data.partial" "$passages" "$queries" "$graded"
  rm -rf "$data" && mv "$data.partial" "$data"
fi
rm -rf "$work"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
echo "inputs: $passages passages ($(du -h "$data/corpus.tsv" | cut -f1)), $queries queries, $graded graded passages"
printf '%-16s %12s %10s %14s\n' stage rows seconds "peak RSS MiB"
for stage in corpus queries qrels graded_raw graded lists tokens corpus_slice query_slice \
  corpus_vectors query_vectors run model; do
  /usr/bin/time -f '%e %M' -o "$dir/time" "$bin" run "$spec" --var "data=$data" \
    --workdir "$work" --only "$stage" 2>"$dir/log" || { cat "$dir/log"; exit 1; }
  rows=$(grep -oP "$stage: done — \K[0-9]+" "$dir/log")
  read -r seconds kib <"$dir/time"
  printf '%-16s %12s %10s %14s\n' "$stage" "$rows" "$seconds" "$((kib / 1024))"
done
/usr/bin/time -f '%e %M' -o "$dir/time" "$bin" status "$spec" --var "data=$data" --workdir "$work" >/dev/null
read -r seconds kib <"$dir/time"
printf '%-16s %12s %10s %14s\n' "(status)" "" "$seconds" "$((kib / 1024))"
"$bin" export "$spec" lists --format tsv -o "$dir/lists.tsv" --var "data=$data" --workdir "$work"
peer=$("${PEERS_PYTHON:-.peers/bin/python}" benches/scale/tokenizers_peer.py models/all-MiniLM-L6-v2/tokenizer.json "$dir/lists.tsv" 128)
echo "peer: tokenizers encode_batch on the same $(($(wc -l <"$dir/lists.tsv") - 1)) passages: $peer s"
rm -f "$dir/lists.tsv"
