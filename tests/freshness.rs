//! Fingerprints decide what runs: nothing when nothing changed, exactly the changed stage and
//! what depends on it otherwise.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use synthrank::pipeline::{RunOptions, Selection, StageState};

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(std::string::ToString::to_string).collect()
}

fn ran(summary: &synthrank::pipeline::RunSummary) -> BTreeSet<String> {
    summary.ran.iter().cloned().collect()
}

const ALL: &[&str] = &[
    "corpus",
    "queries",
    "qrels",
    "judged_queries",
    "prompts",
    "level_prompts",
    "judged_docs",
    "prompt_counts",
];

#[test]
fn unchanged_pipeline_reruns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    assert_eq!(
        ran(&common::run(&pipeline, Selection::All, false)),
        set(ALL)
    );
    let again = common::run(&pipeline, Selection::All, false);
    assert!(again.ran.is_empty(), "reran {:?}", again.ran);
    assert_eq!(again.skipped_fresh.len(), 8);
    for a in pipeline.assess_all().unwrap() {
        assert_eq!(a.state, StageState::Fresh, "{}", a.stage);
    }
}

#[test]
fn config_edit_reruns_the_stage_and_its_downstream_only() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);

    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("levels: [3, 0]", "levels: [3, 1, 0]")).unwrap();
    let pipeline = common::load(&spec, &work);
    let states = pipeline.assess_all().unwrap();
    let level = states.iter().find(|a| a.stage == "level_prompts").unwrap();
    assert_eq!(
        level.state,
        StageState::Stale(vec!["config changed (levels)".to_string()])
    );
    let counts = states.iter().find(|a| a.stage == "prompt_counts").unwrap();
    assert_eq!(
        counts.state,
        StageState::Stale(vec!["upstream `level_prompts` is stale".to_string()])
    );

    let summary = common::run(&pipeline, Selection::All, false);
    assert_eq!(ran(&summary), set(&["level_prompts", "prompt_counts"]));
}

#[test]
fn edited_template_file_makes_its_stages_stale() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    let template = dir.path().join("graded.j2");
    let text = std::fs::read_to_string(&template).unwrap();
    std::fs::write(
        &template,
        text.replace("realistic passages", "realistic, varied passages"),
    )
    .unwrap();
    let pipeline = common::load(&spec, &work);
    let prompts = pipeline
        .assess(pipeline.stage("prompts").unwrap(), &[])
        .unwrap();
    match prompts.state {
        StageState::Stale(reasons) => assert!(
            reasons[0].starts_with("file `") && reasons[0].ends_with("graded.j2` changed"),
            "{reasons:?}"
        ),
        other => panic!("{other:?}"),
    }
    let summary = common::run(&pipeline, Selection::All, false);
    assert_eq!(
        ran(&summary),
        set(&["prompts", "level_prompts", "prompt_counts"])
    );
}

#[test]
fn touching_an_input_file_without_changing_it_reruns_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    let corpus = dir.path().join("data/corpus.jsonl");
    let bytes = std::fs::read(&corpus).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&corpus, bytes).unwrap(); // new mtime, same content
    assert!(common::run(&pipeline, Selection::All, false).ran.is_empty());
}

/// A stage that reruns (its config changed) but writes the same table stops the wave: the
/// stages downstream of it stay fresh in the same run. (Forcing would run them regardless, so
/// nothing here is forced.)
#[test]
fn identical_new_output_stops_the_wave() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    let text = std::fs::read_to_string(&spec).unwrap();
    let same_rows = text.replace(
        "WHERE query_id IN (SELECT query_id FROM qrels)",
        "WHERE query_id IN (SELECT query_id FROM qrels) -- the same rows",
    );
    assert_ne!(text, same_rows);
    std::fs::write(&spec, same_rows).unwrap();
    let summary = common::run(&common::load(&spec, &work), Selection::All, false);
    assert_eq!(summary.ran, ["judged_queries"]);
    for stage in ["prompts", "level_prompts", "prompt_counts"] {
        assert!(
            summary.skipped_fresh.contains(&stage.to_string()),
            "{stage}"
        );
    }
}

#[test]
fn only_and_from_select_stages() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    let err = common::try_run(&pipeline, Selection::Only("prompts".into()), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage `prompts` needs input `judged_queries`, which has not been built: run stage `judged_queries` first"
    );
    common::run(&pipeline, Selection::All, false);
    let only = common::run(&pipeline, Selection::Only("prompts".into()), true);
    assert_eq!(ran(&only), set(&["prompts"]));
    let from = common::run(&pipeline, Selection::From("judged_queries".into()), true);
    assert_eq!(
        ran(&from),
        set(&[
            "judged_queries",
            "prompts",
            "level_prompts",
            "prompt_counts"
        ])
    );
}

#[test]
fn dry_run_says_what_and_why_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    let mut log = Vec::new();
    let options = RunOptions {
        selection: Selection::All,
        force: false,
        dry_run: true,
        wait_for_lock: false,
    };
    let summary = common::runtime()
        .block_on(pipeline.run(&options, &mut log))
        .unwrap();
    assert!(summary.ran.is_empty());
    assert!(!work.join("corpus").exists());
    let log = String::from_utf8(log).unwrap();
    assert!(
        log.contains("corpus (load_corpus): would run — missing"),
        "{log}"
    );
    assert!(
        log.contains("prompt_counts (sql): would run — missing"),
        "{log}"
    );

    common::run(&pipeline, Selection::All, false);
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace(
            "{path: data, split: test}",
            "{path: data, split: test, format: beir}",
        ),
    )
    .unwrap();
    let pipeline = common::load(&spec, &work);
    let mut log = Vec::new();
    common::runtime()
        .block_on(pipeline.run(&options, &mut log))
        .unwrap();
    let log = String::from_utf8(log).unwrap();
    assert!(
        log.contains("qrels (load_qrels): would run — stale: config changed (format)"),
        "{log}"
    );
    assert!(
        log.contains("judged_docs (sql): would run — stale: upstream `qrels` is stale"),
        "{log}"
    );
    assert!(log.contains("corpus: fresh, skipped"), "{log}");
}

#[test]
fn output_edited_by_hand_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    std::fs::copy(
        work.join("queries/queries.parquet"),
        work.join("corpus/corpus.parquet"),
    )
    .unwrap();
    let corpus = pipeline
        .assess(pipeline.stage("corpus").unwrap(), &[])
        .unwrap();
    assert_eq!(
        corpus.state,
        StageState::Stale(vec![
            "output `corpus.parquet` was modified outside synthrank".to_string()
        ])
    );
}

/// The bar: `status` on an up-to-date eight-stage pipeline answers in under a second.
#[test]
fn status_of_an_up_to_date_pipeline_is_fast() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::eight_stage_pipeline(dir.path());
    let work = dir.path().join("work");
    common::run(&common::load(&spec, &work), Selection::All, false);
    let started = Instant::now();
    let out = common::synthrank(&[
        "status",
        spec.to_str().unwrap(),
        "--workdir",
        work.to_str().unwrap(),
    ]);
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = common::stdout(&out);
    assert_eq!(text.matches(" fresh ").count(), 8, "{text}");
    assert!(elapsed.as_secs_f64() < 1.0, "status took {elapsed:?}");
}

/// Every file of a model directory counts, not only the last one named: weights retrained in
/// place make the `embed` stage stale, naming the file, and nothing else changed does not.
#[test]
fn each_file_of_a_model_directory_is_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let demo = common::demo_model("all-MiniLM-L6-v2");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        std::fs::create_dir_all(model.join(file).parent().unwrap()).unwrap();
        std::fs::copy(demo.join(file), model.join(file)).unwrap();
    }
    let sample = common::repo().join("data-samples/scifact-mini");
    let spec = common::write_spec(
        dir.path(),
        "embed.yaml",
        &format!(
            "name: embed-freshness\nworkdir: work\nstages:\n  - name: corpus\n    kind: load_corpus\n    config: {{path: {}}}\n  - name: docs\n    kind: sql\n    inputs: {{corpus: corpus}}\n    config: {{schema: corpus, query: 'SELECT * FROM corpus ORDER BY doc_id LIMIT 4'}}\n  - name: embed\n    kind: embed\n    inputs: {{corpus: docs}}\n    config: {{model: {}, max_length: 32}}\n",
            sample.display(),
            model.display()
        ),
    );
    let work = dir.path().join("work");
    let pipeline = common::load(&spec, &work);
    common::run(&pipeline, Selection::All, false);
    let weights = model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.push(b' ');
    std::fs::write(&weights, bytes).unwrap();
    let embed = pipeline
        .assess(pipeline.stage("embed").unwrap(), &[])
        .unwrap();
    assert_eq!(
        embed.state,
        StageState::Stale(vec![format!("file `{}` changed", weights.display())])
    );
    let docs = pipeline
        .assess(pipeline.stage("docs").unwrap(), &[])
        .unwrap();
    assert_eq!(docs.state, StageState::Fresh);
}
