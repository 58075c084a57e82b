//! Evaluation throughput, the work of `peers.py eval` (pytrec_eval): 1,000 queries with 20
//! judgments each and a 1,000-deep run, measures ndcg_cut.10 map recip_rank recall.100,1000
//! P.10, judgments loaded and evaluated. Prints one JSON line. Run: `cargo bench --bench eval`.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use synthrank::metrics::{self, EvalOptions, Measure, Qrels, Run};

/// The binary's allocator: a run's columns are large blocks, which it backs with huge pages.
#[global_allocator]
static ALLOCATOR: synthrank::allocator::TensorAllocator =
    synthrank::allocator::TensorAllocator::new();

fn main() {
    synthrank::allocator::keep_freed_memory();
    let (nq, depth) = (1000, 1000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut judgments = Vec::new();
    let mut retrieved = Vec::new();
    for q in 0..nq {
        let qid = format!("q{q}");
        for _ in 0..20 {
            judgments.push((
                qid.clone(),
                format!("d{}", rng.random_range(0..100_000)),
                rng.random_range(0..4),
            ));
        }
        for _ in 0..depth {
            retrieved.push((
                qid.clone(),
                format!("d{}", rng.random_range(0..100_000)),
                rng.random::<f64>(),
            ));
        }
    }
    let measures: Vec<Measure> = [
        "ndcg_cut.10",
        "map",
        "recip_rank",
        "recall.100,1000",
        "P.10",
    ]
    .iter()
    .flat_map(|m| Measure::parse_list(m).unwrap())
    .collect();
    let started = Instant::now();
    let mut qrels = Qrels::default();
    for (q, d, r) in &judgments {
        qrels.insert(q, d, *r);
    }
    // As the `evaluate` stage does: sized from the run table's rows and id bytes.
    let ids: usize = retrieved.iter().map(|(_, d, _)| d.len()).sum();
    let mut run = Run::with_capacity(retrieved.len(), ids);
    for (q, d, s) in &retrieved {
        run.insert(q, d, *s);
    }
    let loaded = started.elapsed().as_secs_f64();
    let results = metrics::evaluate(&qrels, &run, &measures, EvalOptions::default());
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(results.len(), nq);
    println!(
        "{{\"bench\": \"eval\", \"impl\": \"synthrank\", \"queries\": {nq}, \"depth\": {depth}, \"seconds\": {seconds:.3}, \"load_s\": {loaded:.3}, \"evaluate_s\": {:.3}}}",
        seconds - loaded
    );
}
