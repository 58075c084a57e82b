//! Writing query results and exported tables: aligned text, CSV, JSON lines, TSV, TREC.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

use super::{CliError, ExportFormat};

fn write_error(e: impl std::fmt::Display) -> CliError {
    CliError::Output(format!("cannot write output: {e}"))
}

/// Column-aligned plain text (status, schema listings).
pub fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn pretty(batches: &[RecordBatch], out: &mut dyn Write) -> Result<(), CliError> {
    let text = arrow::util::pretty::pretty_format_batches(batches).map_err(write_error)?;
    writeln!(out, "{text}").map_err(write_error)
}

pub fn csv(batches: &[RecordBatch], out: &mut dyn Write) -> Result<(), CliError> {
    let mut writer = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(out);
    for batch in batches {
        writer.write(batch).map_err(write_error)?;
    }
    Ok(())
}

pub fn json_lines(batches: &[RecordBatch], out: &mut dyn Write) -> Result<(), CliError> {
    let mut writer = arrow::json::LineDelimitedWriter::new(out);
    for batch in batches {
        writer.write(batch).map_err(write_error)?;
    }
    writer.finish().map_err(write_error)
}

pub fn export(
    batches: &[RecordBatch],
    format: ExportFormat,
    tag: &str,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match format {
        ExportFormat::Jsonl => json_lines(batches, out),
        ExportFormat::Csv => csv(batches, out),
        ExportFormat::Tsv => tsv(batches, out),
        ExportFormat::Trec => trec(batches, tag, out),
    }
}

/// Formats every cell of a batch as text (nulls as empty strings).
fn cells(batch: &RecordBatch) -> Result<Vec<ArrayFormatter<'_>>, CliError> {
    let options = FormatOptions::default();
    batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).map_err(write_error))
        .collect()
}

/// Tab-separated with a header line; tabs and line breaks inside values become spaces, as the
/// TSV readers of MS MARCO and BEIR expect one record per line.
fn tsv(batches: &[RecordBatch], out: &mut dyn Write) -> Result<(), CliError> {
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let names: Vec<&str> = first
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    writeln!(out, "{}", names.join("\t")).map_err(write_error)?;
    for batch in batches {
        let formatters = cells(batch)?;
        for row in 0..batch.num_rows() {
            let values: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string().replace(['\t', '\n', '\r'], " "))
                .collect();
            writeln!(out, "{}", values.join("\t")).map_err(write_error)?;
        }
    }
    Ok(())
}

/// TREC run lines for tables with `query_id, doc_id, rank, score`; qrels lines for tables with
/// `query_id, doc_id, relevance`.
fn trec(batches: &[RecordBatch], tag: &str, out: &mut dyn Write) -> Result<(), CliError> {
    for batch in batches {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()))
                .transpose()
                .map_err(write_error)
        };
        let needs = || {
            CliError::Output(
                "TREC format needs a runs table (query_id, doc_id, rank, score) or a qrels table (query_id, doc_id, relevance)"
                    .to_string(),
            )
        };
        let (Some(query), Some(doc)) = (column("query_id")?, column("doc_id")?) else {
            return Err(needs());
        };
        if let (Some(rank), Some(score)) = (column("rank")?, column("score")?) {
            for row in 0..batch.num_rows() {
                writeln!(
                    out,
                    "{} Q0 {} {} {} {tag}",
                    query.value(row),
                    doc.value(row),
                    rank.value(row),
                    score.value(row)
                )
                .map_err(write_error)?;
            }
        } else if let Some(relevance) = column("relevance")? {
            for row in 0..batch.num_rows() {
                writeln!(
                    out,
                    "{} 0 {} {}",
                    query.value(row),
                    doc.value(row),
                    relevance.value(row)
                )
                .map_err(write_error)?;
            }
        } else {
            return Err(needs());
        }
    }
    Ok(())
}
