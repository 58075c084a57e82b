#!/usr/bin/env bash
# Generation as users run it, against llama.cpp's server (scripts/fetch-llama-server.sh) serving
# the quickstart's SmolLM2 GGUF on 127.0.0.1 with 8 parallel slots, 2 threads:
#  1. reject rate of all-levels answers with and without `structured_output` (N SciFact train
#     queries, the quickstart's sampling: temperature 0.7, top_p 0.9, seed 7);
#  2. generation throughput at 8 concurrent prompts, llama-server against `backend: embedded`
#     (same GGUF, the same N prompts, 2 threads, max_tokens 128): 8 requests in flight until
#     the last ones, as a long run keeps them; the embedded stage's time includes loading the
#     model (about a second).
# Usage: scripts/generation-bench.sh [N]  (default 32). Prints one JSON line per measurement.
# Answers are journaled under work/generation-bench-N/: a rerun asks only what is missing, so
# delete that directory to measure throughput again.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
n=${1:-32}
bash scripts/fetch-models.sh
server=$(bash scripts/fetch-llama-server.sh)
cargo build --locked --profile dev --bin synthrank 2>/dev/null
synthrank=$CARGO_TARGET_DIR/debug/synthrank
model=$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf
tmp=$(mktemp -d)
# Work directories persist (work/ is ignored): a rerun reuses every journaled answer.
work=$PWD/work/generation-bench-$n
mkdir -p "$work"
port=$((20000 + RANDOM % 20000))
"$server" --model "$model" --host 127.0.0.1 --port "$port" --threads 2 --parallel 8 \
    --ctx-size 16384 >"$tmp/server.log" 2>&1 &
server_pid=$!
trap 'kill $server_pid 2>/dev/null; rm -rf "$tmp"' EXIT
until curl -fs "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done
head -n "$n" ../shared/datasets/scifact/queries.jsonl >"$tmp/queries.jsonl"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)

# A spec of prompts and one generate stage; $1: name, $2: its extra config lines, $3: extra
# config of the queries (a sample, say).
spec() {
    cat >"$tmp/$1.yaml" <<EOF
name: $1
workdir: $work/$1
stages:
  - name: queries
    kind: load_queries
    config: {path: $tmp/queries.jsonl${3:+, $3}}
  - name: prompts
    kind: render_prompts
    inputs: [queries]
    config: {template: $PWD/pipelines/prompts/graded-passages.j2}
  - name: gen
    kind: generate
    inputs: [prompts]
    config:
      model: smollm2
      temperature: 0.7
      top_p: 0.9
      seed: 7
$2
EOF
    echo "$tmp/$1.yaml"
}
query() { "$synthrank" sql "$1" --format csv "$2" | tail -n +2; }

for structured in json_schema none; do
    s=$(spec "rejects-$structured" "      endpoints: [http://127.0.0.1:$port/v1]
      concurrency: 8
      max_tokens: 1024
      structured_output: $structured")
    "$synthrank" run "$s" 2>/dev/null
    counts=$(query "$s" "SELECT (SELECT count(*) FROM gen.generations) AS answers,
        (SELECT count(*) FROM gen.graded_docs) AS passages,
        (SELECT count(*) FROM gen.rejects WHERE level IS NULL) AS whole,
        (SELECT count(*) FROM gen.rejects WHERE level IS NOT NULL) AS levels,
        (SELECT count(*) FROM gen.generations WHERE completion_tokens >= 1024) AS truncated")
    IFS=, read -r answers passages whole levels truncated <<<"$counts"
    echo "{\"bench\":\"reject_rate\",\"cpu\":\"$cpu\",\"structured_output\":\"$structured\",\"answers\":$answers,\"passages\":$passages,\"answers_rejected_whole\":$whole,\"levels_rejected\":$levels,\"answers_cut_at_max_tokens\":$truncated,\"level_reject_rate\":$(python3 -c "print(round(1 - $passages / (4 * $answers), 4))")}"
done

for backend in llama-server embedded; do
    if [[ $backend == embedded ]]; then
        extra="      backend: embedded
      model_file: $model
      concurrency: 8
      threads: 2
      max_tokens: 128"
    else
        extra="      endpoints: [http://127.0.0.1:$port/v1]
      concurrency: 8
      max_tokens: 128
      structured_output: none"
    fi
    s=$(spec "speed-$backend" "$extra")
    "$synthrank" run "$s" 2>/dev/null
    tokens=$(query "$s" "SELECT sum(completion_tokens) FROM gen.generations")
    seconds=$(python3 -c "import json; print(json.load(open('$work/speed-$backend/gen/_manifest.json'))['duration_s'])")
    echo "{\"bench\":\"generation_throughput\",\"cpu\":\"$cpu\",\"backend\":\"$backend\",\"prompts\":$n,\"concurrency\":8,\"completion_tokens\":$tokens,\"seconds\":$seconds,\"tokens_per_s\":$(python3 -c "print(round($tokens / $seconds, 1))")}"
done
