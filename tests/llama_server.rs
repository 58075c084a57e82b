//! `generate` against a real server as users run one: llama.cpp's `llama-server` serving the
//! quickstart's SmolLM2 GGUF on 127.0.0.1, with constrained JSON answers (`response_format`
//! with the answer's schema), a `kill -9` mid-run and a resume that asks nothing twice.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::llama_server::LlamaServer;

const PROMPTS: usize = 6;
const MAX_TOKENS: usize = 1024;

/// The journal's entries: (request hash) per parsed line.
fn journaled(journal: &Path) -> Vec<String> {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["hash"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn llama_cpp_answers_are_constrained_journaled_and_resumed_after_a_kill() {
    let server = LlamaServer::start(
        &common::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
        2,
        2048,
    );
    let dir = tempfile::tempdir().unwrap();
    let queries: String =
        std::fs::read_to_string(common::repo().join("data-samples/scifact-mini/queries.jsonl"))
            .unwrap()
            .lines()
            .take(PROMPTS)
            .map(|l| format!("{l}\n"))
            .collect();
    std::fs::write(dir.path().join("queries.jsonl"), queries).unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &format!(
            "name: llama\nworkdir: work\nstages:\n  \
             - name: queries\n    kind: load_queries\n    config: {{path: queries.jsonl}}\n  \
             - name: prompts\n    kind: render_prompts\n    inputs: [queries]\n    config: {{template: {}}}\n  \
             - name: gen\n    kind: generate\n    inputs: [prompts]\n    config:\n      \
             endpoints: [{}]\n      model: smollm2\n      concurrency: 2\n      temperature: 0.7\n      \
             top_p: 0.9\n      seed: 7\n      max_tokens: {MAX_TOKENS}\n",
            common::repo()
                .join("pipelines/prompts/graded-passages.j2")
                .display(),
            server.url()
        ),
    );

    // Killed once the first answer is journaled, while others are in flight.
    let journal = dir.path().join("work/.state/gen/journal.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while journaled(&journal).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(300), "no answer");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before: HashSet<String> = journaled(&journal).into_iter().collect();
    assert!(
        !before.is_empty() && before.len() < PROMPTS,
        "{}",
        before.len()
    );

    let out = common::synthrank(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let after = journaled(&journal);
    assert_eq!(
        after.len(),
        PROMPTS,
        "every prompt answered once: nothing journaled was asked again"
    );
    assert!(before.iter().all(|h| after.contains(h)));
    assert_eq!(after.iter().collect::<HashSet<_>>().len(), PROMPTS);

    // Every level of every answer is a passage or a reject with its reason.
    let accounted = common::sql_csv(
        &spec,
        "SELECT (SELECT count(*) FROM gen.graded_docs) + \
         (SELECT count(*) FROM gen.rejects WHERE level IS NOT NULL) + \
         4 * (SELECT count(*) FROM gen.rejects WHERE level IS NULL) AS levels",
    );
    assert_eq!(accounted, format!("levels\n{}\n", 4 * PROMPTS));
    // Constrained decoding: the only answers that can fail to parse are those cut off at
    // max_tokens (a small model can repeat itself until then).
    let untruncated_rejects = common::sql_csv(
        &spec,
        &format!(
            "SELECT count(*) AS n FROM gen.rejects r JOIN gen.generations g \
             ON r.request_hash = g.request_hash WHERE g.completion_tokens < {MAX_TOKENS}"
        ),
    );
    assert_eq!(untruncated_rejects, "n\n0\n");
    let docs = common::sql_csv(&spec, "SELECT count(*) AS n FROM gen.graded_docs");
    let docs: usize = docs.lines().nth(1).unwrap().parse().unwrap();
    assert!(docs >= 4, "at least one whole answer: {docs} passages");
}
