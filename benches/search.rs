//! Exact search throughput, the work of `peers.py search` (FAISS IndexFlatIP): 1,000 queries
//! against 200,000 documents of 384 dimensions, top-100, 2 threads. Prints one JSON line.
//! Run: `cargo bench --bench search` (options: --docs N --nq N --dim N --k N --threads N
//! --query-block N --chunk-docs N --repeat N). With `--repeat N` the search runs N times on the same data and
//! `seconds` is the median (`min_seconds` the fastest): this machine's timings vary by ±20%
//! from run to run, more than the differences being measured.

mod common;

use std::time::Instant;

use common::arg;

use rand::{Rng, SeedableRng};
use synthrank::retrieval::{self, SearchOptions, Vectors};

/// Standard normal values (Box-Muller), like the peer's numpy generator.
fn normal(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

#[global_allocator]
static ALLOCATOR: synthrank::allocator::TensorAllocator =
    synthrank::allocator::TensorAllocator::new();

fn main() {
    synthrank::allocator::keep_freed_memory();
    let (docs, nq, dim, k, threads) = (
        arg("--docs", 200_000),
        arg("--nq", 1000),
        arg("--dim", 384),
        arg("--k", 100),
        arg("--threads", 2),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let d = normal(&mut rng, docs * dim);
    let q = normal(&mut rng, nq * dim);
    let ids: Vec<String> = (0..docs).map(|i| i.to_string()).collect();
    let ranks = retrieval::id_ranks(&ids);
    let defaults = SearchOptions::default();
    let options = SearchOptions {
        k,
        threads,
        query_block: arg("--query-block", defaults.query_block),
        chunk_docs: arg("--chunk-docs", defaults.chunk_docs),
    };
    let repeat = arg("--repeat", 1).max(1);
    let mut times: Vec<f64> = (0..repeat)
        .map(|_| {
            let started = Instant::now();
            let hits = retrieval::search(
                Vectors { data: &q, dim },
                Vectors { data: &d, dim },
                &ranks,
                &[],
                options,
            )
            .unwrap();
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(hits.len(), nq);
            seconds
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let (seconds, min_seconds) = (times[times.len() / 2], times[0]);
    println!(
        "{{\"bench\": \"search\", \"impl\": \"synthrank\", \"docs\": {docs}, \"dim\": {dim}, \"queries\": {nq}, \"k\": {k}, \"threads\": {threads}, \"repeat\": {repeat}, \"seconds\": {seconds:.3}, \"min_seconds\": {min_seconds:.3}, \"queries_per_s\": {:.1}}}",
        nq as f64 / seconds
    );
}
