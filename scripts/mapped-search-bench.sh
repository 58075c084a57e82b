#!/usr/bin/env bash
# Search over a corpus larger than its memory: generates DOCS x DIM corpus vectors (and 200
# queries) with a `sql` stage, then runs `search` with the corpus held in memory and mapped
# (`corpus_in_memory_mb`), reporting wall time and peak anonymous and file-backed memory; where
# a cgroup v1 memory controller is writable (as root), both run again under a memory limit of
# a third of the corpus (at least 512 MiB).
# Usage: scripts/mapped-search-bench.sh [DOCS DIM] (env SCALE_DIR, default /tmp/synthrank-scale)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
docs=${1:-1000000} dim=${2:-768}
dir=${SCALE_DIR:-/tmp/synthrank-scale}/mapped-$docs-$dim
mkdir -p "$dir"
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/synthrank
python3 - "$dir/p.yaml" "$docs" "$dim" <<'EOF'
import sys
path, docs, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vector = ", ".join(f"CAST(sin(value * {c + 1}.37 + {c}) AS FLOAT)" for c in range(dim))
def table(name, first, last):
    return f"""  - name: {name}
    kind: sql
    config:
      schema: embeddings
      query: "SELECT CONCAT('{name[0]}', CAST(value AS VARCHAR)) AS id, make_array({vector}) AS vector FROM generate_series({first}, {last})"
"""
search = lambda name, mb: f"""  - name: {name}
    kind: search
    inputs: {{queries: queries, corpus: docs}}
    config: {{k: 100, corpus_in_memory_mb: {mb}}}
"""
open(path, "w").write("name: mapped_search\nstages:\n" + table("docs", 1, docs)
    + table("queries", docs + 1, docs + 200) + search("in_memory", 1 << 20) + search("mapped", 0))
EOF
[ -f "$dir/work/docs/_manifest.json" ] || "$bin" run "$dir/p.yaml" --workdir "$dir/work" --only docs 2>/dev/null
[ -f "$dir/work/queries/_manifest.json" ] || "$bin" run "$dir/p.yaml" --workdir "$dir/work" --only queries 2>/dev/null

# Runs a stage, sampling /proc every 50 ms: its wall time and peak RssAnon / RssFile.
measure() {
    local stage=$1 cgroup=${2:-} start anon=0 file=0 pid a f
    start=$(date +%s.%N)
    bash -c "${cgroup:+echo \$\$ > $cgroup/cgroup.procs;} exec $bin run $dir/p.yaml --workdir $dir/work --only $stage --force" \
        >/dev/null 2>"$dir/log" &
    pid=$!
    local status=0 memory="no limit"
    # (stderr off: bash's own report of a process killed by the cgroup.)
    {
        while kill -0 "$pid"; do
            read -r a f < <(awk '/RssAnon/{a=$2} /RssFile/{f=$2} END{print a+0, f+0}' "/proc/$pid/status" || echo "0 0")
            ((a > anon)) && anon=$a
            ((f > file)) && file=$f
            sleep 0.05
        done
        wait "$pid"
    } 2>/dev/null || status=$?
    [[ -n $cgroup ]] && memory="limit $limit_mib MiB"
    printf '%-10s %-22s %8.1f %12s %12s\n' "$stage" "$memory" \
        "$(python3 -c "print($(date +%s.%N) - $start)")" "$((anon / 1024))" \
        "$((file / 1024))$( ((status == 0)) || echo " (exit $status)")"
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
echo "corpus: $docs x $dim floats ($((docs * dim * 4 / 1048576)) MiB), 200 queries, top-100"
printf '%-10s %-22s %8s %12s %12s\n' stage memory seconds "anon MiB" "file MiB"
measure in_memory
measure mapped
cgroup=/sys/fs/cgroup/memory/synthrank-mapped-bench
if mkdir -p "$cgroup" 2>/dev/null && [ -w "$cgroup/memory.limit_in_bytes" ]; then
    # A third of the corpus, and at least 512 MiB: the process holds ~300 MiB besides vectors.
    limit_mib=$((docs * dim * 4 / 3 / 1048576))
    ((limit_mib >= 512)) || limit_mib=512
    echo $((limit_mib << 20)) >"$cgroup/memory.limit_in_bytes"
    measure mapped "$cgroup"
    measure in_memory "$cgroup"
    rmdir "$cgroup" 2>/dev/null || true
fi
for stage in in_memory mapped; do
    python3 -c "import json; m = json.load(open('$dir/work/$stage/_manifest.json')); print('$stage runs hash', m['tables']['runs']['hash'][:16])"
done
