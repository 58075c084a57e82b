//! One training step, the work of `peers.py train --max-len 128 --query-len 64` (PyTorch):
//! all-MiniLM-L6-v2 in training mode, 16 SciFact queries (<= 64 tokens) x groups of 4 passages
//! (<= 128 tokens) with in-batch negatives, Wasserstein loss, AdamW, 2 threads. Prints one JSON
//! line with the median of `--steps` steps after a warm-up step.
//! Run: `cargo bench --bench train` (needs scripts/fetch-models.sh and ../shared).

mod common;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use common::arg;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use synthrank::encoder::{ModelDir, Pooling};
use synthrank::loss::LossKind;
use synthrank::train::{AdamWConfig, Decay, Schedule, TrainConfig, TrainGroup, Trainer, Warmup};

fn texts(path: &Path, key: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let title = v.get("title").and_then(|t| t.as_str()).unwrap_or("");
            format!("{title} {}", v[key].as_str().unwrap())
                .trim()
                .to_string()
        })
        .collect()
}

#[global_allocator]
static ALLOCATOR: synthrank::allocator::TensorAllocator =
    synthrank::allocator::TensorAllocator::new();

fn main() {
    synthrank::allocator::keep_freed_memory();
    let (queries, group, max_len, query_len, steps, threads) = (
        arg("--queries", 16),
        arg("--group", 4),
        arg("--max-len", 128),
        arg("--query-len", 64),
        arg("--steps", 3),
        arg("--threads", 2),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/datasets/scifact");
    let dir =
        ModelDir::open(&root.join("models/all-MiniLM-L6-v2")).expect("scripts/fetch-models.sh");
    let mut tokenizer = dir.tokenizer().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let all_queries = texts(&data.join("queries.jsonl"), "text");
    let corpus = texts(&data.join("corpus.jsonl"), "text");
    let labels = [3.0, 2.0, 1.0, 0.0];
    let groups: Vec<TrainGroup> = (0..queries)
        .map(|_| {
            let q = all_queries.choose(&mut rng).unwrap();
            let ps: Vec<&str> = (0..group)
                .map(|_| corpus.choose(&mut rng).unwrap().as_str())
                .collect();
            TrainGroup {
                query: tokenizer.encode_batch(&[q], query_len).unwrap().remove(0),
                passages: tokenizer.encode_batch(&ps, max_len).unwrap(),
                labels: (0..group)
                    .map(|i| labels.get(i).copied().unwrap_or(0.0))
                    .collect(),
            }
        })
        .collect();
    let config = TrainConfig {
        loss: LossKind::Wasserstein,
        temperature: 1.0,
        in_batch_negatives: true,
        pooling: Pooling::Mean,
        normalize: false,
        dropout: true,
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        schedule: Schedule {
            lr: 1e-5,
            warmup: Warmup::Linear,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: steps as u64 + 1,
        },
        max_grad_norm: None,
        seed: 0,
        chunk_size: None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let model = dir.load_model(&Device::Cpu).unwrap();
    let mut trainer = Trainer::new(model, config, tokenizer.pad_id()).unwrap();
    let mut times: Vec<f64> = pool.install(|| {
        (0..=steps)
            .map(|_| {
                let started = Instant::now();
                trainer.step(&[&groups]).unwrap();
                started.elapsed().as_secs_f64()
            })
            .collect()
    });
    times.remove(0);
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"bench\": \"train_step\", \"impl\": \"synthrank (candle CPU)\", \"queries\": {queries}, \"group\": {group}, \"max_len\": {max_len}, \"query_len\": {query_len}, \"threads\": {threads}, \"median_s\": {:.3}, \"min_s\": {:.3}}}",
        times[times.len() / 2],
        times[0]
    );
}
