//! JSONL files read one line at a time, each line with its place in the file: journals and
//! batch results of any size are read in the memory of one line, and an answer found in one
//! can be read again later by its place alone.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::marker::PhantomData;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A line of a JSONL file, parsed as `T`.
pub(crate) struct JsonLine<T> {
    /// 1-based, counting blank lines.
    pub number: usize,
    /// The byte its text starts at.
    pub offset: u64,
    /// Its bytes, without the newline.
    pub len: usize,
    /// False for a last line without its newline (torn by a crash mid-write).
    pub complete: bool,
    pub value: Result<T, serde_json::Error>,
}

/// The non-blank lines of a file, in order.
pub(crate) struct JsonLines<T> {
    reader: BufReader<File>,
    offset: u64,
    number: usize,
    buf: Vec<u8>,
    parsed: PhantomData<T>,
}

impl<T: DeserializeOwned> JsonLines<T> {
    pub fn open(path: &Path) -> std::io::Result<JsonLines<T>> {
        Ok(JsonLines {
            reader: BufReader::with_capacity(1 << 20, File::open(path)?),
            offset: 0,
            number: 0,
            buf: Vec::new(),
            parsed: PhantomData,
        })
    }
}

impl<T: DeserializeOwned> Iterator for JsonLines<T> {
    type Item = std::io::Result<JsonLine<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            let read = match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(read) => read,
                Err(e) => return Some(Err(e)),
            };
            let offset = self.offset;
            self.offset += read as u64;
            self.number += 1;
            let complete = self.buf.last() == Some(&b'\n');
            let text = &self.buf[..read - usize::from(complete)];
            if complete && text.trim_ascii().is_empty() {
                continue;
            }
            // Bytes, not a string: a damaged line may not even be UTF-8.
            return Some(Ok(JsonLine {
                number: self.number,
                offset,
                len: text.len(),
                complete,
                value: serde_json::from_slice(text),
            }));
        }
    }
}

/// The value of the line at `offset`, `len` bytes long (a place [`JsonLines`] reported).
pub(crate) fn read_at<T: DeserializeOwned>(
    file: &File,
    offset: u64,
    len: usize,
) -> std::io::Result<T> {
    let mut bytes = vec![0; len];
    read_exact_at(file, &mut bytes, offset)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// A positioned read: a journal is read back while it is open to append, and its appends land
/// at the end wherever a read left the cursor.
#[cfg(unix)]
fn read_exact_at(file: &File, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, bytes, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut bytes: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, bytes, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                bytes = &mut bytes[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_report_their_places_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "[1]\n\n  \n[22, 3]\nnot json\n[4").unwrap();
        let lines: Vec<JsonLine<Vec<u32>>> = JsonLines::open(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let summary: Vec<_> = lines
            .iter()
            .map(|l| (l.number, l.offset, l.len, l.complete, l.value.is_ok()))
            .collect();
        assert_eq!(
            summary,
            [
                (1, 0, 3, true, true),
                (4, 8, 7, true, true),
                (5, 16, 8, true, false),
                (6, 25, 2, false, false),
            ]
        );
        let file = File::open(&path).unwrap();
        let again: Vec<u32> = read_at(&file, lines[1].offset, lines[1].len).unwrap();
        assert_eq!(again, [22, 3]);
    }
}
