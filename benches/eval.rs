//! Evaluation throughput, the work of `peers.py eval` (pytrec_eval): 1,000 queries with 20
//! judgments each and a 1,000-deep run, measures ndcg_cut.10 map recip_rank recall.100,1000
//! P.10, judgments loaded and evaluated. Each side starts from the run in memory as its program
//! holds it: pytrec_eval from Python dicts, synthrank from Arrow batches of 8,192 rows (as the
//! `evaluate` stage reads a `runs` table). Prints one JSON line. Run: `cargo bench --bench eval`.

use std::time::Instant;

use arrow::array::{Float64Array, StringArray};
use rand::{Rng, SeedableRng};
use synthrank::metrics::{self, EvalOptions, Measure, Qrels, Run};

/// The binary's allocator, as everywhere the stage runs.
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
        // Drawn as the peer builds its run, a dict per query: a document drawn again keeps
        // its place and takes the later score (a run retrieves a document once per query).
        let mut place = std::collections::HashMap::new();
        for _ in 0..depth {
            let doc = format!("d{}", rng.random_range(0..100_000));
            let score = rng.random::<f64>();
            match place.get(&doc) {
                Some(&row) => retrieved[row] = (qid.clone(), doc, score),
                None => {
                    place.insert(doc.clone(), retrieved.len());
                    retrieved.push((qid.clone(), doc, score));
                }
            }
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
    // As DataFusion's Parquet reader hands a table over.
    let batches: Vec<(StringArray, StringArray, Float64Array)> = retrieved
        .chunks(8192)
        .map(|rows| {
            (
                StringArray::from_iter_values(rows.iter().map(|(q, _, _)| q)),
                StringArray::from_iter_values(rows.iter().map(|(_, d, _)| d)),
                Float64Array::from_iter_values(rows.iter().map(|&(_, _, s)| s)),
            )
        })
        .collect();
    let started = Instant::now();
    let mut qrels = Qrels::default();
    for (q, d, r) in &judgments {
        qrels.insert(q, d, *r);
    }
    let mut run = Run::default();
    for (queries, docs, scores) in &batches {
        run.append(queries, docs, scores);
    }
    // As the `evaluate` stage does before evaluating.
    assert_eq!(run.first_repeat(), None);
    let loaded = started.elapsed().as_secs_f64();
    let results = metrics::evaluate(&qrels, &run, &measures, EvalOptions::default());
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(results.len(), nq);
    println!(
        "{{\"bench\": \"eval\", \"impl\": \"synthrank\", \"queries\": {nq}, \"depth\": {depth}, \"seconds\": {seconds:.3}, \"load_s\": {loaded:.3}, \"evaluate_s\": {:.3}}}",
        seconds - loaded
    );
}
