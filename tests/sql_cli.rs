//! `synthrank sql` answers queries over every built table and refuses anything that writes;
//! `export` writes tables in TREC, TSV, CSV and JSON lines.

mod common;

use std::path::{Path, PathBuf};

use synthrank::pipeline::Selection;

struct Built {
    _dir: tempfile::TempDir,
    spec: PathBuf,
    work: PathBuf,
}

fn built() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    Built {
        spec,
        work,
        _dir: dir,
    }
}

fn sql(b: &Built, query: &str, format: &str) -> std::process::Output {
    common::synthrank(&[
        "sql",
        b.spec.to_str().unwrap(),
        query,
        "--format",
        format,
        "--workdir",
        b.work.to_str().unwrap(),
    ])
}

#[test]
fn queries_see_every_stage_table() {
    let b = built();
    let out = sql(
        &b,
        "SELECT q.query_id, count(*) AS judged FROM judged_queries q JOIN qrels r USING (query_id) GROUP BY q.query_id ORDER BY q.query_id",
        "csv",
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(common::stdout(&out), "query_id,judged\nq1,2\nq2,1\nq3,1\n");
    let out = sql(
        &b,
        "SELECT doc_id FROM judged_docs.corpus ORDER BY doc_id LIMIT 2",
        "json",
    );
    assert_eq!(
        common::stdout(&out),
        "{\"doc_id\":\"d1\"}\n{\"doc_id\":\"d2\"}\n"
    );
    let out = sql(
        &b,
        "SELECT all_levels, per_level FROM prompt_counts",
        "table",
    );
    let text = common::stdout(&out);
    assert!(text.contains("| all_levels | per_level |"), "{text}");
    assert!(text.contains("| 3          | 6         |"), "{text}");
}

#[test]
fn writes_are_refused() {
    let b = built();
    let target = b.work.join("copied.csv");
    for statement in [
        "CREATE TABLE t AS SELECT 1".to_string(),
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/tmp/x.csv'".to_string(),
        "INSERT INTO queries VALUES ('x', 'y')".to_string(),
        format!("COPY (SELECT * FROM queries) TO '{}'", target.display()),
        "DROP TABLE queries".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
        "CREATE VIEW v AS SELECT 1".to_string(),
    ] {
        let out = sql(&b, &statement, "table");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{statement}: {}",
            common::stderr(&out)
        );
        let err = common::stderr(&out);
        assert!(
            err.starts_with("error: `synthrank sql` is read-only: "),
            "{statement}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!target.exists(), "COPY wrote a file");
    let out = sql(&b, "SELECT count(*) AS n FROM queries", "csv");
    assert_eq!(common::stdout(&out), "n\n4\n");
}

#[test]
fn sql_errors_are_one_line() {
    let b = built();
    let out = sql(&b, "SELECT nope FROM queries", "table");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a query that does not plan is a usage error"
    );
    let err = common::stderr(&out);
    assert!(err.starts_with("error: ") && err.contains("nope"), "{err}");
}

fn export(b: &Built, table: &str, format: &str, output: &Path) -> std::process::Output {
    common::synthrank(&[
        "export",
        b.spec.to_str().unwrap(),
        table,
        "--format",
        format,
        "-o",
        output.to_str().unwrap(),
        "--workdir",
        b.work.to_str().unwrap(),
    ])
}

#[test]
fn export_formats() {
    let b = built();
    let out_dir = tempfile::tempdir().unwrap();
    let trec = out_dir.path().join("qrels.txt");
    let out = export(&b, "qrels", "trec", &trec);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&trec).unwrap(),
        "q1 0 d1 2\nq1 0 d5 1\nq2 0 d2 1\nq3 0 d3 1\n"
    );

    let tsv = out_dir.path().join("q.tsv");
    export(&b, "queries.queries", "tsv", &tsv);
    let text = std::fs::read_to_string(&tsv).unwrap();
    assert_eq!(text.lines().next(), Some("query_id\ttext"));
    assert_eq!(text.lines().nth(4), Some("4\twho wrote hamlet"));

    let jsonl = out_dir.path().join("c.jsonl");
    export(&b, "corpus", "jsonl", &jsonl);
    let first = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        first,
        r#"{"doc_id":"d1","title":"Rain","text":"Rain forms when water vapour condenses."}"#
    );

    let out = export(&b, "queries", "trec", &out_dir.path().join("x"));
    assert_eq!(out.status.code(), Some(2));
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('x'))
        .collect();
    assert!(left.is_empty(), "a failed export left {left:?}");
    assert!(
        common::stderr(&out).starts_with(
            "error: TREC format needs a runs table (query_id, doc_id, rank, score) or a qrels table"
        ),
        "{}",
        common::stderr(&out)
    );
    let out = export(&b, "nope", "csv", &out_dir.path().join("y"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).starts_with("error: unknown stage `nope`"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn schema_command_lists_and_describes_kinds() {
    let out = common::synthrank(&["schema"]);
    let text = common::stdout(&out);
    for kind in ["corpus", "prompts", "qrels", "queries"] {
        assert!(text.lines().any(|l| l.starts_with(kind)), "{text}");
    }
    let out = common::synthrank(&["schema", "qrels"]);
    assert!(
        common::stdout(&out).contains("relevance  Int32  not null"),
        "{}",
        common::stdout(&out)
    );
    let out = common::synthrank(&["schema", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

/// SQL inside a spec (a `sql` stage's query, an input's `sql:` filter) is read-only too: it
/// can neither write a file anywhere nor define a table over an arbitrary path.
#[test]
fn stage_sql_cannot_write_or_read_outside_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.jsonl"),
        "{\"_id\": \"1\", \"text\": \"a\"}\n",
    )
    .unwrap();
    let outside = dir.path().join("outside.csv");
    std::fs::write(dir.path().join("secret.csv"), "a\n1\n").unwrap();
    for query in [
        format!("COPY (SELECT * FROM q) TO '{}'", outside.display()),
        format!(
            "CREATE EXTERNAL TABLE s STORED AS CSV LOCATION '{}'",
            dir.path().join("secret.csv").display()
        ),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let spec = common::write_spec(
            dir.path(),
            "p.yaml",
            &format!(
                "name: p\nworkdir: work\nstages:\n  - name: q\n    kind: load_queries\n    config: {{path: q.jsonl}}\n  \
                 - name: s\n    kind: sql\n    inputs: [q]\n    config: {{query: \"{query}\"}}\n"
            ),
        );
        let error = common::run_error(&spec, &dir.path().join("work"));
        assert!(error.contains("stage SQL is read-only"), "{query}: {error}");
    }
    assert!(!outside.exists(), "COPY wrote outside the workdir");
}
