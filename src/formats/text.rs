use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::{FormatError, Position, Row, Rows};

fn open(path: &Path) -> Result<BufReader<File>, FormatError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(1 << 20, f))
        .map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Non-empty lines with their 1-based numbers.
fn numbered_lines(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(u64, String), FormatError>> + Send + use<>, FormatError> {
    let owned: PathBuf = path.to_path_buf();
    Ok(open(path)?
        .lines()
        .enumerate()
        .map(move |(i, line)| {
            line.map(|l| (i as u64 + 1, l))
                .map_err(|source| FormatError::Io {
                    path: owned.clone(),
                    source,
                })
        })
        .filter(|r| !matches!(r, Ok((_, l)) if l.trim().is_empty())))
}

/// BEIR JSON lines: one object per line. `keys` are read in order; ids may be strings or
/// integers; keys listed in `optional` default to the empty string.
pub fn beir_jsonl(
    path: &Path,
    keys: &'static [&'static str],
    optional: &'static [&'static str],
) -> Result<Rows, FormatError> {
    let owned = path.to_path_buf();
    Ok(Box::new(numbered_lines(path)?.map(move |line| {
        let (n, text) = line?;
        let at = Position::Line(n);
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| FormatError::record(&owned, at, format!("invalid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| FormatError::record(&owned, at, "expected a JSON object"))?;
        let fields = keys
            .iter()
            .map(|key| match object.get(*key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                None | Some(serde_json::Value::Null) if optional.contains(key) => Ok(String::new()),
                None => Err(FormatError::record(
                    &owned,
                    at,
                    format!("missing field `{key}`"),
                )),
                Some(other) => Err(FormatError::record(
                    &owned,
                    at,
                    format!("field `{key}` must be a string, found {other}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Row { at, fields })
    })))
}

/// Whether a TSV file starts with a header line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Yes,
    No,
    /// A header is present when the first line's last field is not a number and the caller
    /// expects a numeric last column (BEIR qrels: `query-id corpus-id score`).
    IfLastFieldNotNumeric,
}

/// Tab-separated values with exactly `columns` fields per line.
pub fn tsv(path: &Path, columns: usize, header: Header) -> Result<Rows, FormatError> {
    let owned = path.to_path_buf();
    let mut first = true;
    Ok(Box::new(numbered_lines(path)?.filter_map(move |line| {
        let (n, text) = match line {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let fields: Vec<String> = text.split('\t').map(str::to_string).collect();
        if std::mem::take(&mut first) {
            let skip = match header {
                Header::Yes => true,
                Header::No => false,
                Header::IfLastFieldNotNumeric => fields
                    .last()
                    .is_some_and(|f| f.trim().parse::<f64>().is_err()),
            };
            if skip {
                return None;
            }
        }
        if fields.len() != columns {
            return Some(Err(FormatError::record(
                &owned,
                Position::Line(n),
                format!(
                    "expected {columns} tab-separated fields, found {}",
                    fields.len()
                ),
            )));
        }
        Some(Ok(Row {
            at: Position::Line(n),
            fields,
        }))
    })))
}

/// TREC qrels: `query-id iteration doc-id relevance`, whitespace separated. Yields
/// `[query_id, doc_id, relevance]`.
pub fn trec_qrels(path: &Path) -> Result<Rows, FormatError> {
    let owned = path.to_path_buf();
    Ok(Box::new(numbered_lines(path)?.map(move |line| {
        let (n, text) = line?;
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 4 {
            return Err(FormatError::record(
                &owned,
                Position::Line(n),
                format!(
                    "expected 4 fields `query-id iteration doc-id relevance`, found {}",
                    fields.len()
                ),
            ));
        }
        Ok(Row {
            at: Position::Line(n),
            fields: vec![fields[0].into(), fields[2].into(), fields[3].into()],
        })
    })))
}

/// Classic TREC topic files (`<top> <num> Number: 301 <title> ... </top>`). Yields
/// `[query_id, text]` where text is the `field` section (`title`, `desc` or `narr`).
pub fn trec_topics(path: &Path, field: &str) -> Result<Rows, FormatError> {
    let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    let mut offset = 0;
    while let Some(start) = text[offset..].find("<top>") {
        let start = offset + start;
        let line = text[..start].matches('\n').count() as u64 + 1;
        let at = Position::Line(line);
        let end = text[start..]
            .find("</top>")
            .map(|e| start + e)
            .ok_or_else(|| FormatError::record(path, at, "`<top>` without `</top>`"))?;
        let topic = &text[start + 5..end];
        let section = |tag: &str| -> Option<String> {
            let open = format!("<{tag}>");
            let from = topic.find(&open)? + open.len();
            let until = topic[from..].find('<').map_or(topic.len(), |i| from + i);
            Some(
                topic[from..until]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        };
        let id = section("num")
            .map(|n| n.trim_start_matches("Number:").trim().to_string())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| FormatError::record(path, at, "topic without `<num>`"))?;
        let body = section(field)
            .map(|t| {
                let prefix = match field {
                    "desc" => "Description:",
                    "narr" => "Narrative:",
                    _ => "Topic:",
                };
                t.trim_start_matches(prefix).trim().to_string()
            })
            .ok_or_else(|| {
                FormatError::record(path, at, format!("topic {id} has no `<{field}>`"))
            })?;
        rows.push(Ok(Row {
            at,
            fields: vec![id, body],
        }));
        offset = end + 6;
    }
    if rows.is_empty() {
        return Err(FormatError::File {
            path: path.to_path_buf(),
            message: "no `<top>` topics found".to_string(),
        });
    }
    Ok(Box::new(rows.into_iter()))
}

/// TREC run lines: `query-id Q0 doc-id rank score tag`. Yields `[query_id, doc_id, score]`; the
/// stated rank is ignored, as trec_eval ignores it.
pub fn trec_run(path: &Path) -> Result<Rows, FormatError> {
    let owned = path.to_path_buf();
    Ok(Box::new(numbered_lines(path)?.map(move |line| {
        let (n, text) = line?;
        let at = Position::Line(n);
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(FormatError::record(
                &owned,
                at,
                format!(
                    "expected 6 fields `query-id Q0 doc-id rank score tag`, found {}",
                    fields.len()
                ),
            ));
        }
        if fields[4].parse::<f64>().is_err() {
            return Err(FormatError::record(
                &owned,
                at,
                format!("score `{}` is not a number", fields[4]),
            ));
        }
        Ok(Row {
            at,
            fields: vec![fields[0].into(), fields[2].into(), fields[4].into()],
        })
    })))
}

/// Qrels in either BEIR TSV (`query-id corpus-id score`, header optional) or TREC format
/// (`query-id iteration doc-id relevance`), told apart by the first line. Yields
/// `[query_id, doc_id, relevance]`.
pub fn qrels(path: &Path) -> Result<Rows, FormatError> {
    let first = numbered_lines(path)?
        .next()
        .transpose()?
        .map(|(_, l)| l)
        .unwrap_or_default();
    if is_trec_qrels_line(&first) {
        trec_qrels(path)
    } else {
        tsv(path, 3, Header::IfLastFieldNotNumeric)
    }
}

/// TREC qrels lines have four whitespace-separated fields and no tab-separated triple.
pub(crate) fn is_trec_qrels_line(line: &str) -> bool {
    line.split('\t').count() != 3 && line.split_whitespace().count() == 4
}
