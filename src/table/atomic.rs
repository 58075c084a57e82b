//! Atomic replacement of a stage's output directory.
//!
//! A stage writes into a staging directory beside its final one. Only when every table and the
//! manifest are complete is the staging directory renamed into place, so a crash or Ctrl-C
//! mid-stage leaves the previous good output (and its manifest) untouched.

use std::path::{Path, PathBuf};

use super::TableError;

const STAGING_PREFIX: &str = ".staging-";
const RETIRED_PREFIX: &str = ".retired-";

pub(crate) struct StagingDir {
    path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// A fresh staging directory for the output directory `target`.
    pub(crate) fn create(target: &Path) -> Result<StagingDir, TableError> {
        let parent = target
            .parent()
            .expect("stage directories live in a workdir");
        let name = target.file_name().expect("stage directory has a name");
        std::fs::create_dir_all(parent).map_err(TableError::io(parent))?;
        let path = parent.join(format!(
            "{STAGING_PREFIX}{}-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(TableError::io(&path))?;
        }
        std::fs::create_dir(&path).map_err(TableError::io(&path))?;
        Ok(StagingDir {
            path,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the staging directory into place, retiring the previous output.
    pub(crate) fn commit(mut self) -> Result<(), TableError> {
        let retired = retired_path(&self.target);
        if self.target.exists() {
            if retired.exists() {
                std::fs::remove_dir_all(&retired).map_err(TableError::io(&retired))?;
            }
            std::fs::rename(&self.target, &retired).map_err(TableError::io(&self.target))?;
        }
        // Between the two renames the target is briefly absent; `recover_interrupted` restores
        // the retired directory if the process dies exactly there.
        std::fs::rename(&self.path, &self.target).map_err(TableError::io(&self.path))?;
        self.committed = true;
        if retired.exists() {
            std::fs::remove_dir_all(&retired).map_err(TableError::io(&retired))?;
        }
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a failed stage leaves no partial output behind.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn retired_path(target: &Path) -> PathBuf {
    let name = target.file_name().expect("stage directory has a name");
    target.with_file_name(format!("{RETIRED_PREFIX}{}", name.to_string_lossy()))
}

/// Cleans up after a process that died mid-stage: removes stale staging directories and puts
/// back an output directory that was retired but not yet replaced.
pub fn recover_interrupted(workdir: &Path) -> Result<(), TableError> {
    let Ok(entries) = std::fs::read_dir(workdir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(TableError::io(workdir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(stage) = name.strip_prefix(RETIRED_PREFIX) {
            let target = workdir.join(stage);
            if target.exists() {
                std::fs::remove_dir_all(&path).map_err(TableError::io(&path))?;
            } else {
                std::fs::rename(&path, &target).map_err(TableError::io(&path))?;
            }
        } else if let Some(rest) = name.strip_prefix(STAGING_PREFIX) {
            // Only directories of dead processes: a concurrent run owns its own.
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                std::fs::remove_dir_all(&path).map_err(TableError::io(&path))?;
            }
        }
    }
    Ok(())
}

/// Replaces the file at `path` with `bytes`, synced: a reader (or a run after a crash) sees the
/// old content or the new, never part of it.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let mut file = std::fs::File::create(&partial)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}
