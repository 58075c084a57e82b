#!/usr/bin/env bash
# The quickstart (README): builds synthrank, runs pipelines/quickstart.yaml end to end offline,
# and shows what it made.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
# The dev profile optimizes dependencies and shares its build with the tests (scripts/test.sh).
cargo build --locked
bin="$CARGO_TARGET_DIR/debug/synthrank"
"$bin" run pipelines/quickstart.yaml
"$bin" status pipelines/quickstart.yaml
"$bin" sql pipelines/quickstart.yaml \
  "SELECT p.query_id, substr(q.text, 1, 60) AS query, length(p.user) AS prompt_chars FROM prompts p JOIN train_queries q USING (query_id) ORDER BY p.query_id LIMIT 5"
