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
  - name: graded
    kind: sql
    config:
      schema: graded_docs
      query: |
        SELECT 'q' || CAST(q AS VARCHAR) AS query_id, 'd' || CAST(q * 10 + l AS VARCHAR) AS doc_id,
               l AS level, '' AS title, 'passage' AS text, 'm' AS model, 'p' AS prompt_id,
               'h' AS request_hash
        FROM (VALUES (1), (2), (3)) AS a(q) CROSS JOIN (VALUES (3), (2), (1), (0)) AS b(l)
        ORDER BY doc_id {order}
  - name: lists
    kind: assemble
    inputs: {{graded: graded}}
    config: {{group_size: 3, selection: random, sources: [{{input: graded}}], seed: 11}}
"#
            ),
        );
        let pipeline = common::load(&spec, &dir.path().join("work"));
        common::run(&pipeline, Selection::All, false);
        common::runtime().block_on(async {
            let ctx = query_session(&pipeline).await.unwrap();
            let sql = "SELECT query_id, doc_id, label FROM lists ORDER BY query_id, position";
            csv(&read_only_sql(&ctx, sql)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap())
        })
    };
    let ascending = lists("ASC");
    assert_eq!(ascending.lines().count(), 1 + 3 * 3, "{ascending}");
    assert_eq!(ascending, lists("DESC"));
}
