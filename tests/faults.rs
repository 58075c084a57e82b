//! Fault injection: SIGKILL at a seeded random moment inside every stage kind, and a full disk
//! (writes past a file-size limit fail with EFBIG, as on a full filesystem). After each fault
//! every table built before it is still readable and unchanged, no answer in the LLM journal is
//! requested again, and a rerun ends with exactly the tables of an undisturbed run.
//! `SYNTHRANK_FAULT_TRIALS=N` kills N times per stage kind (default 1).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::llm_server::{LlmServer, Reply, graded_answer, query_of};
use rand::{Rng, SeedableRng};

/// One stage of every kind: load, SQL, prompts and generation (a local server), lists,
/// tokens, training with checkpoints, embedding, search, evaluation, report.
const STAGES: &[&str] = &[
    "corpus",
    "queries",
    "qrels",
    "prompts",
    "generated",
    "graded",
    "lists",
    "tokens",
    "train",
    "vectors",
    "query_vectors",
    "run",
    "metrics",
    "report",
];

fn spec(dir: &Path, url: &str) -> PathBuf {
    common::tiny_dataset(&dir.join("data"));
    std::fs::copy(
        common::repo().join("pipelines/prompts/graded-passages.j2"),
        dir.join("graded.j2"),
    )
    .unwrap();
    let model = common::demo_model("all-MiniLM-L6-v2");
    let model = model.display();
    common::write_spec(
        dir,
        "p.yaml",
        &format!(
            r#"name: faults
stages:
  - {{name: corpus, kind: load_corpus, config: {{path: data}}}}
  - {{name: queries, kind: load_queries, config: {{path: data, split: test}}}}
  - {{name: qrels, kind: load_qrels, inputs: [queries, corpus], config: {{path: data, split: test}}}}
  - {{name: prompts, kind: render_prompts, inputs: [queries], config: {{template: graded.j2}}}}
  - name: generated
    kind: generate
    inputs: [prompts]
    config: {{endpoints: ["{url}"], model: m, concurrency: 1, backoff_s: 0.01}}
  - name: graded
    kind: sql
    inputs: {{docs: generated.graded_docs}}
    config: {{query: "SELECT * FROM docs", schema: graded_docs}}
  - name: lists
    kind: assemble
    inputs: {{graded: graded}}
    config: {{group_size: 4, sources: [{{input: graded}}], seed: 3}}
  - name: tokens
    kind: tokenize
    inputs: {{groups: lists, queries: queries}}
    config: {{model: {model}, max_query_len: 16, max_passage_len: 32}}
  - name: train
    kind: train
    inputs: [tokens]
    config: {{model: {model}, batch_size: 2, lr: 5.0e-5, seed: 5, checkpoint_every: 1}}
  - name: vectors
    kind: embed
    inputs: {{corpus: corpus, model: train.model}}
    config: {{max_length: 32}}
  - name: query_vectors
    kind: embed
    inputs: {{queries: queries, model: train.model}}
    config: {{max_length: 16}}
  - {{name: run, kind: search, inputs: {{queries: query_vectors, corpus: vectors}}, config: {{k: 5}}}}
  - {{name: metrics, kind: evaluate, inputs: {{runs: run, qrels: qrels}}}}
  - {{name: report, kind: report, inputs: {{trained: metrics}}}}
"#
        ),
    )
}

fn server() -> LlmServer {
    LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])))
}

fn run_command(spec: &Path, work: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_synthrank"));
    command
        .args(["run", spec.to_str().unwrap(), "--workdir"])
        .arg(work);
    command
}

/// Every table of every built stage, by `stage.table`, with its content hash; each one is
/// read back whole (a torn table fails here). The training log's hash is left out: it records
/// each step's throughput, which no two runs share.
fn tables(work: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stage in STAGES {
        let Ok(text) = std::fs::read_to_string(work.join(stage).join("_manifest.json")) else {
            continue;
        };
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (name, table) in manifest["tables"].as_object().unwrap() {
            let path = work.join(stage).join(format!("{name}.parquet"));
            synthrank::table::read_batches(&path)
                .unwrap_or_else(|e| panic!("{stage}.{name} is unreadable: {e}"));
            if *stage == "train" && name == "train_log" {
                continue;
            }
            out.insert(
                format!("{stage}.{name}"),
                table["hash"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

/// Answers in the generation journal (a torn last line does not count).
fn journaled(work: &Path) -> usize {
    std::fs::read_to_string(work.join(".state/generated/journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count()
}

/// Seconds each stage took in an undisturbed run.
fn durations(work: &Path) -> BTreeMap<String, f64> {
    STAGES
        .iter()
        .map(|stage| {
            let text = std::fs::read_to_string(work.join(stage).join("_manifest.json")).unwrap();
            let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
            (stage.to_string(), manifest["duration_s"].as_f64().unwrap())
        })
        .collect()
}

/// The rest of the run after a fault: it finishes, sends only what the journal lacks, and
/// ends with the undisturbed run's tables; the tables that existed before are unchanged.
fn recover(
    spec: &Path,
    work: &Path,
    server: &LlmServer,
    expected: &BTreeMap<String, String>,
    prompts: usize,
) {
    let before = tables(work);
    for (table, hash) in &before {
        if let Some(expected_hash) = expected.get(table) {
            assert_eq!(hash, expected_hash, "{table} changed under the fault");
        }
    }
    let (sent, answered) = (server.count(), journaled(work));
    let out = run_command(spec, work).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        server.count() - sent,
        prompts - answered,
        "{}: the rerun sends exactly the prompts without a journaled answer",
        work.display()
    );
    assert_eq!(
        &tables(work),
        expected,
        "the rerun ends with the undisturbed tables"
    );
}

/// Writes past `limit` bytes fail in the child (EFBIG with SIGXFSZ ignored), as on a full disk.
fn limit_file_size(command: &mut Command, limit: u64) {
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs in the child.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn sigkill_in_every_stage_kind_and_a_full_disk_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server();
    let spec = spec(dir.path(), &server.url);
    let reference = dir.path().join("reference");
    let out = run_command(&spec, &reference).output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let expected = tables(&reference);
    let prompts = server.count();
    assert_eq!(expected.len(), 17, "{expected:?}");
    let durations = durations(&reference);

    let trials: usize = std::env::var("SYNTHRANK_FAULT_TRIALS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut killed_in = Vec::new();
    for trial in 0..trials {
        for stage in STAGES {
            let work = dir.path().join(format!("kill-{stage}-{trial}"));
            let mut child = run_command(&spec, &work)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The stage has started when the run says so; the kill lands within its
            // undisturbed duration.
            let started = format!("{stage} (");
            let stderr = BufReader::new(child.stderr.take().unwrap());
            let mut lines = stderr.lines();
            assert!(
                lines
                    .by_ref()
                    .map_while(Result::ok)
                    .any(|l| l.starts_with(&started) && l.contains("running")),
                "stage {stage} never started"
            );
            let at = rng.random::<f64>() * durations[*stage];
            std::thread::sleep(Duration::from_secs_f64(at));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            killed_in.push(match status.code() {
                None => format!("{stage}@{at:.2}s"),
                Some(_) => format!("{stage}@{at:.2}s (finished first)"),
            });
            recover(&spec, &work, &server, &expected, prompts);
            // Each trial's workdir holds a model and its ONNX exports: bound the disk used.
            std::fs::remove_dir_all(&work).unwrap();
        }
    }
    eprintln!("killed in: {}", killed_in.join(", "));

    // A full disk: any write past the limit fails (EFBIG with SIGXFSZ ignored), the first
    // time a file grows past it: a table (4 KiB) or the model and checkpoints (1 MiB).
    for limit in [4_096u64, 1 << 20] {
        let work = dir.path().join(format!("full-{limit}"));
        let mut command = run_command(&spec, &work);
        limit_file_size(&mut command, limit);
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", common::stderr(&out));
        assert!(
            common::stderr(&out).contains("File too large"),
            "{}",
            common::stderr(&out)
        );
        recover(&spec, &work, &server, &expected, prompts);
        std::fs::remove_dir_all(&work).unwrap();
    }
}

/// A search whose corpus vectors go to a file on a full disk fails naming its state directory,
/// leaves no file there, and its rerun writes the run.
#[test]
fn a_full_disk_under_a_mapped_corpus_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &format!(
            "name: mapped\nstages:\n{}{}",
            common::generated_embedding_stages(20_000, 10),
            r#"  - name: run
    kind: search
    inputs: {queries: queries, corpus: docs}
    config: {k: 5, corpus_in_memory_mb: 0}
"#
        ),
    );
    let work = dir.path().join("work");
    for stage in ["docs", "queries"] {
        let out = run_command(&spec, &work)
            .args(["--only", stage])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    // 640,000 bytes of vectors against a 64 KiB limit.
    let mut command = run_command(&spec, &work);
    limit_file_size(&mut command, 64 << 10);
    let out = command.args(["--only", "run"]).output().unwrap();
    let stderr = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let state = work.join(".state/run");
    assert!(
        stderr.contains("File too large") && stderr.contains(&state.display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    assert!(!work.join("run/_manifest.json").exists());
    let out = run_command(&spec, &work)
        .args(["--only", "run"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(work.join("run/_manifest.json").exists());
}
