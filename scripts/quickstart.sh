#!/usr/bin/env bash
# The quickstart (README): fetches the demo models once, builds synthrank, runs
# pipelines/quickstart.yaml end to end offline, and ends with the metrics table and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
bash scripts/fetch-models.sh
# The dev profile optimizes dependencies and shares its build with the tests (scripts/test.sh).
cargo build --locked
bin="$CARGO_TARGET_DIR/debug/synthrank"
"$bin" run pipelines/quickstart.yaml
"$bin" status pipelines/quickstart.yaml
echo
echo "Graded passages the LLM wrote (SQL over the pipeline's tables):"
"$bin" sql pipelines/quickstart.yaml \
  "SELECT level, count(*) AS passages, round(avg(length(text))) AS avg_chars FROM passages.graded_docs GROUP BY level ORDER BY level DESC"
echo
echo "Test metrics, base model vs trained (SciFact sample):"
cat work/quickstart/report/summary.md
echo
echo "HTML report: $(pwd)/work/quickstart/report/report.html"
