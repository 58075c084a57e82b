//! Loaders read every supported format, select splits and samples reproducibly, and name the
//! file and line of every malformed record.

mod common;

use std::path::Path;

use arrow::array::{Array, Int32Array, StringArray};
use synthrank::pipeline::Selection;
use synthrank::table::read_batches;

/// Runs a one-stage pipeline over files in `dir` and returns its table's columns as strings.
fn load(dir: &Path, kind: &str, config: &str) -> Result<Vec<Vec<String>>, String> {
    let spec = common::write_spec(
        dir,
        "p.yaml",
        &format!(
            "name: p\nworkdir: work\nstages:\n  - name: t\n    kind: {kind}\n    config: {config}\n"
        ),
    );
    let pipeline = synthrank::pipeline::Pipeline::load(&spec, &synthrank::stages::registry(), None)
        .map_err(|e| e.to_string())?;
    common::try_run(&pipeline, Selection::All, true).map_err(|e| e.to_string())?;
    let table = std::fs::read_dir(dir.join("work/t"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let mut rows = Vec::new();
    for batch in read_batches(&table).unwrap() {
        for r in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| match c.as_any().downcast_ref::<StringArray>() {
                        Some(s) => s.value(r).to_string(),
                        None => c
                            .as_any()
                            .downcast_ref::<Int32Array>()
                            .unwrap()
                            .value(r)
                            .to_string(),
                    })
                    .collect(),
            );
        }
    }
    Ok(rows)
}

fn row(fields: &[&str]) -> Vec<String> {
    fields
        .iter()
        .map(std::string::ToString::to_string)
        .collect()
}

#[test]
fn beir_directory_with_split() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_dataset(&dir.path().join("d"));
    let queries = load(dir.path(), "load_queries", "{path: d, split: test}").unwrap();
    assert_eq!(
        queries.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["q1", "q2", "q3"]
    );
    let corpus = load(dir.path(), "load_corpus", "{path: d}").unwrap();
    assert_eq!(
        corpus[2],
        row(&["d3", "", "Water boils at 100 degrees Celsius at sea level."])
    );
    let qrels = load(dir.path(), "load_qrels", "{path: d, split: test}").unwrap();
    assert_eq!(qrels[0], row(&["q1", "d1", "2"]));
    let all = load(dir.path(), "load_queries", "{path: d}").unwrap();
    assert_eq!(
        all[3],
        row(&["4", "who wrote hamlet"]),
        "integer ids become strings"
    );
}

#[test]
fn ms_marco_tsv_and_trec_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("queries.dev.tsv"),
        "1048585\twhat is paula deen's brother\n2\tandorra\n",
    )
    .unwrap();
    assert_eq!(
        load(dir.path(), "load_queries", "{path: queries.dev.tsv}").unwrap()[0],
        row(&["1048585", "what is paula deen's brother"])
    );
    std::fs::write(
        dir.path().join("collection.tsv"),
        "0\tThe presence of communication\n1\tThe Manhattan Project\n",
    )
    .unwrap();
    assert_eq!(
        load(dir.path(), "load_corpus", "{path: collection.tsv}").unwrap()[1],
        row(&["1", "", "The Manhattan Project"])
    );
    std::fs::write(
        dir.path().join("qrels.txt"),
        "19335 0 1017759 0\n19335 0 1082489 3\n",
    )
    .unwrap();
    assert_eq!(
        load(dir.path(), "load_qrels", "{path: qrels.txt}").unwrap()[1],
        row(&["19335", "1082489", "3"])
    );
    std::fs::write(
        dir.path().join("topics.txt"),
        "<top>\n<num> Number: 301\n<title> International Organized Crime\n<desc> Description:\nIdentify organizations.\n</top>\n\n<top>\n<num> Number: 302\n<title> Poliomyelitis and Post-Polio\n<desc> Description:\nIs the disease under control?\n</top>\n",
    )
    .unwrap();
    assert_eq!(
        load(dir.path(), "load_queries", "{path: topics.txt}").unwrap()[1],
        row(&["302", "Poliomyelitis and Post-Polio"])
    );
    assert_eq!(
        load(
            dir.path(),
            "load_queries",
            "{path: topics.txt, topic_field: desc}"
        )
        .unwrap()[0],
        row(&["301", "Identify organizations."])
    );
}

#[test]
fn parquet_with_column_mapping() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_dataset(&dir.path().join("d"));
    // Make a Parquet file with other column names (and an integer id) through the sql stage.
    let spec = common::write_spec(
        dir.path(),
        "make.yaml",
        "name: make\nworkdir: made\nstages:\n  - name: src\n    kind: sql\n    config: {query: \"SELECT 7 AS qid, 'seven' AS question UNION ALL SELECT 8, 'eight'\"}\n",
    );
    common::run(
        &common::load(&spec, &dir.path().join("made")),
        Selection::All,
        false,
    );
    let rows = load(
        dir.path(),
        "load_queries",
        "{path: made/src/result.parquet, columns: {query_id: qid, text: question}}",
    )
    .unwrap();
    let mut ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["7", "8"]);
    let err = load(
        dir.path(),
        "load_queries",
        "{path: made/src/result.parquet}",
    )
    .unwrap_err();
    assert!(
        err.ends_with("result.parquet: no column `query_id` (columns: qid, question)"),
        "{err}"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..100).map(|i| format!("{i}\tquery {i}\n")).collect();
    std::fs::write(dir.path().join("q.tsv"), lines).unwrap();
    let a = load(
        dir.path(),
        "load_queries",
        "{path: q.tsv, sample: {n: 10, seed: 1}}",
    )
    .unwrap();
    let b = load(
        dir.path(),
        "load_queries",
        "{path: q.tsv, sample: {n: 10, seed: 1}}",
    )
    .unwrap();
    let c = load(
        dir.path(),
        "load_queries",
        "{path: q.tsv, sample: {n: 10, seed: 2}}",
    )
    .unwrap();
    assert_eq!(a.len(), 10);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let ids: Vec<u32> = a.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "file order is kept: {ids:?}"
    );
}

#[test]
fn malformed_records_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("q.jsonl"),
        "{\"_id\": \"1\", \"text\": \"a\"}\n{\"_id\": \"2\", \"text\": \"b\"\n",
    )
    .unwrap();
    let err = load(d, "load_queries", "{path: q.jsonl}").unwrap_err();
    assert!(
        err.starts_with("stage `t` failed: ") && err.contains("q.jsonl:2: invalid JSON"),
        "{err}"
    );

    std::fs::write(
        d.join("q.jsonl"),
        "{\"_id\": \"1\", \"text\": \"a\"}\n\n{\"_id\": \"1\", \"text\": \"b\"}\n",
    )
    .unwrap();
    let err = load(d, "load_queries", "{path: q.jsonl}").unwrap_err();
    assert!(
        err.ends_with("q.jsonl:3: duplicate query id `1` (first at 1)"),
        "{err}"
    );

    std::fs::write(d.join("q.jsonl"), "{\"_id\": \"\", \"text\": \"a\"}\n").unwrap();
    let err = load(d, "load_queries", "{path: q.jsonl}").unwrap_err();
    assert!(err.ends_with("q.jsonl:1: empty `query_id`"), "{err}");

    std::fs::write(
        d.join("c.jsonl"),
        "{\"_id\": \"d1\", \"title\": [3], \"text\": \"a\"}\n",
    )
    .unwrap();
    let err = load(d, "load_corpus", "{path: c.jsonl}").unwrap_err();
    assert!(
        err.ends_with("c.jsonl:1: field `title` must be a string, found [3]"),
        "{err}"
    );

    std::fs::write(d.join("r.tsv"), "query-id\tcorpus-id\tscore\nq1\td1\tyes\n").unwrap();
    let err = load(d, "load_qrels", "{path: r.tsv}").unwrap_err();
    assert!(
        err.ends_with("r.tsv:2: `relevance` must be an integer, found `yes`"),
        "{err}"
    );
}

#[test]
fn qrels_ids_are_checked_against_inputs() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_dataset(&dir.path().join("d"));
    std::fs::write(
        dir.path().join("d/qrels/test.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td9\t1\n",
    )
    .unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        "name: p\nworkdir: work\nstages:\n  - name: c\n    kind: load_corpus\n    config: {path: d}\n  - name: q\n    kind: load_queries\n    config: {path: d}\n  - name: r\n    kind: load_qrels\n    inputs: [q, c]\n    config: {path: d, split: test}\n",
    );
    let pipeline = common::load(&spec, &dir.path().join("work"));
    let err = common::try_run(&pipeline, Selection::All, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("test.tsv:3: document id `d9` is not in input `corpus`"),
        "{err}"
    );
}
