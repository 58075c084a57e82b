//! Embedding throughput, the work of `peers.py embed` (sentence-transformers): all-MiniLM-L6-v2
//! on the first 2,000 SciFact documents ("title text"), max length 256, 2 threads, on the fast
//! backend (ONNX Runtime, the f32 export and the 8-bit-weight one; `--candle 1` adds the candle
//! backend). Prints one JSON line each.
//! Run: `cargo bench --bench embed` (needs scripts/fetch-models.sh and ../shared).

mod common;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use common::arg;
use synthrank::encoder::{
    CandleEmbedder, DeviceChoice, Embedder, ModelDir, OnnxOps, OrtEmbedder, export_onnx,
};

/// Length-sorted batches under a token budget, as the embed stage makes them.
fn run(embedder: &mut dyn Embedder, tokens: &[Vec<u32>], batch_tokens: usize) -> f64 {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].len()));
    let started = Instant::now();
    let mut start = 0;
    while start < order.len() {
        let fit = (batch_tokens / tokens[order[start]].len().max(1)).clamp(1, 128);
        let batch: Vec<&[u32]> = order[start..(start + fit).min(order.len())]
            .iter()
            .map(|&i| tokens[i].as_slice())
            .collect();
        embedder.embed(&batch).unwrap();
        start += batch.len();
    }
    started.elapsed().as_secs_f64()
}

#[global_allocator]
static ALLOCATOR: synthrank::allocator::TensorAllocator =
    synthrank::allocator::TensorAllocator::new();

fn main() {
    synthrank::allocator::keep_freed_memory();
    let (docs, max_len, threads, batch_tokens, with_candle) = (
        arg("--docs", 2000),
        arg("--max-len", 256),
        arg("--threads", 2),
        arg("--batch-tokens", 1024),
        arg("--candle", 0) == 1,
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("models/all-MiniLM-L6-v2");
    let dir = ModelDir::open(&model_path).expect("scripts/fetch-models.sh");
    let texts: Vec<String> =
        std::fs::read_to_string(root.join("../shared/datasets/scifact/corpus.jsonl"))
            .unwrap()
            .lines()
            .take(docs)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {}",
                    v["title"].as_str().unwrap_or(""),
                    v["text"].as_str().unwrap()
                )
                .trim()
                .to_string()
            })
            .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut tokenizer = dir.tokenizer().unwrap();
    let tokens = tokenizer.encode_batch(&refs, max_len).unwrap();

    let model = dir.load_model(&Device::Cpu).unwrap();
    let library = root.join("models/onnxruntime/libonnxruntime.so.1.31.1");
    let exports = [OnnxOps::OnnxRuntime, OnnxOps::OnnxRuntimeInt8].map(|ops| {
        let path = std::env::temp_dir().join(format!(
            "synthrank-bench-{}-{}.onnx",
            std::process::id(),
            ops.tag()
        ));
        export_onnx(&model, &path, ops).unwrap();
        path
    });
    let [mut ort, mut ort_int8] = exports.clone().map(|path| {
        OrtEmbedder::open(
            &library,
            &path,
            dir.config.hidden_size,
            dir.pooling,
            dir.normalize,
            tokenizer.pad_id(),
            threads,
            DeviceChoice::Cpu,
        )
        .unwrap()
    });
    let mut candle = CandleEmbedder::new(model, dir.pooling, dir.normalize, tokenizer.pad_id());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut backends: Vec<(&str, &mut dyn Embedder)> =
        vec![("onnx", &mut ort), ("onnx int8", &mut ort_int8)];
    if with_candle {
        backends.push(("candle", &mut candle));
    }
    for (name, embedder) in backends {
        run(embedder, &tokens[..64.min(tokens.len())], batch_tokens); // warm-up
        let seconds = pool.install(|| run(embedder, &tokens, batch_tokens));
        println!(
            "{{\"bench\": \"embed\", \"impl\": \"synthrank ({name})\", \"docs\": {}, \"max_len\": {max_len}, \"threads\": {threads}, \"seconds\": {seconds:.3}, \"docs_per_s\": {:.2}}}",
            tokens.len(),
            tokens.len() as f64 / seconds
        );
    }
    for path in exports {
        let _ = std::fs::remove_file(path);
    }
}
