//! One run per work directory: an exclusive `flock` on `WORKDIR/.lock`, held while a run
//! writes. Two runs of one spec would otherwise send every LLM request twice and race on the
//! same staging directories. Readers (`status`, `sql`, `export`, dry runs) take no lock. The
//! kernel drops the lock when the holder exits, however it exits, so a killed run leaves none.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use super::PipelineError;

pub(crate) const LOCK_FILE: &str = ".lock";

/// Held for as long as it lives.
pub(crate) struct WorkdirLock {
    _file: File,
}

impl WorkdirLock {
    /// Takes the lock, or says who holds it; with `wait`, polls until it is free.
    pub(crate) async fn acquire(workdir: &Path, wait: bool) -> Result<WorkdirLock, PipelineError> {
        let path = workdir.join(LOCK_FILE);
        let io = |e: std::io::Error| PipelineError::Io {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(workdir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut announced = false;
        while !try_lock(&file).map_err(io)? {
            if !wait {
                return Err(PipelineError::Locked {
                    path,
                    holder: holder(&mut file),
                });
            }
            if !announced {
                tracing::info!("waiting for the run that holds {}", path.display());
                announced = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Who holds it, for the message a second run prints.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(
            file,
            "pid {} since {}",
            std::process::id(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
        .map_err(io)?;
        Ok(WorkdirLock { _file: file })
    }
}

fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this `File` owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        Some(libc::EINTR) => try_lock(file),
        _ => Err(error),
    }
}

fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
    if text.trim().is_empty() {
        "another run".to_string()
    } else {
        text.trim().to_string()
    }
}
