//! `_manifest.json`: what a stage run produced and from what, written beside its Parquet files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FileStamp, TableError};

pub const MANIFEST_FILE: &str = "_manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub kind: String,
    /// Hash over `components`; the stage is fresh while it recomputes to the same value.
    pub fingerprint: String,
    /// What the fingerprint was computed from, kept so that staleness can be explained.
    pub components: serde_json::Value,
    pub tables: BTreeMap<String, ManifestTable>,
    pub started_at: String,
    pub duration_s: f64,
    pub program_version: String,
    /// Stage-specific counters (token usage, rejects, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub stats: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestTable {
    pub file: String,
    pub kind: Option<String>,
    pub rows: u64,
    pub hash: String,
    pub stamp: FileStamp,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, TableError> {
        let text = std::fs::read_to_string(path).map_err(TableError::io(path))?;
        serde_json::from_str(&text).map_err(|source| TableError::Manifest {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), TableError> {
        let text = serde_json::to_string_pretty(self).expect("manifests serialize");
        std::fs::write(path, text + "\n").map_err(TableError::io(path))
    }

    pub fn rows(&self) -> u64 {
        self.tables.values().map(|t| t.rows).sum()
    }
}
