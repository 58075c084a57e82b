//! Client throughput of the `generate` stage against the local test server answering at once:
//! 5,000 prompts at concurrency 256, every response journaled. Prints one JSON line.
//! Run: `cargo bench --bench generate` (options: --prompts N --concurrency N).

#[path = "../tests/common/llm_server.rs"]
mod llm_server;

mod common;

use std::time::Instant;

use common::arg;

use llm_server::{LlmServer, Reply, graded_answer, query_of};
use synthrank::pipeline::{Pipeline, RunOptions, Selection};

fn main() {
    let (prompts, concurrency) = (arg("--prompts", 5000), arg("--concurrency", 256));
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    let queries: String = (0..prompts)
        .map(|i| format!("{{\"_id\": \"q{i}\", \"text\": \"question {i}\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("queries.jsonl"), queries).unwrap();
    let template = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/prompts/graded-passages.j2"
    );
    let spec = dir.path().join("p.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: bench\nworkdir: work\nstages:\n  - name: queries\n    kind: load_queries\n    config: {{path: queries.jsonl}}\n  \
             - name: prompts\n    kind: render_prompts\n    inputs: [queries]\n    config: {{template: {template}}}\n  \
             - name: gen\n    kind: generate\n    inputs: [prompts]\n    config: {{endpoints: [{}], model: m, concurrency: {concurrency}}}\n",
            server.url
        ),
    )
    .unwrap();
    let pipeline = Pipeline::load(&spec, &synthrank::stages::registry(), None).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = |selection| RunOptions {
        selection,
        force: false,
        dry_run: false,
        wait_for_lock: false,
    };
    rt.block_on(pipeline.run(
        &options(Selection::Only("queries".into())),
        &mut std::io::sink(),
    ))
    .unwrap();
    rt.block_on(pipeline.run(
        &options(Selection::Only("prompts".into())),
        &mut std::io::sink(),
    ))
    .unwrap();
    let started = Instant::now();
    rt.block_on(pipeline.run(
        &options(Selection::Only("gen".into())),
        &mut std::io::sink(),
    ))
    .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(server.count(), prompts);
    let journaled = std::fs::read_to_string(dir.path().join("work/.state/gen/journal.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(journaled, prompts);
    println!(
        "{{\"bench\": \"generate\", \"impl\": \"synthrank\", \"requests\": {prompts}, \"concurrency\": {concurrency}, \"seconds\": {seconds:.3}, \"requests_per_s\": {:.0}, \"journaled\": {journaled}}}",
        prompts as f64 / seconds
    );
}
