//! The train stage survives kill -9: rerunning resumes from the last checkpoint and produces the
//! same weights and train_log as an uninterrupted run.

mod common;

use std::path::Path;
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn killed_training_resumes_to_the_same_result() {
    common::demo_model("all-MiniLM-L6-v2");
    let spec = common::repo().join("tests/pipelines/training.yaml");
    let straight = tempfile::tempdir().unwrap();
    run_to_end(&spec, straight.path());

    let crashed = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args([
            "run",
            spec.to_str().unwrap(),
            "--workdir",
            crashed.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the first checkpoint exists (step 1 of 6).
    let state = crashed
        .path()
        .join(".state/train/checkpoint/trainer_state.json");
    let started = Instant::now();
    while !state.exists() {
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
        !crashed.path().join("train/model").exists(),
        "training finished before the kill: the test proves nothing"
    );
    run_to_end(&spec, crashed.path());
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crashed.path().join("train/_manifest.json")).unwrap(),
    )
    .unwrap();
    let resumed = manifest["stats"]["resumed_from_step"].as_u64().unwrap();
    assert!(resumed >= 1, "the rerun did not resume: {manifest}");
    assert_eq!(log(crashed.path()), log(straight.path()));
    assert_eq!(weights(crashed.path()), weights(straight.path()));
}
