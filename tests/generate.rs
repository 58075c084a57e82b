//! The `generate` stage against a real HTTP server on 127.0.0.1: answers are parsed into graded
//! passages and rejects, every response is journaled, retries and timeouts behave, nothing is
//! requested twice, and a `kill -9` mid-run loses nothing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::llm_server::{LlmServer, Reply, graded_answer, query_of};
use synthrank::pipeline::Selection;
use synthrank::table::read_batches;

fn rows(path: &Path) -> usize {
    read_batches(path)
        .unwrap()
        .iter()
        .map(arrow::array::RecordBatch::num_rows)
        .sum()
}

/// `n` queries, their all-levels prompts, and a `generate` stage pointed at `url`.
fn pipeline(dir: &Path, n: usize, url: &str, extra: &str) -> PathBuf {
    let queries: String = (0..n)
        .map(|i| format!("{{\"_id\": \"q{i}\", \"text\": \"question number {i}\"}}\n"))
        .collect();
    std::fs::write(dir.join("queries.jsonl"), queries).unwrap();
    std::fs::copy(
        common::repo().join("pipelines/prompts/graded-passages.j2"),
        dir.join("graded.j2"),
    )
    .unwrap();
    common::write_spec(
        dir,
        "p.yaml",
        &format!(
            "name: gen\nworkdir: work\nstages:\n  - name: queries\n    kind: load_queries\n    config: {{path: queries.jsonl}}\n  \
             - name: prompts\n    kind: render_prompts\n    inputs: [queries]\n    config: {{template: graded.j2}}\n  \
             - name: gen\n    kind: generate\n    inputs: [prompts]\n    config:\n      endpoints: [{url}]\n      model: test-model\n      \
             temperature: 0.7\n      backoff_s: 0.01\n{extra}"
        ),
    )
}

#[test]
fn answers_become_graded_docs_and_rejects_and_are_never_requested_twice() {
    let server = LlmServer::start(|r, _| {
        let query = query_of(&r.user());
        // The model forgets level 0 for one query.
        let levels: &[i32] = if query.ends_with(" 2") {
            &[3, 2, 1]
        } else {
            &[3, 2, 1, 0]
        };
        Reply::Answer(graded_answer(&query, levels))
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 4, &server.url, "");
    let work = dir.path().join("work");
    let p = common::load(&spec, &work);
    common::run(&p, Selection::All, false);
    assert_eq!(server.count(), 4);
    assert_eq!(rows(&work.join("gen/generations.parquet")), 4);
    assert_eq!(rows(&work.join("gen/graded_docs.parquet")), 15);
    assert_eq!(rows(&work.join("gen/rejects.parquet")), 1);
    let first = &server.requests()[0].body;
    assert_eq!(first["model"], "test-model");
    assert_eq!(first["temperature"], 0.7);
    assert_eq!(first["messages"][0]["role"], "system");

    // Forced reruns answer from the journal.
    common::run(&p, Selection::Only("gen".into()), true);
    assert_eq!(server.count(), 4, "no request is sent twice");
    assert_eq!(
        common::sql_csv(&spec, "SELECT query_id, level, reason FROM gen.rejects"),
        "query_id,level,reason\nq2,0,level missing from the answer\n"
    );
    let text = common::sql_csv(
        &spec,
        "SELECT doc_id, level, title, text FROM gen.graded_docs WHERE query_id = 'q1' ORDER BY level DESC LIMIT 1",
    );
    assert!(text.starts_with("doc_id,level,title,text\nq1:3:"), "{text}");
    assert!(
        text.ends_with(",3,Level 3,A level-3 passage for: question number 1\n"),
        "{text}"
    );
}

#[test]
fn retries_rate_limits_server_errors_dropped_connections_and_malformed_bodies() {
    let server = LlmServer::start(|r, n| match n {
        0 => Reply::Status(429, "slow down".into(), Some(0)),
        1 => Reply::Status(500, "oops".into(), None),
        2 => Reply::Drop,
        3 => Reply::Malformed,
        _ => Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])),
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 1, &server.url, "      concurrency: 1\n");
    let p = common::load(&spec, &dir.path().join("work"));
    common::run(&p, Selection::All, false);
    assert_eq!(server.count(), 5, "four failures retried, then the answer");
    assert_eq!(rows(&dir.path().join("work/gen/graded_docs.parquet")), 4);
    let manifest =
        synthrank::table::Manifest::read(&dir.path().join("work/gen/_manifest.json")).unwrap();
    assert_eq!(manifest.stats["requests_answered"], 1);
    assert_eq!(manifest.stats["completion_tokens"], 40);
    // 40 tokens over the retries' backoff (well under a minute, more than an instant).
    let rate = manifest.stats["completion_tokens_per_s"].as_f64().unwrap();
    assert!(rate > 40.0 / 60.0 && rate < 40.0 / 1e-3, "rate {rate}");
}

#[test]
fn client_errors_are_not_retried() {
    let server = LlmServer::start(|_, _| Reply::Status(400, "bad model".into(), None));
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 1, &server.url, "");
    let p = common::load(&spec, &dir.path().join("work"));
    let err = common::try_run(&p, Selection::All, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 of 1 requests failed")
            && err.contains("HTTP 400: bad model (after 1 attempts)"),
        "{err}"
    );
    assert_eq!(server.count(), 1);
}

#[test]
fn timeouts_fail_the_stage_but_keep_what_was_answered() {
    let stall = Arc::new(AtomicBool::new(true));
    let flag = stall.clone();
    let server = LlmServer::start(move |r, _| {
        let query = query_of(&r.user());
        let answer = Reply::Answer(graded_answer(&query, &[3, 2, 1, 0]));
        if query.ends_with(" 1") && flag.load(Ordering::SeqCst) {
            Reply::Stall(Duration::from_secs(3), Box::new(answer))
        } else {
            answer
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(
        dir.path(),
        3,
        &server.url,
        "      timeout_s: 0.3\n      max_retries: 1\n",
    );
    let work = dir.path().join("work");
    let p = common::load(&spec, &work);
    let started = Instant::now();
    let err = common::try_run(&p, Selection::All, false)
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timed out promptly"
    );
    assert!(
        err.contains("1 of 3 requests failed; the 2 answered are journaled"),
        "{err}"
    );
    assert!(
        err.contains("timed out after 0.3s (after 2 attempts)"),
        "{err}"
    );
    assert_eq!(
        server.count(),
        4,
        "2 answered + 2 attempts for the stalled one"
    );
    assert!(!work.join("gen").exists(), "a failed stage writes no table");

    stall.store(false, Ordering::SeqCst);
    common::run(&p, Selection::All, false);
    assert_eq!(
        server.count(),
        5,
        "the rerun sends only the unanswered request"
    );
    assert_eq!(rows(&work.join("gen/graded_docs.parquet")), 12);
}

#[test]
fn api_key_comes_from_the_environment_and_is_never_written() {
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(
        dir.path(),
        2,
        &server.url,
        "      api_key_env: SYNTHRANK_TEST_KEY\n",
    );
    let secret = "sk-test-5ecret-do-not-write";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .env_remove("SYNTHRANK_TEST_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out)
            .contains("`api_key_env`: the environment variable `SYNTHRANK_TEST_KEY` is not set")
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .env("SYNTHRANK_TEST_KEY", secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {secret}")))
    );
    assert!(!common::stderr(&out).contains(secret));
    for entry in walk(&dir.path().join("work")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{} holds the key",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn kill_9_mid_run_then_rerun_sends_no_answered_request_again_and_loses_nothing() {
    let server = LlmServer::start(|r, _| {
        Reply::Stall(
            Duration::from_millis(25),
            Box::new(Reply::Answer(graded_answer(
                &query_of(&r.user()),
                &[3, 2, 1, 0],
            ))),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 40, &server.url, "      concurrency: 2\n");
    let journal = dir.path().join("work/.state/gen/journal.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let lines = std::fs::read_to_string(&journal)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 8 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = server.count();
    let journaled: HashSet<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["hash"].as_str().unwrap().to_string())
        .collect();
    assert!(
        journaled.len() >= 8 && journaled.len() < 40,
        "{}",
        journaled.len()
    );

    let out = common::synthrank(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let resent: Vec<String> = server.requests()[before..]
        .iter()
        .map(|r| {
            let req: synthrank::llm::ChatRequest = serde_json::from_value(r.body.clone()).unwrap();
            req.hash()
        })
        .collect();
    assert_eq!(
        resent.len(),
        40 - journaled.len(),
        "exactly the unanswered prompts are sent"
    );
    assert!(
        resent.iter().all(|h| !journaled.contains(h)),
        "an answered prompt was sent again"
    );
    assert_eq!(
        rows(&dir.path().join("work/gen/graded_docs.parquet")),
        160,
        "no row is lost"
    );
}

#[test]
fn per_level_prompts_take_plain_text_answers() {
    let server = LlmServer::start(|r, _| {
        let user = r.user();
        if user.contains("relevance level 0") {
            Reply::Answer("   ".into()) // an empty answer is a reject, not a passage
        } else {
            Reply::Answer(format!("```\nA passage for {}\n```", query_of(&user)))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 2, &server.url, "");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace(
            "config: {template: graded.j2}",
            "config: {template: graded.j2, mode: per_level}",
        ),
    )
    .unwrap();
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    assert_eq!(server.count(), 8);
    assert_eq!(rows(&work.join("gen/graded_docs.parquet")), 6);
    assert_eq!(
        common::sql_csv(
            &spec,
            "SELECT prompt_id, level, reason FROM gen.rejects ORDER BY prompt_id"
        ),
        "prompt_id,level,reason\nq0:0,0,empty answer\nq1:0,0,empty answer\n"
    );
    assert_eq!(
        common::sql_csv(
            &spec,
            "SELECT text FROM gen.graded_docs WHERE prompt_id = 'q1:3'"
        ),
        "text\nA passage for question number 1\n"
    );
}

#[test]
fn requests_per_second_paces_the_requests() {
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(
        dir.path(),
        6,
        &server.url,
        "      requests_per_second: 20\n",
    );
    let p = common::load(&spec, &dir.path().join("work"));
    common::run(&p, Selection::Only("queries".into()), false);
    common::run(&p, Selection::Only("prompts".into()), false);
    common::run(&p, Selection::Only("gen".into()), false);
    assert_eq!(server.count(), 6);
    // Six requests at 20/s span 5 x 50 ms from the first to the last (less 10% for jitter),
    // whatever else the stage spends its time on. One late arrival (the server's thread
    // scheduled late on a loaded machine) shortens the gap after it and lengthens the one
    // before, so the span is checked closely and each gap loosely: two requests let through
    // together still fail it.
    let mut arrivals: Vec<Instant> = server.requests().iter().map(|r| r.at).collect();
    arrivals.sort();
    let span = arrivals[5] - arrivals[0];
    assert!(
        span >= Duration::from_millis(225),
        "six requests within {span:?}"
    );
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(20), "requests {gap:?} apart");
    }
}

#[test]
fn a_recorded_journal_answers_without_asking_and_only_the_rest_is_sent() {
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    // Record answers for three queries in one directory ...
    let recording = tempfile::tempdir().unwrap();
    let spec = pipeline(recording.path(), 3, &server.url, "");
    common::run(
        &common::load(&spec, &recording.path().join("work")),
        Selection::All,
        false,
    );
    assert_eq!(server.count(), 3);
    let journal = recording.path().join("work/.state/gen/journal.jsonl");

    // ... and replay them in another with a fourth query: only that one is requested.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&journal, dir.path().join("recorded.jsonl")).unwrap();
    let spec = pipeline(
        dir.path(),
        4,
        &server.url,
        "      recorded_journal: recorded.jsonl\n",
    );
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    assert_eq!(
        server.count(),
        4,
        "the recorded answers are not requested again"
    );
    assert_eq!(rows(&work.join("gen/generations.parquet")), 4);
    assert_eq!(rows(&work.join("gen/graded_docs.parquet")), 16);
    let manifest = std::fs::read_to_string(work.join("gen/_manifest.json")).unwrap();
    assert!(
        manifest.contains("\"imported_from_recording\": 3"),
        "{manifest}"
    );
    // The recording itself is never modified.
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        std::fs::read(dir.path().join("recorded.jsonl")).unwrap()
    );
}

/// Two runs of one spec at once: the second says who holds the work directory and exits 2
/// without sending anything; with `--wait` it runs after the first, from the journal. Every
/// request reaches the server once.
#[test]
fn a_second_run_of_a_workdir_is_refused_or_waits() {
    let server = LlmServer::start(|r, _| {
        Reply::Stall(
            std::time::Duration::from_millis(1500),
            Box::new(Reply::Answer(graded_answer(
                &query_of(&r.user()),
                &[3, 2, 1, 0],
            ))),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(dir.path(), 3, &server.url, "      concurrency: 1\n");
    let spec_arg = spec.to_str().unwrap().to_string();
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", &spec_arg])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The first run holds the lock once its first request is on the wire.
    let started = std::time::Instant::now();
    while server.count() == 0 {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first run sent nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let refused = common::synthrank(&["run", &spec_arg]);
    assert_eq!(refused.status.code(), Some(2));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("in use by pid") && message.contains("--wait"),
        "{message}"
    );
    // Readers work during the run.
    assert!(common::synthrank(&["status", &spec_arg]).status.success());
    let waited = common::synthrank(&["run", &spec_arg, "--wait"]);
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(server.count(), 3, "every prompt was requested exactly once");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The API key and credentials in an endpoint URL reach the server and nothing else: no
/// table, manifest, journal or log line, even at `SYNTHRANK_LOG=trace`.
#[test]
fn credentials_appear_in_no_table_manifest_journal_or_log() {
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    let (host, path) = server
        .url
        .split_once("://")
        .unwrap()
        .1
        .split_once('/')
        .unwrap();
    let url = format!("http://bob:hunter2pw@{host}/{path}?api-version=1&api_key=qsecret42");
    let spec = pipeline(
        dir.path(),
        2,
        &url,
        "      api_key_env: SYNTHRANK_TEST_KEY\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .env("SYNTHRANK_TEST_KEY", "sk-envsecret-99")
        .env("SYNTHRANK_LOG", "trace")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.count(), 2);
    // Credentials are sent (reqwest signs with the URL's user info when it has one).
    assert!(server.requests()[0].authorization.is_some());
    let status = common::synthrank(&["status", spec.to_str().unwrap()]);
    let mut texts = vec![
        ("stdout".to_string(), out.stdout.clone()),
        ("stderr".to_string(), out.stderr.clone()),
        ("status".to_string(), status.stdout.clone()),
    ];
    let files = files_under(&dir.path().join("work"));
    assert!(files.iter().any(|f| f.ends_with("_manifest.json")));
    assert!(files.iter().any(|f| f.ends_with("journal.jsonl")));
    for file in files {
        texts.push((file.display().to_string(), std::fs::read(&file).unwrap()));
    }
    for (what, bytes) in texts {
        let text = String::from_utf8_lossy(&bytes);
        for secret in ["sk-envsecret-99", "hunter2pw", "qsecret42"] {
            assert!(!text.contains(secret), "{what} contains `{secret}`");
        }
    }
}

/// All-levels prompts ask the server for the parser's JSON (response_format json_schema by
/// default, vLLM's guided_json on request, nothing when off); per-level prompts ask for plain
/// text. The constraint is not part of the request hash: journaled answers are reused.
#[test]
fn all_levels_requests_carry_the_answer_schema() {
    for (setting, key) in [
        ("", Some("response_format")),
        (
            "      structured_output: guided_json\n",
            Some("guided_json"),
        ),
        ("      structured_output: off\n", None),
    ] {
        let server = LlmServer::start(|r, _| {
            Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0]))
        });
        let dir = tempfile::tempdir().unwrap();
        let spec = pipeline(dir.path(), 2, &server.url, setting);
        common::run(
            &common::load(&spec, &dir.path().join("work")),
            Selection::All,
            false,
        );
        let body = &server.requests()[0].body;
        for other in ["response_format", "guided_json"] {
            assert_eq!(
                body.get(other).is_some(),
                Some(other) == key,
                "{setting}: {body}"
            );
        }
        let schema = match key {
            Some("response_format") => &body["response_format"]["json_schema"]["schema"],
            Some(_) => &body["guided_json"],
            None => continue,
        };
        assert_eq!(schema["required"], serde_json::json!(["3", "2", "1", "0"]));
        assert_eq!(
            schema["properties"]["0"]["required"],
            serde_json::json!(["title", "text"])
        );
        // Turning the constraint off later reuses every journaled answer.
        let unconstrained = pipeline(dir.path(), 2, &server.url, "      structured_output: off\n");
        common::run(
            &common::load(&unconstrained, &dir.path().join("work")),
            Selection::All,
            false,
        );
        assert_eq!(server.count(), 2, "{setting}: answers were bought again");
    }
}

/// `max_total_tokens` stops sending once the journal's answers reach it (nothing is bought
/// past the budget but what is in flight); `status` shows tokens and, with prices, the cost;
/// a larger budget then sends only the rest.
#[test]
fn a_token_budget_stops_the_spending_and_status_shows_the_cost() {
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    // Each answer of the test server is 50 prompt + 40 completion tokens.
    let limited = |budget: u64| {
        pipeline(
            dir.path(),
            4,
            &server.url,
            &format!(
                "      concurrency: 1\n      max_total_tokens: {budget}\n      price_per_mtok: {{prompt: 1.0, completion: 2.0}}\n"
            ),
        )
    };
    let spec = limited(200);
    let error = common::run_error(&spec, &dir.path().join("work"));
    assert!(error.contains("max_total_tokens (200)"), "{error}");
    assert_eq!(
        server.count(),
        3,
        "sent while under budget: 0, 90 and 180 tokens spent"
    );
    let status = common::success(&common::synthrank(&["status", spec.to_str().unwrap()]));
    assert!(
        status.contains(
            "3 answered, 1 pending, 1 failed in the last run; 150 prompt + 120 completion tokens ($0.0004); the 1 pending: about 50 prompt + 40 completion tokens ($0.0001)"
        ),
        "{status}"
    );
    // A dry run says what the rest would cost before anything is sent.
    let dry = common::success(&common::synthrank(&[
        "run",
        limited(1000).to_str().unwrap(),
        "--dry-run",
    ]));
    assert!(
        dry.contains("gen (generate): would run")
            && dry.contains("the 1 pending: about 50 prompt + 40 completion tokens ($0.0001)"),
        "{dry}"
    );
    assert_eq!(server.count(), 3, "a dry run sends nothing");
    // The rest, with a report that shows what the generation cost.
    let spec = pipeline(
        dir.path(),
        4,
        &server.url,
        "      concurrency: 1\n      max_total_tokens: 1000\n      price_per_mtok: {prompt: 1.0, completion: 2.0}\n  \
         - name: metrics\n    kind: sql\n    config: {schema: metrics, query: \"SELECT 'all' AS query_id, 'P_1' AS measure, 1.0 AS value\"}\n  \
         - name: report\n    kind: report\n    inputs: {m: metrics, generation: gen.generations}\n",
    );
    common::run(
        &common::load(&spec, &dir.path().join("work")),
        Selection::All,
        false,
    );
    assert_eq!(server.count(), 4, "only the unanswered prompt was sent");
    let report = dir.path().join("work/report");
    let markdown = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(
        markdown.ends_with(
            "| stage | answers | rejects | prompt tokens | completion tokens | cost (USD) |\n\
             |---|---:|---:|---:|---:|---:|\n| generation | 4 | 0 | 200 | 160 | 0.0005 |\n"
        ),
        "{markdown}"
    );
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(
        html.contains("<tr><td>generation</td><td>4</td><td>0</td><td>200</td><td>160</td><td>0.0005</td></tr>"),
        "{html}"
    );
}

/// Results as vLLM's `run_batch` writes them: each request of a batch input file answered by
/// the test server's good model, except those `failing`, which come back as errors.
fn run_batch_offline(input: &Path, output: &Path, failing: &[usize]) -> Vec<String> {
    let mut ids = Vec::new();
    let mut results = String::new();
    for (i, line) in std::fs::read_to_string(input).unwrap().lines().enumerate() {
        let request: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = request["custom_id"].as_str().unwrap().to_string();
        let user = request["body"]["messages"][1]["content"].as_str().unwrap();
        let result = if failing.contains(&i) {
            serde_json::json!({"custom_id": id, "response": null, "error": {"message": "engine died"}})
        } else {
            let body: serde_json::Value = serde_json::from_str(&common::llm_server::completion(
                &graded_answer(&query_of(user), &[3, 2, 1, 0]),
            ))
            .unwrap();
            serde_json::json!({"id": format!("r{i}"), "custom_id": id, "response": {"status_code": 200, "body": body}, "error": null})
        };
        results.push_str(&format!("{result}\n"));
        ids.push(id);
    }
    std::fs::write(output, results).unwrap();
    ids
}

#[test]
fn batch_files_carry_the_requests_out_and_their_answers_back() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens at the endpoint: batch files never touch it.
    let spec = pipeline(
        dir.path(),
        5,
        "http://127.0.0.1:9/v1",
        "      batch_files: {input: batch-in.jsonl, output: batch-out.jsonl}\n",
    );
    let (input, output) = (
        dir.path().join("batch-in.jsonl"),
        dir.path().join("batch-out.jsonl"),
    );
    let run = || common::synthrank(&["run", spec.to_str().unwrap()]);
    let first = run();
    assert_eq!(first.status.code(), Some(1));
    let message = common::stderr(&first);
    assert!(
        message.contains("5 requests wait in") && message.contains("run_batch -i"),
        "{message}"
    );
    let sent = run_batch_offline(&input, &output, &[3]);
    assert_eq!(sent.len(), 5);

    // Four answers come back; the failed one is written out again, alone.
    let second = run();
    assert_eq!(second.status.code(), Some(1));
    let message = common::stderr(&second);
    assert!(
        message.contains("1 requests wait in")
            && message.contains("1 results in the output failed and are asked again")
            && message.contains("engine died"),
        "{message}"
    );
    let again = run_batch_offline(&input, &output, &[]);
    assert_eq!(again, vec![sent[3].clone()]);

    let last = run();
    assert!(last.status.success(), "{}", common::stderr(&last));
    assert_eq!(rows(&dir.path().join("work/gen/graded_docs.parquet")), 20);
    let journal =
        std::fs::read_to_string(dir.path().join("work/.state/gen/journal.jsonl")).unwrap();
    assert_eq!(journal.lines().count(), 5, "each answer journaled once");
}

/// An OpenAI Batch API on the test server: files and batches, each batch answered by the good
/// model once `finish` is set (until then it stays `in_progress`). Files are downloaded in 4
/// pieces, `pause` before each. Each batch created is followed by `others` batches of someone
/// else's, and the list comes newest first in pages of 2 (a server may give fewer than asked).
/// With `lose_first_create`, the connection drops after the first batch is created, before the
/// answer; with `files_unlisted`, a file's description is not found (404), as on servers that
/// only take uploads and serve contents.
#[derive(Default)]
struct BatchServer {
    finish: Arc<AtomicBool>,
    pause: Duration,
    others: usize,
    lose_first_create: bool,
    files_unlisted: bool,
}

fn batch_api_server(config: BatchServer) -> LlmServer {
    let BatchServer {
        finish,
        pause,
        others,
        lose_first_create,
        files_unlisted,
    } = config;
    // Contents, and batches, with their creation times on one clock.
    let files = Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let batches = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let clock = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let ok = |v: serde_json::Value| Reply::Status(200, v.to_string(), None);
    LlmServer::start(move |r, _| {
        let (mut files, mut batches) = (files.lock().unwrap(), batches.lock().unwrap());
        let tick = || clock.fetch_add(1, Ordering::SeqCst) + 1;
        match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/files") => {
                let raw = String::from_utf8_lossy(&r.raw);
                let start = raw.find("application/jsonl\r\n\r\n").unwrap() + 21;
                let end = raw.rfind("\r\n--").unwrap();
                files.push((raw[start..end].to_string(), tick()));
                let (n, created_at) = (files.len() - 1, files[files.len() - 1].1);
                ok(
                    serde_json::json!({"id": format!("file-{n}"), "purpose": "batch", "created_at": created_at}),
                )
            }
            ("GET", path)
                if path.starts_with("/v1/files/file-")
                    && !path.ends_with("/content")
                    && !files_unlisted =>
            {
                let n: usize = path["/v1/files/file-".len()..].parse().unwrap();
                ok(serde_json::json!({"id": format!("file-{n}"), "created_at": files[n].1}))
            }
            ("POST", "/v1/batches") => {
                let ours = batches
                    .iter()
                    .filter(|b| b["input_file_id"] != "elsewhere")
                    .count();
                let batch = serde_json::json!({"id": format!("batch-{ours}"), "status": "in_progress",
                    "input_file_id": r.body["input_file_id"], "created_at": tick(),
                    "request_counts": {"total": 0, "completed": 0, "failed": 0}});
                batches.push(batch.clone());
                for _ in 0..others {
                    let n = batches.len();
                    batches.push(
                        serde_json::json!({"id": format!("other-{n}"), "status": "completed",
                        "input_file_id": "elsewhere", "created_at": tick()}),
                    );
                }
                if lose_first_create && ours == 0 {
                    return Reply::Drop;
                }
                ok(batch)
            }
            ("GET", path) if path.starts_with("/v1/batches?") => {
                let newest_first: Vec<&serde_json::Value> = batches.iter().rev().collect();
                let from = match path.split_once("&after=") {
                    Some((_, after)) => {
                        newest_first.iter().position(|b| b["id"] == after).unwrap() + 1
                    }
                    None => 0,
                };
                let page: Vec<_> = newest_first.iter().skip(from).take(2).collect();
                ok(
                    serde_json::json!({"data": page, "has_more": from + 2 < newest_first.len(),
                    "last_id": page.last().map(|b| b["id"].clone())}),
                )
            }
            ("GET", path) if path.starts_with("/v1/batches/") => {
                let id = &path["/v1/batches/".len()..];
                let batch = batches.iter_mut().find(|b| b["id"] == id).unwrap();
                if finish.load(Ordering::SeqCst) && batch["status"] == "in_progress" {
                    let input: usize = batch["input_file_id"].as_str().unwrap()[5..]
                        .parse()
                        .unwrap();
                    let dir = tempfile::tempdir().unwrap();
                    let (i, o) = (dir.path().join("i"), dir.path().join("o"));
                    std::fs::write(&i, &files[input].0).unwrap();
                    run_batch_offline(&i, &o, &[]);
                    files.push((std::fs::read_to_string(&o).unwrap(), tick()));
                    batch["status"] = "completed".into();
                    batch["output_file_id"] = format!("file-{}", files.len() - 1).into();
                }
                ok(batch.clone())
            }
            ("GET", path) if path.starts_with("/v1/files/") && path.ends_with("/content") => {
                let n: usize = path["/v1/files/file-".len()..path.len() - "/content".len()]
                    .parse()
                    .unwrap();
                Reply::Trickle(pause, files[n].0.clone())
            }
            _ => Reply::Status(404, "{}".to_string(), None),
        }
    })
}

/// The requests of each batch input file uploaded to `server`, in upload order.
fn uploaded_files(server: &LlmServer) -> Vec<usize> {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/files")
        .map(|r| {
            String::from_utf8_lossy(&r.raw)
                .lines()
                .filter(|l| l.starts_with("{\"custom_id\""))
                .count()
        })
        .collect()
}

#[test]
fn a_batch_api_run_killed_mid_poll_resumes_the_same_batches_and_never_submits_twice() {
    let finish = Arc::new(AtomicBool::new(false));
    // Three batches of someone else's after each of ours: the lost one is on the second page.
    // The answer to the first create is lost: the retry finds that batch.
    let server = batch_api_server(BatchServer {
        finish: finish.clone(),
        others: 3,
        lose_first_create: true,
        ..BatchServer::default()
    });
    let dir = tempfile::tempdir().unwrap();
    // 6 requests at most 4 a batch: two batches.
    let spec = pipeline(
        dir.path(),
        6,
        &server.url,
        "      batch_api: {poll_s: 0.02, max_requests: 4}\n",
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synthrank"))
        .args(["run", spec.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let polls = || {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.starts_with("/v1/batches/"))
            .count()
    };
    let started = Instant::now();
    while polls() < 4 {
        assert!(started.elapsed() < Duration::from_secs(30), "no polling");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let status = common::success(&common::synthrank(&["status", spec.to_str().unwrap()]));
    assert!(
        status.contains("0 answered, 6 pending")
            && status.contains("batches batch-0, batch-1 in flight"),
        "{status}"
    );
    // As if the kill had come between creating the second batch and recording its id.
    let state = dir.path().join("work/.state/gen/batch.json");
    let mut recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(recorded["parts"][1]["batch_id"], "batch-1");
    recorded["parts"][1]["batch_id"] = serde_json::Value::Null;
    std::fs::write(&state, recorded.to_string()).unwrap();
    let status = common::success(&common::synthrank(&["status", spec.to_str().unwrap()]));
    assert!(
        status.contains("batch batch-0 in flight")
            && status.contains("file file-1 uploaded, its batch not recorded"),
        "{status}"
    );

    finish.store(true, Ordering::SeqCst);
    let out = common::synthrank(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let count = |method: &str, path: &str| {
        server
            .requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    };
    assert_eq!(uploaded_files(&server), [4, 2], "each batch uploaded once");
    assert_eq!(count("POST", "/v1/batches"), 2, "each submitted once");
    assert!(
        server.requests().iter().any(|r| r.path.contains("&after=")),
        "found past the first page"
    );
    assert_eq!(count("POST", "/v1/chat/completions"), 0);
    assert_eq!(rows(&dir.path().join("work/gen/graded_docs.parquet")), 24);
    assert!(!state.exists(), "no batch left in flight");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("work/.state/gen"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("batch-"))
        .collect();
    assert!(left.is_empty(), "batch files left behind: {left:?}");
    // Fresh: a rerun asks nothing.
    let before = server.count();
    let out = common::synthrank(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(server.count(), before);
}

/// Batches within a byte limit, one in flight at a time: each is submitted only once the one
/// before has been downloaded.
#[test]
fn batch_api_batches_keep_to_the_file_size_and_the_number_in_flight() {
    // The request lines' length, from the same requests written as a batch file.
    let offline = tempfile::tempdir().unwrap();
    let files = "      batch_files: {input: in.jsonl, output: out.jsonl}\n";
    let spec = pipeline(offline.path(), 5, "http://127.0.0.1:9/v1", files);
    assert!(
        !common::synthrank(&["run", spec.to_str().unwrap()])
            .status
            .success()
    );
    let lines = std::fs::read_to_string(offline.path().join("in.jsonl")).unwrap();
    let longest = lines.lines().map(|l| l.len() + 1).max().unwrap();
    // Two of the longest lines fit, three do not.
    let limit = 5 * longest / 2;

    // Files not described: looking for a lost batch reads the list to its end.
    let server = batch_api_server(BatchServer {
        finish: Arc::new(AtomicBool::new(true)),
        files_unlisted: true,
        ..BatchServer::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = pipeline(
        dir.path(),
        5,
        &server.url,
        &format!(
            "      batch_api: {{poll_s: 0.01, max_file_mb: {}, max_in_flight: 1}}\n",
            limit as f64 / 1e6
        ),
    );
    let out = common::synthrank(&["run", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(uploaded_files(&server), [2, 2, 1]);
    for file in server.requests().iter().filter(|r| r.path == "/v1/files") {
        let raw = String::from_utf8_lossy(&file.raw);
        let content: usize = raw
            .lines()
            .filter(|l| l.starts_with("{\"custom_id\""))
            .map(|l| l.len() + 1)
            .sum();
        assert!(content <= limit, "{content} bytes in one batch file");
    }
    // Requests in order: a batch is created only after the one before is downloaded.
    let steps: String = server
        .requests()
        .iter()
        .filter_map(|r| match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/batches") => Some('c'),
            ("GET", path) if path.ends_with("/content") => Some('d'),
            _ => None,
        })
        .collect();
    assert_eq!(steps, "cdcdcd");
    let described = |r: &&common::llm_server::Received| {
        r.path.starts_with("/v1/files/file-") && !r.path.ends_with("/content")
    };
    assert_eq!(server.requests().iter().filter(described).count(), 3);
    assert_eq!(rows(&dir.path().join("work/gen/graded_docs.parquet")), 20);
}

/// A batch's output downloads as long as each piece of it arrives within `timeout_s`, however
/// long the whole takes; a piece that does not is a timeout.
#[test]
fn batch_api_downloads_are_bounded_by_stalls_not_by_their_length() {
    for (pause_ms, succeeds) in [(200, true), (900, false)] {
        let server = batch_api_server(BatchServer {
            finish: Arc::new(AtomicBool::new(true)),
            pause: Duration::from_millis(pause_ms),
            ..BatchServer::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let spec = pipeline(
            dir.path(),
            3,
            &server.url,
            "      timeout_s: 0.5\n      max_retries: 0\n      batch_api: {poll_s: 0.01}\n",
        );
        let started = Instant::now();
        let out = common::synthrank(&["run", spec.to_str().unwrap()]);
        assert_eq!(out.status.success(), succeeds, "{}", common::stderr(&out));
        if succeeds {
            assert!(started.elapsed() > Duration::from_millis(800), "4 pauses");
            assert_eq!(rows(&dir.path().join("work/gen/graded_docs.parquet")), 12);
        } else {
            let error = common::stderr(&out);
            assert!(error.contains("timed out after 0.5s"), "{error}");
        }
    }
}

/// The stage streams its prompts: more than one input batch (8,192 rows) of them, a request
/// repeated across batches sent once, and the tables in prompt order, each prompt with its
/// answer read back from the journal.
#[test]
fn prompts_past_one_input_batch_are_sent_once_each_and_written_in_order() {
    const DISTINCT: usize = 8_300;
    let server =
        LlmServer::start(|r, _| Reply::Answer(graded_answer(&query_of(&r.user()), &[3, 2, 1, 0])));
    let dir = tempfile::tempdir().unwrap();
    let n = DISTINCT + 100;
    let spec = pipeline(dir.path(), n, &server.url, "      concurrency: 64\n");
    // The last 100 queries repeat the first 100 texts: the same requests, in the second batch.
    let queries: String = (0..n)
        .map(|i| {
            format!(
                "{{\"_id\": \"q{i}\", \"text\": \"question number {}\"}}\n",
                i % DISTINCT
            )
        })
        .collect();
    std::fs::write(dir.path().join("queries.jsonl"), queries).unwrap();
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    assert_eq!(server.count(), DISTINCT, "each distinct request sent once");
    let batches = read_batches(&work.join("gen/generations.parquet")).unwrap();
    let column = |batch: &arrow::array::RecordBatch, name: &str| {
        let values = batch.column_by_name(name).unwrap();
        let values = values
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        values
            .iter()
            .map(|v| v.unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let prompts: Vec<String> = batches.iter().flat_map(|b| column(b, "query_id")).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("q{i}")).collect();
    assert_eq!(prompts, expected, "one row per prompt, in prompt order");
    let texts: Vec<String> = batches.iter().flat_map(|b| column(b, "text")).collect();
    assert_eq!(
        texts[DISTINCT + 7],
        texts[7],
        "a repeated request has the same answer"
    );
    assert!(texts[7].contains("question number 7\""), "{}", texts[7]);
    assert_eq!(rows(&work.join("gen/graded_docs.parquet")), 4 * n);
}
