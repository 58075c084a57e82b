//! The response journal: one JSON line per answered request, appended as each response
//! arrives, keyed by the request's hash. Reopening it tells which requests need no resending.
//!
//! Each line goes to the file in one `write` on an append-only descriptor, so a crash or a
//! `kill -9` loses at most the line being written; a torn last line is dropped on reopening,
//! and a line that is not an entry (garbage a crashed filesystem left) is skipped with a
//! warning: its request is sent again, while every other answer paid for stays usable.
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

/// A journal opened for appending, with what it already holds.
pub struct OpenedJournal {
    pub journal: Journal,
    pub entries: HashMap<String, JournalEntry>,
    /// Lines that were not entries, skipped.
    pub skipped_lines: usize,
}

impl Journal {
    /// Opens (or creates) the journal and returns the entries it already holds.
    pub fn open(path: &Path) -> Result<OpenedJournal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut entries = HashMap::new();
        let mut skipped_lines = 0;
        if path.exists() {
            // Bytes, not a string: a damaged line may not even be UTF-8.
            let bytes = std::fs::read(path).map_err(io)?;
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if complete < bytes.len() {
                // A line torn by a crash mid-write: drop it, its request will be sent again.
                let file = OpenOptions::new().write(true).open(path).map_err(io)?;
                file.set_len(complete as u64).map_err(io)?;
            }
            let text = String::from_utf8_lossy(&bytes[..complete]);
            let (parsed, bad) = parse_lines(path, &text);
            for error in &bad {
                tracing::warn!("skipping a damaged journal line: {error}");
            }
            (entries, skipped_lines) = (parsed, bad.len());
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(OpenedJournal {
            journal: Journal {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            entries,
            skipped_lines,
        })
    }

    /// The entries of a journal file, read only (a recorded journal shipped with a pipeline):
    /// strict, since a damaged recording is the user's to repair.
    pub fn read(path: &Path) -> Result<HashMap<String, JournalEntry>, JournalError> {
        let text = std::fs::read_to_string(path).map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let (entries, mut bad) = parse_lines(path, &text[..complete]);
        match bad.is_empty() {
            true => Ok(entries),
            false => Err(bad.swap_remove(0)),
        }
    }

    pub(crate) fn append(&self, entry: &JournalEntry) -> Result<(), JournalError> {
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

/// The entries of complete lines, and an error for each line that is not one.
fn parse_lines(path: &Path, text: &str) -> (HashMap<String, JournalEntry>, Vec<JournalError>) {
    let mut entries = HashMap::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<JournalEntry>(line) {
            Ok(entry) => {
                entries.insert(entry.hash.clone(), entry);
            }
            Err(e) => bad.push(JournalError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            }),
        }
    }
    (entries, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(hash: &str) -> JournalEntry {
        JournalEntry {
            hash: hash.to_string(),
            response: ChatResponse {
                text: format!("answer {hash}"),
                model: "m".into(),
                prompt_tokens: 1,
                completion_tokens: 2,
                finish_reason: None,
            },
            attempts: 1,
        }
    }

    #[test]
    fn damaged_lines_are_skipped_and_every_good_answer_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let line = |h: &str| serde_json::to_string(&entry(h)).unwrap();
        // A line of NULs (a crashed filesystem's), a half line followed by a good one, and
        // a torn last line without its newline.
        let text = format!(
            "{}\n\0\0\0\0\n{{\"hash\": \"b\", \"resp\n{}\n{}",
            line("a"),
            line("c"),
            &line("d")[..10]
        );
        std::fs::write(&path, text).unwrap();
        let opened = Journal::open(&path).unwrap();
        let mut hashes: Vec<&String> = opened.entries.keys().collect();
        hashes.sort();
        assert_eq!(hashes, ["a", "c"]);
        assert_eq!(opened.skipped_lines, 2);
        opened.journal.append(&entry("d")).unwrap();
        drop(opened);
        let reopened = Journal::open(&path).unwrap();
        assert_eq!(
            reopened.entries.len(),
            3,
            "the torn line was cut, the new one kept"
        );
        // A recording is read strictly: the damaged line is named.
        let error = Journal::read(&path).unwrap_err().to_string();
        assert!(
            error.contains("journal.jsonl:2: not a journal entry"),
            "{error}"
        );
    }
}
