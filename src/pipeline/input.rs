//! Reading a stage's input one record batch at a time, so memory is bounded by a batch and
//! not by the table.

use std::fs::File;
use std::path::Path;

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::table::{TableError, TableSchema};

use super::StageError;

/// Rows per batch read from a table file.
const BATCH_ROWS: usize = 8192;

enum Source {
    File(ParquetRecordBatchReader),
    Sql(SendableRecordBatchStream),
}

/// The batches of one input, conformed to its role's table kind.
pub struct InputStream {
    role: String,
    source: Source,
    kind: Option<&'static TableSchema>,
}

fn parquet_error(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> TableError + '_ {
    move |source| TableError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

impl InputStream {
    pub(super) fn file(
        role: &str,
        path: &Path,
        kind: Option<&'static TableSchema>,
    ) -> Result<InputStream, StageError> {
        let file = File::open(path).map_err(TableError::io(path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(parquet_error(path))?
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(parquet_error(path))?;
        Ok(InputStream {
            role: role.to_string(),
            source: Source::File(reader),
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
            Source::File(reader) => reader
                .next()
                .transpose()
                .map_err(|e| StageError::from(datafusion::error::DataFusionError::from(e)))?,
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

/// The rows of a table file, from its footer.
pub(super) fn file_rows(path: &Path) -> Option<u64> {
    let reader = SerializedFileReader::new(File::open(path).ok()?).ok()?;
    u64::try_from(reader.metadata().file_metadata().num_rows()).ok()
}
