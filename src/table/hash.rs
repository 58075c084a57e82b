//! Content hashes of files, and cheap stamps (size + modification time) that tell whether a file
//! may have changed since it was hashed, so that `status` need not re-read large files.

use std::fs::File;
use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::TableError;

/// BLAKE3 of a file's bytes, hex encoded.
pub(crate) fn hash_file(path: &Path) -> Result<String, TableError> {
    let mut file = File::open(path).map_err(TableError::io(path))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher).map_err(TableError::io(path))?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: u128,
}

impl FileStamp {
    pub fn of(path: &Path) -> Result<FileStamp, TableError> {
        let meta = std::fs::metadata(path).map_err(TableError::io(path))?;
        let mtime_ns = meta
            .modified()
            .map_err(TableError::io(path))?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(FileStamp {
            size: meta.len(),
            mtime_ns,
        })
    }
}
