#!/usr/bin/env bash
# Benchmarks against the peers a user would otherwise run, in one session (2 threads).
# Peers need a Python environment: python3 -m venv .peers &&
#   .peers/bin/pip install torch sentence-transformers faiss-cpu numpy pytrec-eval-terrier
# (PEERS_PYTHON overrides the interpreter). The dev profile is used: its hot paths (GEMM,
# candle's kernels, synthrank itself) are optimized, and it shares the test build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
bash scripts/fetch-models.sh
py="${PEERS_PYTHON:-.peers/bin/python}"
peers=../shared/bench/peers.py
model=models/all-MiniLM-L6-v2
data=../shared/datasets/scifact
peer() {
  if [ -x "$py" ]; then "$py" "$peers" "$@" --threads 2 --model "$model" --data "$data"; fi
}
for bench in search eval generate embed train; do
  cargo bench --locked --profile dev --bench "$bench" 2>/dev/null | grep '^{'
  case "$bench" in
    search|eval|embed) peer "$bench" ;;
    train) peer train --max-len 128 --query-len 64 ;;
  esac
done
