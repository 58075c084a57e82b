//! Reading and writing one table as one Parquet file.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::{FileStamp, TableError, TableSchema, hash_file};

/// The largest row group written, in estimated encoded bytes.
const ROW_GROUP_BYTES: usize = 128 << 20;

/// Writes record batches to a Parquet file, checking each against the table's declared kind.
pub struct TableWriter {
    name: String,
    kind: Option<&'static TableSchema>,
    path: PathBuf,
    schema: SchemaRef,
    writer: ArrowWriter<File>,
    rows: u64,
}

/// A finished table: where it is, how many rows, and its content hash.
#[derive(Debug, Clone)]
pub struct WrittenTable {
    pub name: String,
    pub kind: Option<String>,
    pub path: PathBuf,
    pub rows: u64,
    pub hash: String,
    pub stamp: FileStamp,
}

impl TableWriter {
    /// `kind` is the declared table kind; `None` for free-form tables (a `sql` stage without a
    /// declared schema), whose schema is whatever the first batch has.
    pub(crate) fn create(
        name: &str,
        kind: Option<&'static TableSchema>,
        schema: SchemaRef,
        path: &Path,
    ) -> Result<TableWriter, TableError> {
        if let Some(kind) = kind {
            kind.check(&schema)
                .map_err(|problem| TableError::SchemaMismatch {
                    table: name.to_string(),
                    kind: kind.kind.clone(),
                    problem,
                })?;
        }
        let file = File::create(path).map_err(TableError::io(path))?;
        // Row groups close at 128 MiB as well as at a million rows: the writer holds a whole
        // row group, which for a million 768-dimensional embeddings was 3 GB.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|source| {
            TableError::Parquet {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(TableWriter {
            name: name.to_string(),
            kind,
            path: path.to_path_buf(),
            schema,
            writer,
            rows: 0,
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), TableError> {
        if batch.schema() != self.schema {
            let problem = match self.kind {
                Some(kind) => kind
                    .check(&batch.schema())
                    .err()
                    .unwrap_or_else(|| "schema metadata differs".to_string()),
                None => format!(
                    "batch schema {:?} differs from the table's {:?}",
                    batch.schema(),
                    self.schema
                ),
            };
            return Err(TableError::SchemaMismatch {
                table: self.name.clone(),
                kind: self.kind.map_or("any".to_string(), |k| k.kind.clone()),
                problem,
            });
        }
        self.rows += batch.num_rows() as u64;
        self.writer
            .write(batch)
            .map_err(|source| TableError::Parquet {
                path: self.path.clone(),
                source,
            })
    }

    pub(crate) fn finish(self) -> Result<WrittenTable, TableError> {
        let TableWriter {
            name,
            kind,
            path,
            writer,
            rows,
            ..
        } = self;
        let file = writer.into_inner().map_err(|source| TableError::Parquet {
            path: path.clone(),
            source,
        })?;
        file.sync_all().map_err(TableError::io(&path))?;
        drop(file);
        Ok(WrittenTable {
            name,
            kind: kind.map(|k| k.kind.clone()),
            hash: hash_file(&path)?,
            stamp: FileStamp::of(&path)?,
            path,
            rows,
        })
    }
}

/// Reads a whole Parquet file (stages stream theirs: `StageContext::stream_input`).
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    batch_reader(path)?.collect()
}

/// Rows per batch read from a table file: memory holds a batch, not the table.
const BATCH_ROWS: usize = 8192;

/// A table file's batches, [`BATCH_ROWS`] at a time.
pub(crate) fn batch_reader(
    path: &Path,
) -> Result<impl Iterator<Item = Result<RecordBatch, TableError>> + Send + use<>, TableError> {
    let parquet_err = |source| TableError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(TableError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet_err)?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(parquet_err)?;
    let owned = path.to_path_buf();
    Ok(reader.map(move |batch| {
        batch.map_err(|e| TableError::Parquet {
            path: owned.clone(),
            source: e.into(),
        })
    }))
}

/// The rows of a table file, from its footer (`None` if it cannot be read).
pub(crate) fn file_rows(path: &Path) -> Option<u64> {
    let reader = SerializedFileReader::new(File::open(path).ok()?).ok()?;
    u64::try_from(reader.metadata().file_metadata().num_rows()).ok()
}
