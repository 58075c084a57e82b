//! Writing query results and exported tables: aligned text, CSV, JSON lines, TSV, TREC.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};

use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;

use super::{CliError, ExportFormat};
use crate::pipeline::QueryError;

fn write_error(e: impl std::fmt::Display) -> CliError {
    CliError::Output(format!("cannot write output: {e}"))
}

/// Column-aligned plain text (status, schema listings).
pub(crate) fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
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

/// How result rows are written.
#[derive(Clone, Copy)]
pub(crate) enum RowFormat<'t> {
    /// An aligned table for people: the only format that holds every row before printing.
    Table,
    Csv,
    JsonLines,
    Tsv,
    /// TREC run or qrels lines, with this run tag.
    Trec(&'t str),
}

impl<'t> RowFormat<'t> {
    pub(crate) fn of_export(format: ExportFormat, tag: &'t str) -> RowFormat<'t> {
        match format {
            ExportFormat::Jsonl => RowFormat::JsonLines,
            ExportFormat::Csv => RowFormat::Csv,
            ExportFormat::Tsv => RowFormat::Tsv,
            ExportFormat::Trec => RowFormat::Trec(tag),
        }
    }
}

/// Writes a query's result as its batches arrive: memory holds one batch (except for
/// [`RowFormat::Table`]).
pub(crate) async fn write_rows(
    mut stream: SendableRecordBatchStream,
    format: RowFormat<'_>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let next = |e| CliError::Query(QueryError::from(e));
    match format {
        RowFormat::Table => {
            let mut batches = Vec::new();
            while let Some(batch) = stream.next().await {
                batches.push(batch.map_err(next)?);
            }
            let text = arrow::util::pretty::pretty_format_batches(&batches).map_err(write_error)?;
            writeln!(out, "{text}").map_err(write_error)
        }
        RowFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            while let Some(batch) = stream.next().await {
                writer.write(&batch.map_err(next)?).map_err(write_error)?;
            }
            Ok(())
        }
        RowFormat::JsonLines => {
            let mut writer = arrow::json::LineDelimitedWriter::new(out);
            while let Some(batch) = stream.next().await {
                writer.write(&batch.map_err(next)?).map_err(write_error)?;
            }
            writer.finish().map_err(write_error)
        }
        RowFormat::Tsv => {
            let mut header = true;
            while let Some(batch) = stream.next().await {
                tsv(&batch.map_err(next)?, header, out)?;
                header = false;
            }
            Ok(())
        }
        RowFormat::Trec(tag) => {
            while let Some(batch) = stream.next().await {
                trec(&batch.map_err(next)?, tag, out)?;
            }
            Ok(())
        }
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
fn tsv(batch: &RecordBatch, header: bool, out: &mut dyn Write) -> Result<(), CliError> {
    if header {
        let names: Vec<&str> = batch
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        writeln!(out, "{}", names.join("\t")).map_err(write_error)?;
    }
    let formatters = cells(batch)?;
    for row in 0..batch.num_rows() {
        let values: Vec<String> = formatters
            .iter()
            .map(|f| f.value(row).to_string().replace(['\t', '\n', '\r'], " "))
            .collect();
        writeln!(out, "{}", values.join("\t")).map_err(write_error)?;
    }
    Ok(())
}

/// TREC run lines for tables with `query_id, doc_id, rank, score`; qrels lines for tables with
/// `query_id, doc_id, relevance`.
fn trec(batch: &RecordBatch, tag: &str, out: &mut dyn Write) -> Result<(), CliError> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()))
            .transpose()
            .map_err(write_error)
    };
    let needs = || {
        CliError::Usage(
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
    Ok(())
}
