//! Exit codes by error class: 2 when the spec, its environment or the request is wrong, 1 when
//! work failed. One case per class, each through the real binary; the message names the cause.
//! (Also tested elsewhere: a locked work directory exits 2 in `generate.rs`, a device asked of a
//! binary without it in `spec_errors.rs`.)

mod common;

use std::path::Path;

/// Loads the tiny dataset, then `stages` (YAML list items, indented by two spaces).
fn spec(dir: &Path, stages: &str) -> String {
    common::tiny_dataset(&dir.join("data"));
    let text = format!(
        "name: codes\nworkdir: work\nstages:\n  - name: corpus\n    kind: load_corpus\n    config: {{path: data}}\n  \
         - name: queries\n    kind: load_queries\n    config: {{path: data}}\n  \
         - name: qrels\n    kind: load_qrels\n    inputs: [queries, corpus]\n    config: {{path: data, split: test}}\n{stages}"
    );
    let path = common::write_spec(dir, "p.yaml", &text);
    path.to_str().unwrap().to_string()
}

/// Prompts for the tiny dataset's queries, sent to the discard port of 127.0.0.1 (nothing
/// listens: every request fails to connect), with `extra` in the generate stage's config.
fn generate_spec(dir: &Path, extra: &str) -> String {
    std::fs::copy(
        common::repo().join("pipelines/prompts/graded-passages.j2"),
        dir.join("graded.j2"),
    )
    .unwrap();
    spec(
        dir,
        &format!(
            "  - name: p\n    kind: render_prompts\n    inputs: [queries]\n    config: {{template: graded.j2}}\n  \
             - name: g\n    kind: generate\n    inputs: [p]\n    config: {{endpoints: [\"http://127.0.0.1:9/v1\"], model: m, {extra}}}\n"
        ),
    )
}

/// Runs `synthrank ARGS` and checks the exit code and a fragment of the one-line message.
fn expect(args: &[&str], code: i32, fragment: &str) {
    let out = common::synthrank(args);
    let stderr = common::stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    // Progress lines of the stages that ran come first, then the error.
    let err = match stderr.rfind("\nerror: ") {
        Some(at) => &stderr[at + 1..],
        None => &stderr,
    };
    assert!(err.starts_with("error: "), "{stderr}");
    assert!(err.contains(fragment), "expected `{fragment}` in: {err}");
}

#[test]
fn a_wrong_spec_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "  - name: x\n    kind: nope\n");
    expect(&["run", &spec], 2, "unknown kind `nope`");
}

#[test]
fn an_unknown_stage_or_an_unbuilt_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "");
    expect(&["run", &spec, "--only", "nope"], 2, "unknown stage `nope`");
    expect(&["run", &spec, "--only", "qrels"], 2, "has not been built");
    expect(
        &["export", &spec, "corpus", "--format", "csv"],
        2,
        "has not been built",
    );
}

#[test]
fn stage_sql_that_writes_or_does_not_plan_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("copied.csv");
    let writes = spec(
        dir.path(),
        &format!(
            "  - name: s\n    kind: sql\n    inputs: [queries]\n    config: {{query: \"COPY (SELECT * FROM queries) TO '{}'\"}}\n",
            target.display()
        ),
    );
    expect(&["run", &writes], 2, "stage SQL is read-only");
    assert!(!target.exists());

    let misspelt = spec(
        dir.path(),
        "  - name: s\n    kind: sql\n    inputs: [queries]\n    config: {query: SELECT nope FROM queries}\n",
    );
    expect(&["run", &misspelt], 2, "nope");
}

#[test]
fn a_template_that_does_not_render_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.j2"),
        "{% block user %}{{ query }} {{ qeury }}{% endblock %}\n",
    )
    .unwrap();
    let spec = spec(
        dir.path(),
        "  - name: p\n    kind: render_prompts\n    inputs: [queries]\n    config: {template: t.j2}\n",
    );
    expect(&["run", &spec], 2, "t.j2:1: `qeury` is undefined");
}

#[test]
fn a_missing_environment_variable_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = generate_spec(dir.path(), "api_key_env: SYNTHRANK_UNSET_KEY");
    expect(
        &["run", &spec],
        2,
        "`api_key_env`: the environment variable `SYNTHRANK_UNSET_KEY` is not set",
    );
}

#[test]
fn a_malformed_input_file_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "");
    std::fs::write(
        dir.path().join("data/corpus.jsonl"),
        "{\"_id\": \"d1\", \"text\": \"fine\"}\n{\"_id\": \"d2\", \"text\": \n",
    )
    .unwrap();
    expect(&["run", &spec], 1, "corpus.jsonl:2");
}

#[test]
fn input_rows_the_stage_cannot_use_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(
        dir.path(),
        "  - name: partial\n    kind: sql\n    inputs: [corpus]\n    config: {query: \"SELECT * FROM corpus WHERE doc_id <> 'd1'\", schema: corpus}\n  \
         - name: lists\n    kind: assemble\n    inputs: {qrels: qrels, corpus: partial}\n    config: {group_size: 2, sources: [{input: qrels}]}\n",
    );
    expect(
        &["run", &spec],
        1,
        "input `qrels`: query `q1`: document `d1` is not in the corpus",
    );
}

#[test]
fn requests_that_fail_for_good_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let spec = generate_spec(dir.path(), "max_retries: 0");
    expect(&["run", &spec], 1, "4 of 4 requests failed");
}

#[test]
fn a_malformed_run_file_given_to_eval_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let qrels = dir.path().join("qrels.txt");
    let run = dir.path().join("run.txt");
    std::fs::write(&qrels, "q1 0 d1 1\n").unwrap();
    // The repeat comes after another query's rows and a second stretch of its own query's.
    std::fs::write(
        &run,
        "q1 Q0 d1 1 0.5 t\nq2 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4 t\nq2 Q0 d2 2 0.4 t\nq1 Q0 d1 3 0.3 t\n",
    )
    .unwrap();
    expect(
        &[
            "eval",
            "--qrels",
            qrels.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
        ],
        1,
        "run.txt:5: document `d1` appears twice for query `q1`",
    );
}
