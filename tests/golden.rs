//! Golden-file tests in the style of sqllogictest: `tests/golden/*.slt` hold SQL queries over a
//! pipeline's tables and their expected CSV output. Set `UPDATE_GOLDEN=1` to rewrite them from
//! the actual output (then review the diff).

mod common;

use std::path::Path;

use synthrank::pipeline::{Selection, query_session, read_only_sql};

struct Block {
    sql: String,
    expected: String,
}

/// The file's header line `# pipeline: PATH` names the spec (relative to the repository);
/// blocks are `query` / SQL / `----` / expected CSV rows, up to the next `query` line.
fn parse(text: &str) -> (String, Vec<Block>) {
    let spec = text
        .lines()
        .find_map(|l| l.strip_prefix("# pipeline: "))
        .expect("a `# pipeline: PATH` header")
        .trim()
        .to_string();
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "query" {
            continue;
        }
        let mut sql = Vec::new();
        for l in lines.by_ref() {
            if l.trim() == "----" {
                break;
            }
            sql.push(l);
        }
        // Expected output runs to the next `query` line: values may contain blank lines.
        let mut expected = Vec::new();
        while let Some(l) = lines.peek() {
            if l.trim() == "query" {
                break;
            }
            expected.push(*l);
            lines.next();
        }
        while expected.last().is_some_and(|l| l.trim().is_empty()) {
            expected.pop();
        }
        blocks.push(Block {
            sql: sql.join("\n"),
            expected: expected.join("\n"),
        });
    }
    (spec, blocks)
}

fn render(text: &str, blocks: &[Block], actual: &[String]) -> String {
    let header: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
    let mut out = header.join("\n");
    out.push('\n');
    for (block, result) in blocks.iter().zip(actual) {
        out.push_str(&format!("\nquery\n{}\n----\n{}\n", block.sql, result));
    }
    out
}

fn csv(batches: &[arrow::array::RecordBatch]) -> String {
    let mut buf = Vec::new();
    {
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut buf);
        for b in batches {
            writer.write(b).unwrap();
        }
    }
    String::from_utf8(buf).unwrap().trim_end().to_string()
}

fn check(file: &str) {
    let path = common::repo().join("tests/golden").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let (spec, blocks) = parse(&text);
    assert!(!blocks.is_empty(), "{file} has no queries");
    let work = tempfile::tempdir().unwrap();
    let pipeline = common::load(&common::repo().join(&spec), work.path());
    common::run(&pipeline, Selection::All, false);

    let rt = common::runtime();
    let actual: Vec<String> = rt.block_on(async {
        let ctx = query_session(&pipeline).await.unwrap();
        let mut out = Vec::new();
        for block in &blocks {
            let frame = read_only_sql(&ctx, &block.sql)
                .await
                .unwrap_or_else(|e| panic!("{file}: {}: {e}", block.sql));
            out.push(csv(&frame.collect().await.unwrap()));
        }
        out
    });
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        // In CI a rewrite would turn every failure into a pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_GOLDEN is refused when CI is set: golden files are reviewed, not rewritten in CI"
        );
        std::fs::write(&path, render(&text, &blocks, &actual)).unwrap();
        return;
    }
    for (block, result) in blocks.iter().zip(&actual) {
        assert_eq!(
            result.trim_end(),
            block.expected.trim_end(),
            "{}: query\n{}\n(rerun with UPDATE_GOLDEN=1 to accept)",
            Path::new(file).display(),
            block.sql
        );
    }
}

#[test]
fn scifact_loaders_prompts_and_sql() {
    check("scifact.slt");
}

#[test]
fn training_pipeline_tables() {
    check("training.slt");
}

/// `assemble` draws the same lists from the same rows in any table order (a SQL stage's join
/// emits rows in no fixed order; this once made the training golden flaky).
#[test]
fn assemble_lists_do_not_depend_on_row_order() {
    let lists = |order: &str| -> String {
        let dir = tempfile::tempdir().unwrap();
        let spec = common::write_spec(
            dir.path(),
            "spec.yaml",
            &format!(
                r#"name: order
workdir: work
stages:
{}  - name: lists
    kind: assemble
    inputs: {{graded: graded}}
    config: {{group_size: 3, selection: random, sources: [{{input: graded}}], seed: 11}}
"#,
                graded_fixture(3, order)
            ),
        );
        let pipeline = common::load(&spec, &dir.path().join("work"));
        common::run(&pipeline, Selection::All, false);
        query(
            &pipeline,
            "SELECT query_id, doc_id, label FROM lists ORDER BY query_id, position",
        )
    };
    let ascending = lists("ASC");
    assert_eq!(ascending.lines().count(), 1 + 3 * 3, "{ascending}");
    assert_eq!(ascending, lists("DESC"));
}

/// `assemble` keeps one record per document across sources, the later source's (as the
/// reference's dict update does), and draws each epoch's lists anew, epoch 0 being what a
/// one-epoch table holds.
#[test]
fn assemble_dedups_across_sources_and_redraws_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "spec.yaml",
        &format!(
            r#"name: dedup
workdir: work
stages:
{}  - name: corpus
    kind: sql
    inputs: [graded]
    config: {{schema: corpus, query: "SELECT doc_id, title, text FROM graded"}}
  - name: real
    kind: sql
    inputs: [graded]
    config: {{schema: qrels, query: "SELECT query_id, doc_id, 7 AS relevance FROM graded WHERE level = 3"}}
  - name: real_last
    kind: assemble
    inputs: {{graded: graded, qrels: real, corpus: corpus}}
    config: {{group_size: 4, selection: top, sources: [{{input: graded}}, {{input: qrels}}]}}
  - name: real_first
    kind: assemble
    inputs: {{graded: graded, qrels: real, corpus: corpus}}
    config: {{group_size: 4, selection: top, sources: [{{input: qrels}}, {{input: graded}}]}}
  - name: one_epoch
    kind: assemble
    inputs: {{graded: graded}}
    config: {{group_size: 2, selection: random, sources: [{{input: graded}}], seed: 5}}
  - name: three_epochs
    kind: assemble
    inputs: {{graded: graded}}
    config: {{group_size: 2, selection: random, sources: [{{input: graded}}], seed: 5, epochs: 3}}
"#,
            graded_fixture(4, "")
        ),
    );
    let pipeline = common::load(&spec, &dir.path().join("work"));
    common::run(&pipeline, Selection::All, false);
    let sql = |text: &str| query(&pipeline, text);
    let labels = |table: &str| {
        sql(&format!(
            "SELECT doc_id, label FROM {table} WHERE query_id = 'q1' ORDER BY position"
        ))
    };
    assert_eq!(
        labels("real_last"),
        "doc_id,label\nd13,7.0\nd12,2.0\nd11,1.0\nd10,0.0"
    );
    assert_eq!(
        labels("real_first"),
        "doc_id,label\nd13,3.0\nd12,2.0\nd11,1.0\nd10,0.0"
    );
    let counts = sql(
        "SELECT epoch, count(*) AS rows, count(DISTINCT query_id) AS queries FROM three_epochs \
         GROUP BY epoch ORDER BY epoch",
    );
    assert_eq!(counts, "epoch,rows,queries\n0,8,4\n1,8,4\n2,8,4");
    let epoch = |e: i32| {
        sql(&format!(
            "SELECT query_id, doc_id FROM three_epochs WHERE epoch = {e} ORDER BY query_id, position"
        ))
    };
    assert_eq!(
        epoch(0),
        sql("SELECT query_id, doc_id FROM one_epoch ORDER BY query_id, position")
    );
    assert!(
        epoch(1) != epoch(0) || epoch(2) != epoch(0),
        "every epoch drew the same lists"
    );
}

/// A `graded_docs` stage `graded` of `queries` queries x levels 3..0, document ids `d<q><l>`,
/// rows in `ORDER BY doc_id <order>` (none when empty).
fn graded_fixture(queries: u32, order: &str) -> String {
    let values: Vec<String> = (1..=queries).map(|q| format!("({q})")).collect();
    let order = if order.is_empty() {
        String::new()
    } else {
        format!("\n        ORDER BY doc_id {order}")
    };
    format!(
        r#"  - name: graded
    kind: sql
    config:
      schema: graded_docs
      query: |
        SELECT 'q' || CAST(q AS VARCHAR) AS query_id, 'd' || CAST(q * 10 + l AS VARCHAR) AS doc_id,
               l AS level, '' AS title, 'passage' AS text, 'm' AS model, 'p' AS prompt_id,
               'h' AS request_hash
        FROM (VALUES {}) AS a(q) CROSS JOIN (VALUES (3), (2), (1), (0)) AS b(l){order}
"#,
        values.join(", ")
    )
}

/// A read-only query's result as CSV.
fn query(pipeline: &synthrank::pipeline::Pipeline, sql: &str) -> String {
    common::runtime().block_on(async {
        let ctx = query_session(pipeline).await.unwrap();
        csv(&read_only_sql(&ctx, sql)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap())
    })
}
