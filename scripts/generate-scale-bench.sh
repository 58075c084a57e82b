#!/usr/bin/env bash
# `generate` at MS MARCO scale (500k prompts by default): renders the prompts of make_data.py's
# queries, then runs the generate stage three times under /usr/bin/time (wall time, peak RSS):
#  1. writing the pending requests to a batch input file,
#  2. journaling the batch output's answers (written by benches/scale/batch_answers.py, not
#     timed) and writing the tables,
#  3. again with its tables deleted: every answer from the journal;
# then the stage through the OpenAI Batch API (benches/scale/batch_api_server.py on 127.0.0.1):
#  4. batches of 50,000 requests uploaded, polled, downloaded and journaled, the tables written.
# Usage: scripts/generate-scale-bench.sh [QUERIES] (env SCALE_DIR, default /tmp/synthrank-scale)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
queries=${1:-500000}
dir=${SCALE_DIR:-/tmp/synthrank-scale}
data=$dir/generate-data-$queries work=$dir/generate-work-$queries
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/synthrank
spec=benches/scale/generate.yaml
if [ ! -f "$data/queries.tsv" ]; then
  python3 benches/scale/make_data.py "$data.partial" 1 "$queries" 0
  rm -rf "$data" && mv "$data.partial" "$data"
fi
rm -rf "$work" "$data"/batch-*.jsonl "$dir/batch-api"
run() { "$bin" run "$spec" --var "data=$data" --workdir "$work" "$@"; }
run --only queries >/dev/null 2>&1 && run --only prompts >/dev/null 2>&1
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
printf '%-34s %12s %10s %14s\n' "generate" rows seconds "peak RSS MiB"
# $1: what is measured, $2: the stage. The first run ends by asking for the batch to be run
# (exit code 1).
timed() {
  local stage=${2:-generated}
  /usr/bin/time -f '%e %M' -o "$dir/time" "$bin" run "$spec" --var "data=$data" \
    --workdir "$work" --only "$stage" >"$dir/log" 2>&1 || grep -q "requests wait in" "$dir/log" \
    || { cat "$dir/log"; exit 1; }
  rows=$(grep -oP "$stage: done — \K[0-9]+" "$dir/log" || grep -oP "[0-9]+(?= requests wait in)" "$dir/log")
  # The last line: a failed command's first says how it exited.
  read -r seconds kib < <(tail -n 1 "$dir/time")
  printf '%-34s %12s %10s %14s\n' "$1" "$rows" "$seconds" "$((kib / 1024))"
}
timed "batch input written (requests)"
python3 benches/scale/batch_answers.py "$data/batch-input.jsonl" "$data/batch-output.jsonl"
echo "batch output: $(du -h "$data/batch-output.jsonl" | cut -f1)"
timed "batch output journaled (rows)"
rm -rf "$work/generated"
timed "rerun from the journal (rows)"
echo "journal: $(du -h "$work/.state/generated/journal.jsonl" | cut -f1)"
python3 benches/scale/batch_api_server.py "$dir/batch-api" 18765 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
sleep 1
timed "Batch API, 50k-request batches (rows)" generated_api
echo "batches: $(ls "$dir"/batch-api/upload-*.jsonl | wc -l)"
