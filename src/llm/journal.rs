//! The response journal: one JSON line per answered request, appended as each response
//! arrives, keyed by the request's hash. Reopening it tells which requests need no resending.
//!
//! Each line goes to the file in one `write` on an append-only descriptor, so a crash or a
//! `kill -9` loses at most the line being written; a torn last line is dropped on reopening.
//! `sync` flushes to the disk (for power loss) and runs at the end and every few seconds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::ChatResponse;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub hash: String,
    pub response: ChatResponse,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
}

pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: not a journal entry: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl Journal {
    /// Opens (or creates) the journal and returns the entries it already holds.
    pub fn open(path: &Path) -> Result<(Journal, HashMap<String, JournalEntry>), JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut entries = HashMap::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let complete = match text.rfind('\n') {
                Some(i) => i + 1,
                None => 0,
            };
            if complete < text.len() {
                // A line torn by a crash mid-write: drop it, its request will be sent again.
                let file = OpenOptions::new().write(true).open(path).map_err(io)?;
                file.set_len(complete as u64).map_err(io)?;
            }
            entries = parse_lines(path, &text[..complete])?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok((
            Journal {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            entries,
        ))
    }

    /// The entries of a journal file, read only (a recorded journal shipped with a pipeline).
    pub fn read(path: &Path) -> Result<HashMap<String, JournalEntry>, JournalError> {
        let text = std::fs::read_to_string(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        parse_lines(path, &text[..complete])
    }

    pub fn append(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(entry).expect("entries serialize");
        line.push(b'\n');
        let mut file = self.file.lock().expect("journal lock");
        file.write_all(&line).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn sync(&self) -> Result<(), JournalError> {
        let file = self.file.lock().expect("journal lock");
        file.sync_data().map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn parse_lines(path: &Path, text: &str) -> Result<HashMap<String, JournalEntry>, JournalError> {
    let mut entries = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: JournalEntry =
            serde_json::from_str(line).map_err(|e| JournalError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?;
        entries.insert(entry.hash.clone(), entry);
    }
    Ok(entries)
}
