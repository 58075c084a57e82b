#!/usr/bin/env bash
# Benchmarks against the peers a user would otherwise run, in one session, 2 threads on both
# sides. Every JSON line carries the CPU model and the instruction-set class its code ran with
# (`cpu`, `cpu_class`), so BENCHMARKS.md can keep one table per class.
# Peers need a Python environment: python3 -m venv .peers &&
#   .peers/bin/pip install torch sentence-transformers faiss-cpu numpy pytrec-eval-terrier
# (PEERS_PYTHON overrides the interpreter). The dev profile is used, its dependencies built
# once for tests and benchmarks alike (GEMM and candle's kernels at opt-level 3), with
# synthrank's own code compiled as `cargo install` compiles it: opt-level 3, no debug
# assertions, no overflow checks (measured on search: 5% faster than the test build's). Only
# synthrank is rebuilt for that (a minute or two); a release build of the whole data stack would
# be another hour of compiling on 2 cores.
# Usage: scripts/bench.sh [BENCH...]  (default: search eval generate embed train)
# The short benchmarks (search, eval) run BENCH_REPEAT times (default 5), alternating with
# their peer, and end with a `summary` row: both sides' median seconds and the ratio of the
# medians. One run each is not enough on these machines: measured on an AMD EPYC Zen 3 VM,
# pytrec_eval took 0.49-0.67 s and the eval bench 0.06-0.11 s from one run to the next.
# SYNTHRANK_BENCH_CLASS=avx2 (or avx-vnni) measures that narrower class's code paths on a
# wider CPU, both sides held to it: synthrank's search kernel (SYNTHRANK_SEARCH_KERNEL) and
# GEMM (built without the `avx512-gemm` feature: the first such build recompiles the whole
# stack, ~20 min, as a feature of bytemuck changes with it; a CARGO_TARGET_DIR of its own
# keeps both builds), PyTorch's ATen, oneDNN and MKL kernels, OpenBLAS's core type. embed and
# generate are skipped there: ONNX Runtime and llama.cpp choose their kernels from the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/synthrank/target}"
bash scripts/fetch-models.sh
py="${PEERS_PYTHON:-.peers/bin/python}"
peers=../shared/bench/peers.py
model=models/all-MiniLM-L6-v2
data=../shared/datasets/scifact

field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | xargs; }
cpu="$(field 'model name') ($(field vendor_id) family $(field 'cpu family') model $(field model))"
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ $flags == *" $1 "* ]]; }
# The flags any kernel here or in a peer dispatches on, as the CPU reports them.
simd_flags=$(for f in avx2 fma avx_vnni avx512f avx512bw avx512vl avx512_vnni avx512_bf16 \
    amx_tile amx_int8 amx_bf16; do if has $f; then printf '%s ' $f; fi; done | xargs)
vendor=$(field vendor_id)
# The class decides which kernels run (ours and the peers'). OpenBLAS (FAISS, numpy) reads
# its core type from CPUID and mis-detects some virtual CPUs as generic ones, 3-5x slower:
# name the core whose kernels the class supports. An inherited OPENBLAS_CORETYPE is replaced
# (some machines preset `Haswell`, which leaves FAISS on 256-bit kernels: 0.64 s where
# SKYLAKEX takes 0.36 s on AMD Zen 5); PEER_OPENBLAS_CORETYPE chooses another on purpose.
if has avx512f && has avx512bw && has avx512vl; then
    class=avx512
    has avx512_vnni && class+=-vnni
    has amx_tile && class+=-amx
    core=SKYLAKEX
elif has avx2 && has fma; then
    class=avx2
    has avx_vnni && class=avx-vnni
    [[ $vendor == AuthenticAMD ]] && core=ZEN || core=HASWELL
else
    class=baseline
    core=
fi
emulate=${SYNTHRANK_BENCH_CLASS:-}
features=()
if [[ -n $emulate ]]; then
    case $emulate in
        avx2) needs=avx2 isa=AVX2 ;;
        avx-vnni) needs=avx_vnni isa=AVX2_VNNI ;;
        *) echo "SYNTHRANK_BENCH_CLASS is avx2 or avx-vnni, not '$emulate'" >&2 && exit 2 ;;
    esac
    if ! { has avx2 && has fma && has $needs; }; then
        echo "this CPU ($cpu) cannot run the $emulate class's code" >&2 && exit 2
    fi
    class="$emulate (emulated on $class)"
    [[ $vendor == AuthenticAMD ]] && core=ZEN || core=HASWELL
    export SYNTHRANK_SEARCH_KERNEL=$emulate
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=$isa MKL_ENABLE_INSTRUCTIONS=AVX2
    # One build for every bench (only training calls the GEMM).
    features=(--no-default-features)
fi
core=${PEER_OPENBLAS_CORETYPE:-$core}
if [[ -n $core ]]; then export OPENBLAS_CORETYPE=$core; else unset OPENBLAS_CORETYPE; fi
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2
stamp() {
    python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        row = json.loads(line)
        row.update(cpu=sys.argv[1], cpu_class=sys.argv[2], cpu_flags=sys.argv[4])
        if "peer" in row:
            row.update(openblas_coretype=sys.argv[3] or "auto")
        print(json.dumps(row), flush=True)' "$cpu" "$class" "${OPENBLAS_CORETYPE:-}" "$simd_flags"
}
peer() {
    if [ -x "$py" ]; then
        "$py" "$peers" "$@" --threads 2 --model "$model" --data "$data" | stamp
    else
        echo "no peer environment at $py: see the top of this script" >&2
    fi
}
benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(search eval generate embed train)
as_installed=(--config profile.dev.package.synthrank.opt-level=3
    --config profile.dev.package.synthrank.debug-assertions=false
    --config profile.dev.package.synthrank.overflow-checks=false)
# The median seconds of each side over a repeated benchmark's rows (on stdin), as one row.
summarize() {
    python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
ours = [r["seconds"] for r in rows if "impl" in r]
peers = [r["seconds"] for r in rows if "peer" in r]
row = {"bench": sys.argv[1], "summary": True, "runs": len(ours),
       "synthrank_median_s": statistics.median(ours) if ours else None,
       "peer_median_s": statistics.median(peers) if peers else None}
if ours and peers:
    row["peer_over_synthrank"] = round(row["peer_median_s"] / row["synthrank_median_s"], 2)
print(json.dumps(row))' "$1" | stamp
}
repeat=${BENCH_REPEAT:-5}
for b in "${benches[@]}"; do
    if [[ -n $emulate && ($b == embed || $b == generate) ]]; then
        echo "$b: not measured in an emulated class (its peer picks kernels from the CPU)" >&2
        continue
    fi
    bench=(cargo bench --locked --profile dev "${as_installed[@]}" "${features[@]}" --bench "$b")
    case "$b" in
        search | eval)
            rows=$(mktemp)
            for _ in $(seq "$repeat"); do
                "${bench[@]}" 2>/dev/null | stamp | tee -a "$rows"
                peer "$b" | tee -a "$rows"
            done
            summarize "$b" <"$rows"
            rm -f "$rows"
            ;;
        embed) "${bench[@]}" 2>/dev/null | stamp && peer embed ;;
        train) "${bench[@]}" 2>/dev/null | stamp && peer train --max-len 128 --query-len 64 ;;
        *) "${bench[@]}" 2>/dev/null | stamp ;;
    esac
done
