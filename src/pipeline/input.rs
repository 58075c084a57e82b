//! Reading a stage's input one record batch at a time, so memory is bounded by a batch and
//! not by the table.

use std::path::Path;

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;

use crate::table::{self, TableError, TableSchema};

use super::StageError;

type FileBatches = Box<dyn Iterator<Item = Result<RecordBatch, TableError>> + Send>;

enum Source {
    File(FileBatches),
    Sql(SendableRecordBatchStream),
}

/// The batches of one input, conformed to its role's table kind.
pub struct InputStream {
    role: String,
    source: Source,
    kind: Option<&'static TableSchema>,
}

impl InputStream {
    pub(super) fn file(
        role: &str,
        path: &Path,
        kind: Option<&'static TableSchema>,
    ) -> Result<InputStream, StageError> {
        Ok(InputStream {
            role: role.to_string(),
            source: Source::File(Box::new(table::batch_reader(path)?)),
            kind,
        })
    }

    pub(super) fn sql(
        role: &str,
        stream: SendableRecordBatchStream,
        kind: Option<&'static TableSchema>,
    ) -> InputStream {
        InputStream {
            role: role.to_string(),
            source: Source::Sql(stream),
            kind,
        }
    }

    /// The next batch, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<RecordBatch>, StageError> {
        let batch = match &mut self.source {
            Source::File(reader) => reader.next().transpose()?,
            Source::Sql(stream) => stream.next().await.transpose()?,
        };
        let (Some(batch), Some(kind)) = (batch.as_ref(), self.kind) else {
            return Ok(batch);
        };
        kind.conform(batch).map(Some).map_err(|problem| {
            StageError::Table(TableError::SchemaMismatch {
                table: format!("input `{}`", self.role),
                kind: kind.kind.clone(),
                problem,
            })
        })
    }

    /// Every remaining batch (for stages whose work needs the whole input at once).
    pub async fn collect(mut self) -> Result<Vec<RecordBatch>, StageError> {
        let mut batches = Vec::new();
        while let Some(batch) = self.next().await? {
            batches.push(batch);
        }
        Ok(batches)
    }
}
