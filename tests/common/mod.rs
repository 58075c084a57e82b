//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a subset

pub mod llama_server;
pub mod llm_server;

use std::path::{Path, PathBuf};
use std::process::Output;

use synthrank::pipeline::{Pipeline, RunOptions, RunSummary, Selection};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared` beside the repository: the shared datasets and reference numbers.
pub fn shared() -> PathBuf {
    let path = repo().join("../shared");
    assert!(
        path.is_dir(),
        "the shared data directory {} is missing",
        path.display()
    );
    path
}

/// A demo model fetched by scripts/fetch-models.sh (the test command runs it first).
pub fn demo_model(name: &str) -> PathBuf {
    let path = repo().join("models").join(name);
    assert!(
        path.exists(),
        "demo model {} is missing: run scripts/fetch-models.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

pub fn load(spec: &Path, workdir: &Path) -> Pipeline {
    Pipeline::load(spec, &synthrank::stages::registry(), Some(workdir))
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn run(pipeline: &Pipeline, selection: Selection, force: bool) -> RunSummary {
    try_run(pipeline, selection, force).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_run(
    pipeline: &Pipeline,
    selection: Selection,
    force: bool,
) -> Result<RunSummary, synthrank::pipeline::PipelineError> {
    let options = RunOptions {
        selection,
        force,
        dry_run: false,
        wait_for_lock: false,
    };
    runtime().block_on(pipeline.run(&options, &mut std::io::sink()))
}

/// The error message of a run of every stage of `spec` (in `workdir`) that must fail.
pub fn run_error(spec: &Path, workdir: &Path) -> String {
    match try_run(&load(spec, workdir), Selection::All, false) {
        Ok(summary) => panic!("the run succeeded: {:?}", summary.ran),
        Err(e) => e.to_string(),
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Writes a spec file into `dir` and returns its path.
pub fn write_spec(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the synthrank binary.
pub fn synthrank(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(args)
        .output()
        .expect("the synthrank binary runs")
}

/// `synthrank sql --format csv` over the tables of `spec`'s pipeline.
pub fn sql_csv(spec: &Path, query: &str) -> String {
    stdout(&synthrank(&[
        "sql",
        spec.to_str().unwrap(),
        "--format",
        "csv",
        query,
    ]))
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The standard output of a command that must have succeeded (else its standard error).
pub fn success(output: &Output) -> String {
    assert!(output.status.success(), "{}", stderr(output));
    stdout(output)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A tiny BEIR dataset (4 queries, 5 documents, test qrels) written into `dir`.
pub fn tiny_dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(
        dir.join("queries.jsonl"),
        r#"{"_id": "q1", "text": "what causes rain"}
{"_id": "q2", "text": "how do vaccines work"}
{"_id": "q3", "text": "boiling point of water"}
{"_id": 4, "text": "who wrote hamlet"}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("corpus.jsonl"),
        r#"{"_id": "d1", "title": "Rain", "text": "Rain forms when water vapour condenses."}
{"_id": "d2", "title": "Vaccines", "text": "Vaccines train the immune system."}
{"_id": "d3", "text": "Water boils at 100 degrees Celsius at sea level."}
{"_id": "d4", "title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare."}
{"_id": "d5", "title": "Clouds", "text": "Clouds are made of droplets."}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td5\t1\nq2\td2\t1\nq3\td3\t1\n",
    )
    .unwrap();
}

/// An eight-stage pipeline over `tiny_dataset`, with its template, in `dir`.
pub fn eight_stage_pipeline(dir: &Path) -> PathBuf {
    tiny_dataset(&dir.join("data"));
    std::fs::copy(
        repo().join("pipelines/prompts/graded-passages.j2"),
        dir.join("graded.j2"),
    )
    .unwrap();
    std::fs::write(
        dir.join("judged.sql"),
        "SELECT DISTINCT c.* FROM corpus c JOIN qrels q ON q.doc_id = c.doc_id ORDER BY c.doc_id\n",
    )
    .unwrap();
    write_spec(
        dir,
        "pipeline.yaml",
        r#"name: eight
workdir: work
stages:
  - name: corpus
    kind: load_corpus
    config: {path: data}
  - name: queries
    kind: load_queries
    config: {path: data}
  - name: qrels
    kind: load_qrels
    inputs: [queries, corpus]
    config: {path: data, split: test}
  - name: judged_queries
    kind: sql
    inputs: {queries: queries, qrels: qrels}
    config:
      query: SELECT * FROM queries WHERE query_id IN (SELECT query_id FROM qrels)
      schema: queries
  - name: prompts
    kind: render_prompts
    inputs: {queries: judged_queries}
    config: {template: graded.j2}
  - name: level_prompts
    kind: render_prompts
    inputs: {queries: judged_queries}
    config: {template: graded.j2, mode: per_level, levels: [3, 0]}
  - name: judged_docs
    kind: sql
    inputs: {corpus: corpus, qrels: qrels}
    config: {file: judged.sql, schema: corpus}
  - name: prompt_counts
    kind: sql
    inputs: [prompts, level_prompts]
    config:
      query: SELECT (SELECT count(*) FROM prompts) AS all_levels, (SELECT count(*) FROM level_prompts) AS per_level
"#,
    )
}

/// Spec lines for two `sql` stages, `docs` and `queries`, of deterministic 8-dimensional
/// embeddings (components `sin(i * c.37 + c)`): `docs` rows 1..=DOCS, `queries` the next
/// `queries` rows.
pub fn generated_embedding_stages(docs: usize, queries: usize) -> String {
    let vector = (1..=8)
        .map(|c| format!("CAST(sin(value * {c}.37 + {c}) AS FLOAT)"))
        .collect::<Vec<_>>()
        .join(", ");
    let stage = |name: &str, prefix: char, first: usize, last: usize| {
        format!(
            r#"  - name: {name}
    kind: sql
    config:
      schema: embeddings
      query: "SELECT CONCAT('{prefix}', CAST(value AS VARCHAR)) AS id, make_array({vector}) AS vector FROM generate_series({first}, {last})"
"#
        )
    };
    stage("docs", 'd', 1, docs) + &stage("queries", 'q', docs + 1, docs + queries)
}
