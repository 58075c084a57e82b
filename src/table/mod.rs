//! Parquet tables on disk: schemas, writers that validate them, content hashes, manifests and
//! atomic replacement of a stage's output directory.

mod atomic;
pub mod columns;
mod hash;
mod io;
mod manifest;
pub mod schema;

use std::path::PathBuf;

pub use atomic::recover_interrupted;
pub(crate) use atomic::{StagingDir, write_file};
pub use hash::FileStamp;
pub(crate) use hash::hash_file;
pub use io::{TableWriter, WrittenTable, read_batches};
pub(crate) use io::{batch_reader, file_rows};
pub use manifest::{MANIFEST_FILE, Manifest, ManifestTable};
pub use schema::{TableSchema, kinds, schema};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("unknown table kind `{kind}` (known kinds: {known})")]
    UnknownKind { kind: String, known: String },
    #[error("table `{table}` ({kind}): {problem}")]
    SchemaMismatch {
        table: String,
        kind: String,
        problem: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: invalid manifest: {source}", path.display())]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl TableError {
    /// A table kind the spec names that does not exist, or a table that does not have the
    /// columns its declared kind needs: the spec is wrong (exit 2).
    pub(crate) fn is_usage(&self) -> bool {
        matches!(
            self,
            TableError::UnknownKind { .. } | TableError::SchemaMismatch { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TableError {
        let path = path.into();
        move |source| TableError::Io { path, source }
    }
}
