#!/usr/bin/env bash
# Benchmarks against the peers a user would otherwise run, in one session (2 threads).
# Peers need a Python environment: python3 -m venv .peers &&
#   .peers/bin/pip install faiss-cpu numpy pytrec-eval-terrier   (PEERS_PYTHON overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
py="${PEERS_PYTHON:-.peers/bin/python}"
peers=../shared/bench/peers.py
for bench in search eval generate; do
  cargo bench --locked --bench "$bench" 2>/dev/null | grep '^{'
  if [ "$bench" != generate ] && [ -x "$py" ]; then
    "$py" "$peers" "$bench" --threads 2
  fi
done
