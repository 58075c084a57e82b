//! Plain values (corpus vectors' floats, token ids) held in memory up to a size, and past it
//! written to an unlinked file and mapped: the OS pages them in as they are read and drops them
//! under memory pressure, so inputs larger than memory can be worked on (MS MARCO's 8.8M x 768
//! floats are 27 GB). `search` reads its corpus front to back once per pass, which suits the
//! page cache, and the few rows its exact pass rescores at random; `train` reads a step's lists
//! at random.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Values whose every bit pattern is valid and which have no padding, so that their bytes can
/// be written to a file and mapped back.
///
/// # Safety
/// Implement only for such types.
pub(crate) unsafe trait Plain: Copy + 'static {}
// SAFETY: 4 bytes, no padding, every bit pattern a value.
unsafe impl Plain for f32 {}
// SAFETY: as f32.
unsafe impl Plain for u32 {}

/// Values as they are appended, then read as one slice.
pub(crate) struct SpillVec<T: Plain> {
    held: Held<T>,
    /// Bytes past which the values go to a file.
    memory_limit: u64,
    /// Where that file is made (and at once unlinked: nothing is left behind, even by a kill).
    spill_dir: PathBuf,
}

enum Held<T> {
    Memory(Vec<T>),
    Spilling {
        file: BufWriter<File>,
        values: usize,
    },
    Mapped(memmap2::Mmap),
}

impl<T: Plain> SpillVec<T> {
    const SIZE: usize = size_of::<T>();

    pub(crate) fn new(memory_limit: u64, spill_dir: &Path) -> SpillVec<T> {
        SpillVec {
            held: Held::Memory(Vec::new()),
            memory_limit,
            spill_dir: spill_dir.to_path_buf(),
        }
    }

    /// Expects `n` more: room for them in memory, or, past the limit, the file at once
    /// (memory never holds the limit's worth first).
    pub(crate) fn reserve(&mut self, n: usize) -> std::io::Result<()> {
        if let Held::Memory(data) = &mut self.held {
            match ((data.len() + n) * Self::SIZE) as u64 <= self.memory_limit {
                true => data.reserve(n),
                false => self.spill()?,
            }
        }
        Ok(())
    }

    pub(crate) fn extend(&mut self, values: &[T]) -> std::io::Result<()> {
        if let Held::Memory(data) = &self.held
            && ((data.len() + values.len()) * Self::SIZE) as u64 > self.memory_limit
        {
            self.spill()?;
        }
        match &mut self.held {
            Held::Memory(data) => data.extend_from_slice(values),
            Held::Spilling { file, values: n } => {
                file.write_all(as_bytes(values))?;
                *n += values.len();
            }
            Held::Mapped(_) => unreachable!("a finished store is not extended"),
        }
        Ok(())
    }

    /// The values appended so far.
    pub(crate) fn len(&self) -> usize {
        match &self.held {
            Held::Memory(data) => data.len(),
            Held::Spilling { values, .. } => *values,
            Held::Mapped(map) => map.len() / Self::SIZE,
        }
    }

    /// Moves the values held so far to the file, where the rest will go.
    fn spill(&mut self) -> std::io::Result<()> {
        let Held::Memory(data) = &self.held else {
            return Ok(());
        };
        let mut file = BufWriter::with_capacity(1 << 20, self.unlinked_file()?);
        file.write_all(as_bytes(data))?;
        let values = data.len();
        self.held = Held::Spilling { file, values };
        Ok(())
    }

    /// The values written, now read-only; those in a file are mapped.
    pub(crate) fn finish(mut self) -> std::io::Result<SpillVec<T>> {
        if let Held::Spilling { file, values } = self.held {
            let file = file
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)?;
            // SAFETY: the file is unlinked and this process alone holds it; nothing writes it
            // while it is mapped.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            debug_assert_eq!(map.len(), values * Self::SIZE);
            self.held = Held::Mapped(map);
        }
        Ok(self)
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match &self.held {
            Held::Memory(data) => data,
            Held::Mapped(map) => {
                // A mapping starts on a page boundary: aligned for any plain value.
                assert_eq!(map.as_ptr().align_offset(align_of::<T>()), 0);
                // SAFETY: aligned, `map.len() / SIZE` whole values, every bit pattern valid
                // (`Plain`), and borrowed no longer than the mapping lives.
                let n = map.len() / Self::SIZE;
                unsafe { std::slice::from_raw_parts(map.as_ptr().cast(), n) }
            }
            Held::Spilling { .. } => unreachable!("read only once finished"),
        }
    }

    /// Bytes of values in the mapped file (0 when they are held in memory).
    pub(crate) fn mapped_bytes(&self) -> u64 {
        match &self.held {
            Held::Mapped(map) => map.len() as u64,
            _ => 0,
        }
    }

    fn unlinked_file(&self) -> std::io::Result<File> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let path = self
            .spill_dir
            .join(format!(".spill-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }
}

/// The values' bytes in native order (the file is read back only by this process).
fn as_bytes<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: a plain value's bytes are valid u8s (no padding); the length covers exactly the
    // same memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the limit the vectors move to a mapped file, whole and in order, and the file is
    /// gone from the directory; under it they stay in memory.
    #[test]
    fn vectors_past_the_limit_are_mapped_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        for (limit, mapped) in [(0, true), (4 * 5_000, true), (4 * 10_000, false)] {
            let mut store = SpillVec::new(limit, dir.path());
            // Told the size at first (a table's rows are known), or not (a filtered input).
            store.reserve(values.len() / 2).unwrap();
            for chunk in values.chunks(768) {
                store.extend(chunk).unwrap();
            }
            let store = store.finish().unwrap();
            assert_eq!(store.as_slice(), &values[..], "limit {limit}");
            assert_eq!(store.mapped_bytes() > 0, mapped, "limit {limit}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
        let empty = SpillVec::<u32>::new(0, dir.path()).finish().unwrap();
        assert!(empty.as_slice().is_empty());
    }
}
