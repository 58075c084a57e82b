//! Readers for the file formats IR data comes in: BEIR JSONL, TSV (MS MARCO, BEIR qrels),
//! TREC topics and qrels, and Parquet. Each yields rows of string fields with the line (or row)
//! they came from, so every malformed record is reported at its place. No pipeline knowledge.

mod parquet_rows;
mod text;

use std::fmt;
use std::path::{Path, PathBuf};

pub use parquet_rows::parquet_rows;
pub(crate) use text::is_trec_qrels_line;
pub use text::{Header, beir_jsonl, qrels, trec_qrels, trec_run, trec_topics, tsv};

/// One record: its fields in the order the caller asked for, and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub at: Position,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Line(u64),
    Row(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "{n}"),
            Position::Row(n) => write!(f, "row {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}:{at}: {message}", path.display())]
    Record {
        path: PathBuf,
        at: Position,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

impl FormatError {
    pub fn record(path: &Path, at: Position, message: impl Into<String>) -> FormatError {
        FormatError::Record {
            path: path.to_path_buf(),
            at,
            message: message.into(),
        }
    }
}

pub(crate) type Rows = Box<dyn Iterator<Item = Result<Row, FormatError>> + Send>;
