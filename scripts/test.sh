#!/usr/bin/env bash
# The test command (README): builds and runs every test. Needs ../shared beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
bash scripts/fetch-models.sh
cargo test --locked "$@"
