//! Search's errors; the `search` and `evaluate` stages turn embeddings into runs and runs into
//! metrics. (Exactness against brute force, for every kernel, is in `retrieval::tests`.)

mod common;

use synthrank::pipeline::{Selection, query_session, read_only_sql};
use synthrank::retrieval::{self, SearchOptions, Vectors};

#[test]
fn dimension_mismatch_is_an_error() {
    let err = retrieval::search(
        Vectors {
            data: &[1.0, 2.0],
            dim: 2,
        },
        Vectors {
            data: &[1.0, 2.0, 3.0],
            dim: 3,
        },
        &[0],
        &[],
        SearchOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "queries have dimension 2, documents 3");
}

#[test]
fn dimensions_past_exact_integer_sums_are_an_error() {
    let dim = retrieval::MAX_DIM + 1;
    let one = vec![1.0; dim];
    let vectors = Vectors { data: &one, dim };
    let err = retrieval::search(vectors, vectors, &[0], &[], SearchOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dimension 65537 is beyond the 65536 whose byte products sum exactly in 32 bits"
    );
    let dim = retrieval::MAX_DIM;
    let vectors = Vectors {
        data: &one[..dim],
        dim,
    };
    let hits = retrieval::search(vectors, vectors, &[0], &[], SearchOptions::default()).unwrap();
    assert_eq!(hits[0][0].score, dim as f32);
}

const SPEC: &str = r#"name: retrieval
workdir: work
stages:
  - name: doc_vectors
    kind: sql
    config:
      schema: embeddings
      query: >
        SELECT id, make_array(CAST(x AS FLOAT), CAST(y AS FLOAT)) AS vector
        FROM (VALUES ('d1', 1.0, 0.0), ('d2', 0.0, 1.0), ('d3', 0.7, 0.7), ('q2', 0.6, 0.8)) AS t(id, x, y)
  - name: query_vectors
    kind: sql
    config:
      schema: embeddings
      query: >
        SELECT id, make_array(CAST(x AS FLOAT), CAST(y AS FLOAT)) AS vector
        FROM (VALUES ('q1', 1.0, 0.0), ('q2', 0.0, 1.0)) AS t(id, x, y)
  - name: qrels
    kind: sql
    config:
      schema: qrels
      query: >
        SELECT * FROM (VALUES ('q1', 'd1', 1), ('q1', 'd3', 2), ('q2', 'd2', 1)) AS t(query_id, doc_id, relevance)
  - name: runs
    kind: search
    inputs: {queries: query_vectors, corpus: doc_vectors}
    config: {k: 2, exclude_self: true}
  - name: metrics
    kind: evaluate
    inputs: {runs: runs, qrels: qrels}
    config: {measures: [ndcg_cut.2, P.1, recall.2]}
  - name: top1
    kind: search
    inputs: {queries: query_vectors, corpus: doc_vectors}
    config: {k: 1, exclude_self: true}
  - name: top1_metrics
    kind: evaluate
    inputs: {runs: top1, qrels: qrels}
    config: {measures: [ndcg_cut.2, P.1, recall.2]}
  - name: report
    kind: report
    inputs: [metrics, top1_metrics]
    config: {title: "k = 2 against k = 1"}
"#;

#[test]
fn search_and_evaluate_stages() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", SPEC);
    let pipeline = common::load(&spec, &dir.path().join("work"));
    common::run(&pipeline, Selection::All, false);
    let rt = common::runtime();
    let rows = |sql: &str| -> String {
        rt.block_on(async {
            let ctx = query_session(&pipeline).await.unwrap();
            let batches = read_only_sql(&ctx, sql)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string()
        })
    };
    // q2 = (0, 1): its own document `q2` (0.8) is excluded; d2 (1.0) then d3 (0.7).
    let runs = rows(
        "SELECT query_id, doc_id, rank, round(score, 4) AS score FROM runs ORDER BY query_id, rank",
    );
    assert_eq!(
        runs,
        "+----------+--------+------+-------+\n\
         | query_id | doc_id | rank | score |\n\
         +----------+--------+------+-------+\n\
         | q1       | d1     | 1    | 1.0   |\n\
         | q1       | d3     | 2    | 0.7   |\n\
         | q2       | d2     | 1    | 1.0   |\n\
         | q2       | d3     | 2    | 0.7   |\n\
         +----------+--------+------+-------+"
    );
    let metrics = rows(
        "SELECT query_id, measure, round(value, 6) AS value FROM metrics ORDER BY query_id, measure",
    );
    // q1 ranks d1 (1) above d3 (2): DCG = 1 + 2/log2(3), ideal 2 + 1/log2(3).
    assert_eq!(
        metrics,
        "+----------+------------+----------+\n\
         | query_id | measure    | value    |\n\
         +----------+------------+----------+\n\
         | all      | P_1        | 1.0      |\n\
         | all      | ndcg_cut_2 | 0.929859 |\n\
         | all      | recall_2   | 1.0      |\n\
         | q1       | P_1        | 1.0      |\n\
         | q1       | ndcg_cut_2 | 0.859719 |\n\
         | q1       | recall_2   | 1.0      |\n\
         | q2       | P_1        | 1.0      |\n\
         | q2       | ndcg_cut_2 | 1.0      |\n\
         | q2       | recall_2   | 1.0      |\n\
         +----------+------------+----------+"
    );
}

#[test]
fn search_needs_named_roles_for_two_embeddings_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &SPEC.replace(
            "inputs: {queries: query_vectors, corpus: doc_vectors}",
            "inputs: [query_vectors, doc_vectors]",
        ),
    );
    let err = synthrank::pipeline::Pipeline::load(&spec, &synthrank::stages::registry(), None)
        .err()
        .unwrap();
    assert!(
        err.to_string().ends_with(
            ":26: stage `runs` (search): input `query_vectors` fills no role by its kind `embeddings`; name the roles (it takes: `queries` (kind `embeddings`), `corpus` (kind `embeddings`))"
        ),
        "{err}"
    );
}

#[test]
fn report_compares_runs_in_html_svg_markdown_and_latex() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", SPEC);
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    let report = work.join("report");
    let markdown = std::fs::read_to_string(report.join("summary.md")).unwrap();
    // k = 1 keeps only d1 (relevance 1) for q1: nDCG@2 = 1 / (2 + 1/log2 3) = 0.3801; mean 0.6900.
    assert_eq!(
        markdown,
        "| run | P_1 | ndcg_cut_2 | recall_2 |\n|---|---:|---:|---:|\n\
         | metrics | 1.0000 | 0.9299 | 1.0000 |\n\
         | top1_metrics | 1.0000 | 0.6900 | 0.7500 |\n"
    );
    let latex = std::fs::read_to_string(report.join("summary.tex")).unwrap();
    assert!(
        latex.contains("run & P\\_1 & ndcg\\_cut\\_2 & recall\\_2 \\\\"),
        "{latex}"
    );
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("<h1>k = 2 against k = 1</h1>"));
    for plot in [
        "plots/metrics.svg",
        "plots/per_query_ndcg_cut_2.svg",
        "plots/per_query_P_1.svg",
    ] {
        assert!(
            html.contains(&format!("src=\"{plot}\"")),
            "{plot} is linked"
        );
        let svg = std::fs::read_to_string(report.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{plot}"
        );
    }
    let bars = std::fs::read_to_string(report.join("plots/metrics.svg")).unwrap();
    assert_eq!(bars.matches("<title>").count(), 6, "3 measures x 2 runs");
    // The summary is a table too, for SQL.
    let rows: usize = synthrank::table::read_batches(&report.join("summary.parquet"))
        .unwrap()
        .iter()
        .map(arrow::array::RecordBatch::num_rows)
        .sum();
    assert_eq!(rows, 6);
}

/// A corpus past `corpus_in_memory_mb` is searched from a mapped file (its stats say how many
/// bytes) with the very results of the in-memory search, and the file is not left behind.
#[test]
fn a_corpus_past_the_memory_limit_is_searched_mapped() {
    let spec = format!(
        "name: mapped\nstages:\n{}{}",
        common::generated_embedding_stages(20_000, 50),
        r#"  - name: in_memory
    kind: search
    inputs: {queries: queries, corpus: docs}
    config: {k: 10}
  - name: mapped
    kind: search
    inputs: {queries: queries, corpus: docs}
    config: {k: 10, corpus_in_memory_mb: 0}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", &spec);
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    let manifest = |stage: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(work.join(stage).join("_manifest.json")).unwrap(),
        )
        .unwrap()
    };
    let (memory, mapped) = (manifest("in_memory"), manifest("mapped"));
    assert_eq!(memory["stats"]["corpus_mapped_bytes"], 0);
    assert_eq!(mapped["stats"]["corpus_mapped_bytes"], 20_000 * 8 * 4);
    assert_eq!(memory["tables"]["runs"]["rows"], 500);
    assert_eq!(
        memory["tables"]["runs"]["hash"], mapped["tables"]["runs"]["hash"],
        "the mapped corpus gave other runs"
    );
    let state = work.join(".state/mapped");
    let left: Vec<_> = std::fs::read_dir(&state).map_or(Vec::new(), |d| d.flatten().collect());
    assert!(left.is_empty(), "left in {}: {left:?}", state.display());
    assert!(
        !work.join(".state/in_memory").exists(),
        "a search in memory makes no state directory"
    );
}

/// A runs table that retrieves one document twice for a query is refused, naming the row: its
/// measures would count the document twice.
#[test]
fn a_document_retrieved_twice_is_an_error_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        r#"name: repeat
workdir: work
stages:
  - name: qrels
    kind: sql
    config:
      schema: qrels
      query: "SELECT * FROM (VALUES ('q1', 'd1', 1)) AS t(query_id, doc_id, relevance)"
  - name: runs
    kind: sql
    config:
      schema: runs
      query: >
        SELECT * FROM (VALUES ('q1', 'd1', 1, 0.9), ('q2', 'd1', 1, 0.8), ('q1', 'd2', 2, 0.7),
        ('q1', 'd1', 3, 0.6)) AS t(query_id, doc_id, rank, score)
  - name: metrics
    kind: evaluate
    inputs: {runs: runs, qrels: qrels}
"#,
    );
    let error = common::run_error(&spec, &dir.path().join("work"));
    assert!(
        error.contains("input `runs` row 4: document `d1` appears twice for query `q1`"),
        "{error}"
    );
}
