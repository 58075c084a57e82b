//! The train stage survives kill -9: rerunning resumes from the last checkpoint and produces the
//! same weights and train_log as an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn run_to_end(spec: &Path, workdir: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args([
            "run",
            spec.to_str().unwrap(),
            "--workdir",
            workdir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn weights(workdir: &Path) -> String {
    let bytes = std::fs::read(workdir.join("train/model/model.safetensors")).unwrap();
    blake3::hash(&bytes).to_hex().to_string()
}

fn log(workdir: &Path) -> String {
    let out = common::synthrank(&[
        "sql",
        common::repo()
            .join("tests/pipelines/training.yaml")
            .to_str()
            .unwrap(),
        "--workdir",
        workdir.to_str().unwrap(),
        "--format",
        "csv",
        "SELECT step, epoch, loss, lr, grad_norm FROM train.train_log ORDER BY step",
    ]);
    common::success(&out)
}

/// The training run's checkpoints directory.
fn checkpoints(workdir: &Path) -> PathBuf {
    workdir.join(".state/train/checkpoints")
}

/// Starts the pipeline and kills it with SIGKILL as soon as the first checkpoint is complete
/// (step 1 of 6), before the model is written.
fn kill_at_first_checkpoint(spec: &Path, workdir: &Path) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args([
            "run",
            spec.to_str().unwrap(),
            "--workdir",
            workdir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while complete_checkpoints(workdir).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !workdir.join("train/model").exists(),
        "training finished before the kill: the test proves nothing"
    );
}

/// The complete checkpoints' directories (`step-N`, not a half-written `.step-N.partial`),
/// oldest first; none before the first.
fn complete_checkpoints(workdir: &Path) -> Vec<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(checkpoints(workdir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    steps.sort();
    steps
}

/// A counter of the train stage's manifest.
fn stat(workdir: &Path, name: &str) -> u64 {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workdir.join("train/_manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["stats"][name].as_u64().unwrap()
}

fn resumed_from(workdir: &Path) -> u64 {
    stat(workdir, "resumed_from_step")
}

#[test]
fn killed_training_resumes_to_the_same_result() {
    common::demo_model("all-MiniLM-L6-v2");
    let spec = common::repo().join("tests/pipelines/training.yaml");
    let straight = tempfile::tempdir().unwrap();
    run_to_end(&spec, straight.path());

    let crashed = tempfile::tempdir().unwrap();
    kill_at_first_checkpoint(&spec, crashed.path());
    // A checkpoint being written when a kill came (here: a later one, half written) is not
    // mistaken for a complete one.
    let partial = checkpoints(crashed.path()).join(".step-0000000099.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"half a file").unwrap();
    // Resumed with the token ids mapped from a file: where they are kept is not part of the
    // run, and the lists read from the file are the lists held in memory. The spec is written
    // where its relative paths name the same files, spelled as before.
    let repo = common::repo();
    let layout = tempfile::tempdir().unwrap();
    for dir in ["models", "data-samples"] {
        std::os::unix::fs::symlink(repo.join(dir), layout.path().join(dir)).unwrap();
    }
    let pipelines = layout.path().join("tests/pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    let mapped = std::fs::read_to_string(&spec).unwrap().replace(
        "      checkpoint_every: 1\n",
        "      checkpoint_every: 1\n      tokens_in_memory_mb: 0\n",
    );
    let mapped = common::write_spec(&pipelines, "mapped.yaml", &mapped);
    run_to_end(&mapped, crashed.path());
    let resumed = resumed_from(crashed.path());
    assert!(resumed >= 1, "the rerun did not resume");
    assert!(
        stat(crashed.path(), "tokens_mapped_bytes") > 0,
        "ids not mapped"
    );
    assert_eq!(log(crashed.path()), log(straight.path()));
    assert_eq!(weights(crashed.path()), weights(straight.path()));
    // Once the model is committed its checkpoints (three times its size) are gone.
    for work in [straight.path(), crashed.path()] {
        assert!(
            !checkpoints(work).exists(),
            "checkpoints kept after the model was committed in {}",
            work.display()
        );
    }
}

/// A checkpoint belongs to its run: once the base model's weights are replaced under the same
/// path, training starts over instead of resuming the old run's checkpoint.
#[test]
fn a_checkpoint_of_other_base_weights_is_not_resumed() {
    let original = common::demo_model("all-MiniLM-L6-v2");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(&original).unwrap() {
        let path = entry.unwrap().path();
        let target = base.join(path.file_name().unwrap());
        match path.file_name().unwrap() == "model.safetensors" {
            true => std::fs::copy(&path, &target).map(|_| ()).unwrap(),
            false => std::os::unix::fs::symlink(&path, &target).unwrap(),
        }
    }
    let repo = common::repo();
    let text = std::fs::read_to_string(repo.join("tests/pipelines/training.yaml"))
        .unwrap()
        .replace("../../models/all-MiniLM-L6-v2", base.to_str().unwrap())
        .replace("../../", &format!("{}/", repo.display()));
    let spec = common::write_spec(dir.path(), "p.yaml", &text);
    let work = dir.path().join("work");
    kill_at_first_checkpoint(&spec, &work);
    // Other weights of the same shapes, under the same path: the checkpoint's own.
    std::fs::copy(
        complete_checkpoints(&work)
            .last()
            .expect("a complete checkpoint")
            .join("model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    run_to_end(&spec, &work);
    assert_eq!(
        resumed_from(&work),
        0,
        "resumed a checkpoint of other weights"
    );
}
