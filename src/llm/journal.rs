//! The response journal: one JSON line per answered request, appended as each response
//! arrives, keyed by the request's hash. Reopening it indexes which requests need no resending
//! and where their answers lie ([`JournalIndex`]): memory per request, not per answer's text,
//! whatever the journal's size; answers are read back by place when the tables are written.
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
use super::json_lines::{JsonLines, read_at};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub hash: String,
    pub response: ChatResponse,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
}

/// Where an answer lies in the journal, and the tokens it cost: what is kept of it in memory
/// (the answers themselves are read back when the tables are written).
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    offset: u64,
    len: usize,
    pub tokens: u64,
}

impl Answered {
    /// `entry`, found in its journal at `offset`, `len` bytes long (without the newline).
    fn at(entry: &JournalEntry, offset: u64, len: usize) -> Answered {
        Answered {
            offset,
            len,
            tokens: entry.response.prompt_tokens + entry.response.completion_tokens,
        }
    }
}

/// The answers a journal holds, by request hash.
#[derive(Debug, Default)]
pub struct JournalIndex {
    answers: HashMap<String, Answered>,
    tokens: u64,
}

impl JournalIndex {
    pub fn get(&self, hash: &str) -> Option<Answered> {
        self.answers.get(hash).copied()
    }

    pub fn contains(&self, hash: &str) -> bool {
        self.answers.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Prompt and completion tokens of every answer held.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Records an answer; a later line for the same request replaces an earlier one.
    pub fn insert(&mut self, hash: String, answered: Answered) {
        self.tokens += answered.tokens;
        if let Some(replaced) = self.answers.insert(hash, answered) {
            self.tokens -= replaced.tokens;
        }
    }
}

pub struct Journal {
    path: PathBuf,
    /// Opened to append and to read back answers at their places (`pread` ignores the
    /// append mode's position).
    file: File,
    /// Held while a line is written, so each line's place is known.
    writing: Mutex<()>,
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
    pub index: JournalIndex,
    /// Lines that were not entries, skipped.
    pub skipped_lines: usize,
}

fn corrupt(path: &Path, line: usize, e: &serde_json::Error) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    /// Opens (or creates) the journal and indexes the entries it already holds, one line in
    /// memory at a time.
    pub fn open(path: &Path) -> Result<OpenedJournal, JournalError> {
        let io = io_error(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(&io)?;
        }
        let mut index = JournalIndex::default();
        let mut skipped_lines = 0;
        if path.exists() {
            for line in JsonLines::<JournalEntry>::open(path).map_err(&io)? {
                let line = line.map_err(&io)?;
                if !line.complete {
                    // A line torn by a crash mid-write: drop it, its request will be sent again.
                    let file = OpenOptions::new().write(true).open(path).map_err(&io)?;
                    file.set_len(line.offset).map_err(&io)?;
                    break;
                }
                match line.value {
                    Ok(entry) => {
                        let answered = Answered::at(&entry, line.offset, line.len);
                        index.insert(entry.hash, answered);
                    }
                    Err(e) => {
                        let error = corrupt(path, line.number, &e);
                        tracing::warn!("skipping a damaged journal line: {error}");
                        skipped_lines += 1;
                    }
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(&io)?;
        Ok(OpenedJournal {
            journal: Journal {
                path: path.to_path_buf(),
                file,
                writing: Mutex::new(()),
            },
            index,
            skipped_lines,
        })
    }

    /// The entries of a journal file, read only and one at a time (a recorded journal shipped
    /// with a pipeline): strict, since a damaged recording is the user's to repair. A torn last
    /// line is left out.
    pub fn entries(
        path: &Path,
    ) -> Result<impl Iterator<Item = Result<JournalEntry, JournalError>>, JournalError> {
        let lines = JsonLines::<JournalEntry>::open(path).map_err(io_error(path))?;
        let path = path.to_path_buf();
        Ok(lines
            .filter(|line| line.as_ref().map_or(true, |l| l.complete))
            .map(move |line| {
                let line = line.map_err(io_error(&path))?;
                line.value.map_err(|e| corrupt(&path, line.number, &e))
            }))
    }

    /// Appends one entry; returns where it lies.
    pub(crate) fn append(&self, entry: &JournalEntry) -> Result<Answered, JournalError> {
        let mut line = serde_json::to_vec(entry).expect("entries serialize");
        line.push(b'\n');
        let io = io_error(&self.path);
        let _writing = self.writing.lock().expect("journal lock");
        // The end as the file has it, not as counted: a failed write may have left part of a
        // line behind (skipped as damaged when the journal is next opened).
        let offset = self.file.metadata().map_err(&io)?.len();
        (&self.file).write_all(&line).map_err(&io)?;
        Ok(Answered::at(entry, offset, line.len() - 1))
    }

    /// The entry at `answered` (from this journal's index).
    pub fn entry(&self, answered: Answered) -> Result<JournalEntry, JournalError> {
        read_at(&self.file, answered.offset, answered.len).map_err(io_error(&self.path))
    }

    pub fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(io_error(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
        let (journal, index) = (opened.journal, opened.index);
        assert_eq!(index.len(), 2);
        assert_eq!(index.tokens(), 6);
        for hash in ["a", "c"] {
            let read = journal.entry(index.get(hash).unwrap()).unwrap();
            assert_eq!(read, entry(hash));
        }
        assert_eq!(opened.skipped_lines, 2);
        let appended = journal.append(&entry("d")).unwrap();
        assert_eq!(journal.entry(appended).unwrap(), entry("d"));
        drop(journal);
        let reopened = Journal::open(&path).unwrap();
        assert_eq!(
            reopened.index.len(),
            3,
            "the torn line was cut, the new one kept"
        );
        // A recording is read strictly: the damaged line is named.
        let error = Journal::entries(&path)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("journal.jsonl:2: not a journal entry"),
            "{error}"
        );
    }

    #[test]
    fn a_later_answer_to_the_same_request_replaces_the_earlier_and_its_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let opened = Journal::open(&path).unwrap();
        let (journal, mut index) = (opened.journal, opened.index);
        let mut later = entry("a");
        later.response.text = "a second answer".into();
        later.response.completion_tokens = 10;
        for e in [entry("a"), entry("b"), later.clone()] {
            let place = journal.append(&e).unwrap();
            index.insert(e.hash, place);
        }
        assert_eq!((index.len(), index.tokens()), (2, 3 + 11));
        assert_eq!(journal.entry(index.get("a").unwrap()).unwrap(), later);
        drop(journal);
        let reopened = Journal::open(&path).unwrap();
        assert_eq!((reopened.index.len(), reopened.index.tokens()), (2, 14));
        let place = reopened.index.get("a").unwrap();
        assert_eq!(reopened.journal.entry(place).unwrap(), later);
    }
}
