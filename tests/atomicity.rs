//! A stage that fails or is killed mid-write leaves the previous table in place and readable,
//! and the stage stale.

mod common;

use std::time::{Duration, Instant};

use synthrank::pipeline::{Selection, StageState};
use synthrank::table::{MANIFEST_FILE, Manifest, read_batches};

fn rows(path: &std::path::Path) -> usize {
    read_batches(path)
        .unwrap()
        .iter()
        .map(arrow::array::RecordBatch::num_rows)
        .sum()
}

fn queries_spec(dir: &std::path::Path) -> std::path::PathBuf {
    common::write_spec(
        dir,
        "p.yaml",
        "name: p\nworkdir: work\nstages:\n  - name: q\n    kind: load_queries\n    config: {path: q.tsv, format: tsv}\n",
    )
}

#[test]
fn failure_mid_write_keeps_the_old_table() {
    let dir = tempfile::tempdir().unwrap();
    let spec = queries_spec(dir.path());
    let good: String = (0..10).map(|i| format!("{i}\tquery {i}\n")).collect();
    std::fs::write(dir.path().join("q.tsv"), &good).unwrap();
    let pipeline = common::load(&spec, &dir.path().join("work"));
    common::run(&pipeline, Selection::All, false);
    let table = dir.path().join("work/q/queries.parquet");
    let manifest_before =
        std::fs::read_to_string(dir.path().join("work/q").join(MANIFEST_FILE)).unwrap();

    // 20,000 good rows (several batches are written) and then a malformed line.
    let mut bad: String = (0..20_000).map(|i| format!("{i}\tquery {i}\n")).collect();
    bad.push_str("20000 has no tab\n");
    std::fs::write(dir.path().join("q.tsv"), &bad).unwrap();
    let err = common::try_run(&pipeline, Selection::All, false)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("stage `q` failed: "), "{err}");
    assert!(
        err.ends_with("q.tsv:20001: expected 2 tab-separated fields, found 1"),
        "{err}"
    );

    assert_eq!(rows(&table), 10, "the previous table is intact");
    let manifest_after =
        std::fs::read_to_string(dir.path().join("work/q").join(MANIFEST_FILE)).unwrap();
    assert_eq!(manifest_before, manifest_after);
    let state = pipeline
        .assess(pipeline.stage("q").unwrap(), &[])
        .unwrap()
        .state;
    assert!(
        matches!(&state, StageState::Stale(r) if r[0].ends_with("q.tsv` changed")),
        "{state:?}"
    );
    // The run's lock file stays (empty of meaning once the run ends); nothing else may.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".lock")
        .collect();
    assert_eq!(
        leftovers,
        vec!["q".to_string()],
        "no staging directory is left behind"
    );
}

#[test]
fn killed_process_leaves_the_old_table_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        "name: p\nworkdir: work\nstages:\n  - name: numbers\n    kind: sql\n    config: {query: 'SELECT 1 AS n'}\n",
    );
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    let manifest = Manifest::read(&work.join("numbers").join(MANIFEST_FILE)).unwrap();

    // A query slow enough to be killed while its stage is writing.
    let slow = "SELECT sum(value % 7) AS n FROM generate_series(1, 4000000000)";
    std::fs::write(&spec, format!("name: p\nworkdir: work\nstages:\n  - name: numbers\n    kind: sql\n    config: {{query: '{slow}'}}\n")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let staging = loop {
        let found = std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".staging-")
            });
        if let Some(path) = found {
            break path;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the stage never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap(); // SIGKILL: no destructor, no handler runs
    child.wait().unwrap();

    assert!(
        staging.exists(),
        "the dead run's staging directory is still there"
    );
    assert_eq!(rows(&work.join("numbers/result.parquet")), 1);
    let after = Manifest::read(&work.join("numbers").join(MANIFEST_FILE)).unwrap();
    assert_eq!(after.fingerprint, manifest.fingerprint);

    // The next invocation cleans up and still sees the stage as stale (its config changed).
    let pipeline = common::load(&spec, &work);
    let options = synthrank::pipeline::RunOptions {
        selection: Selection::All,
        force: false,
        dry_run: true,
        wait_for_lock: false,
    };
    common::runtime()
        .block_on(pipeline.run(&options, &mut std::io::sink()))
        .unwrap();
    assert!(!staging.exists());
    assert!(matches!(
        pipeline
            .assess(pipeline.stage("numbers").unwrap(), &[])
            .unwrap()
            .state,
        StageState::Stale(_)
    ));
}

#[test]
fn output_retired_but_not_replaced_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let spec = queries_spec(dir.path());
    std::fs::write(dir.path().join("q.tsv"), "1\tone\n2\ttwo\n").unwrap();
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    // As if the process died between retiring the old output and renaming the new one in.
    std::fs::rename(work.join("q"), work.join(".retired-q")).unwrap();
    synthrank::table::recover_interrupted(&work).unwrap();
    assert_eq!(rows(&work.join("q/queries.parquet")), 2);
    assert_eq!(
        pipeline
            .assess(pipeline.stage("q").unwrap(), &[])
            .unwrap()
            .state,
        StageState::Fresh
    );
}
