#!/usr/bin/env bash
# The test command (README): builds and runs every test. Needs ../shared beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
bash scripts/fetch-models.sh
# llama.cpp's server, for the test of `generate` against a real server (built once, cached;
# a llama-server binary of your own can be named in SYNTHRANK_LLAMA_SERVER instead).
SYNTHRANK_LLAMA_SERVER=${SYNTHRANK_LLAMA_SERVER:-$(bash scripts/fetch-llama-server.sh)}
export SYNTHRANK_LLAMA_SERVER
cargo test --locked "$@"
