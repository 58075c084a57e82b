//! Every class of spec error is reported with the file, the line and the field or stage.

mod common;

/// Loads `text` as a spec in a fresh directory (with a small queries file beside it) and
/// returns the error message.
fn error_of(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.jsonl"),
        "{\"_id\": \"1\", \"text\": \"a\"}\n",
    )
    .unwrap();
    let spec = common::write_spec(dir.path(), "p.yaml", text);
    let result = synthrank::pipeline::Pipeline::load(&spec, &synthrank::stages::registry(), None);
    let message = match result {
        Ok(_) => panic!("spec was accepted:\n{text}"),
        Err(e) => e.to_string(),
    };
    // Messages start with the spec's path; compare the rest.
    let prefix = spec.display().to_string();
    assert!(
        message.starts_with(&prefix),
        "message does not name the file: {message}"
    );
    message[prefix.len()..].to_string()
}

const QUERIES: &str = "  - name: q\n    kind: load_queries\n    config:\n      path: q.jsonl\n";

#[test]
fn invalid_yaml_names_the_line() {
    let msg = error_of("name: p\nstages:\n  - name: q\n    kind: [unclosed\n");
    assert!(msg.starts_with(":4") || msg.starts_with(":5"), "{msg}");
    assert!(msg.contains("invalid YAML"), "{msg}");
}

#[test]
fn unknown_top_level_field() {
    let msg = error_of(&format!("name: p\nstagez: []\nstages:\n{QUERIES}"));
    assert!(msg.starts_with(":2:"), "{msg}");
    assert!(msg.contains("stagez"), "{msg}");
}

#[test]
fn unknown_kind() {
    let msg = error_of("name: p\nstages:\n  - name: q\n    kind: load_quries\n");
    assert_eq!(
        msg.split(" (known").next().unwrap(),
        ":4: stage `q`: unknown kind `load_quries`"
    );
    assert!(msg.contains("load_queries"), "lists the known kinds: {msg}");
}

#[test]
fn duplicate_stage() {
    let msg = error_of(&format!("name: p\nstages:\n{QUERIES}{QUERIES}"));
    assert_eq!(
        msg,
        ":7: duplicate stage name `q` (first defined on line 3)"
    );
}

#[test]
fn unknown_input_stage() {
    let msg = error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: p\n    kind: render_prompts\n    inputs: [quries]\n    config: {{template: t.j2}}\n"
    ));
    assert!(
        msg.starts_with(":9: stage `p`: input refers to unknown stage `quries`"),
        "{msg}"
    );
}

#[test]
fn unknown_input_table() {
    let msg = error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: p\n    kind: render_prompts\n    inputs: [q.nope]\n    config: {{template: q.jsonl}}\n"
    ));
    assert_eq!(
        msg,
        ":9: stage `p`: input `q.nope`: stage `q` writes no table `nope` (it writes: queries)"
    );
}

#[test]
fn cycle() {
    let msg = error_of(
        "name: p\nstages:\n  - name: a\n    kind: sql\n    inputs: [b]\n    config: {query: SELECT 1}\n  - name: b\n    kind: sql\n    inputs: [a]\n    config: {query: SELECT 1}\n",
    );
    assert!(
        msg.contains("cycle between stages: a -> b -> a")
            || msg.contains("cycle between stages: b -> a -> b"),
        "{msg}"
    );
    assert!(msg.starts_with(":5:") || msg.starts_with(":9:"), "{msg}");
}

#[test]
fn missing_file_names_the_field_line() {
    let msg = error_of(
        "name: p\nstages:\n  - name: q\n    kind: load_queries\n    config:\n      split: test\n      path: nowhere.jsonl\n",
    );
    // A path that does not exist is reported at its own line, before what it would imply.
    assert!(
        msg.starts_with(":7: stage `q`, field `path`: file `"),
        "{msg}"
    );
    let msg = error_of(
        "name: p\nstages:\n  - name: q\n    kind: load_queries\n    config:\n      format: beir\n      path: nowhere.jsonl\n",
    );
    assert!(
        msg.starts_with(":7: stage `q`, field `path`: file `"),
        "{msg}"
    );
    assert!(msg.ends_with("nowhere.jsonl` does not exist"), "{msg}");
}

#[test]
fn stage_name_escaping_the_workdir() {
    let msg = error_of(
        "name: p\nstages:\n  - name: ../evil\n    kind: load_queries\n    config: {path: q.jsonl}\n",
    );
    assert_eq!(
        msg,
        ":3: stage name `../evil` is not allowed: it would escape the workdir"
    );
    let msg = error_of(
        "name: p\nstages:\n  - name: Queries\n    kind: load_queries\n    config: {path: q.jsonl}\n",
    );
    assert!(
        msg.starts_with(
            ":3: stage name `Queries` is not allowed: stage names are lowercase identifiers"
        ),
        "{msg}"
    );
}

#[test]
fn unknown_config_field_points_at_its_line() {
    let msg = error_of(
        "name: p\nstages:\n  - name: q\n    kind: load_queries\n    config:\n      path: q.jsonl\n      sampel: {n: 3, seed: 1}\n",
    );
    assert!(
        msg.starts_with(":7: stage `q`, field `sampel`: unknown field `sampel`"),
        "{msg}"
    );
}

#[test]
fn wrong_config_type_names_the_field() {
    let msg = error_of(
        "name: p\nstages:\n  - name: q\n    kind: load_queries\n    config:\n      path: q.jsonl\n      sample: {n: many, seed: 1}\n",
    );
    assert!(
        msg.starts_with(":7: stage `q`, field `sample.n`: invalid type"),
        "{msg}"
    );
}

#[test]
fn input_of_the_wrong_kind() {
    let msg = error_of(
        "name: p\nstages:\n  - name: c\n    kind: load_corpus\n    config: {path: q.jsonl, format: beir}\n  - name: p\n    kind: render_prompts\n    inputs: {queries: c}\n    config: {template: q.jsonl}\n",
    );
    assert_eq!(
        msg,
        ":8: stage `p` (render_prompts): input `queries` needs a table of kind `queries`, but `c.corpus` is of kind `corpus`"
    );
}

#[test]
fn missing_required_input() {
    let msg = error_of(
        "name: p\nstages:\n  - name: p\n    kind: render_prompts\n    config: {template: q.jsonl}\n",
    );
    assert!(
        msg.starts_with(":3: stage `p` (render_prompts): missing input `queries`"),
        "{msg}"
    );
}

#[test]
fn sql_filter_on_several_inputs_needs_roles() {
    let msg = error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: j\n    kind: sql\n    inputs: [q, q.queries]\n    sql: SELECT 1\n    config: {{query: SELECT 1}}\n"
    ));
    assert!(
        msg.starts_with(":10: stage `j`, `sql:` the stage has several inputs"),
        "{msg}"
    );
}

#[test]
fn cli_reports_spec_errors_in_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        "name: p\nstages:\n  - name: q\n    kind: nope\n",
    );
    let out = common::synthrank(&["status", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: {}:4: stage `q`: unknown kind `nope`",
            spec.display()
        )),
        "{err}"
    );
}

/// The error of a spec whose `generate` stage `g` has `line` (on line 17) in its config.
fn generate_config_error(line: &str) -> String {
    error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: pr\n    kind: render_prompts\n    inputs: [q]\n    config: {{template: q.jsonl}}\n  \
         - name: g\n    kind: generate\n    inputs: [pr]\n    config:\n      endpoints: [http://127.0.0.1:9/v1]\n      model: m\n      {line}\n"
    ))
}

/// Durations that `std::time::Duration` cannot hold (negative, NaN, astronomically large, or a
/// rate whose interval is) are refused with the field's line, never a panic at run time.
#[test]
fn out_of_range_durations_name_the_field() {
    for (field, value) in [
        ("timeout_s", "1.0e300"),
        ("timeout_s", "0"),
        ("backoff_s", "-1"),
        ("timeout_s", "-3"),
        ("requests_per_second", "1.0e-300"),
        ("requests_per_second", "-2"),
    ] {
        let msg = generate_config_error(&format!("{field}: {value}"));
        assert!(
            msg.starts_with(&format!(":17: stage `g`, field `{field}`: must be")),
            "{field}: {value}: {msg}"
        );
    }
}

/// The Batch API's limits are checked when the spec is loaded, each error naming its field.
#[test]
fn batch_api_limits_name_the_field() {
    for (value, field) in [
        ("{poll_s: -1}", "poll_s"),
        ("{max_requests: 0}", "max_requests"),
        ("{max_file_mb: 0}", "max_file_mb"),
        ("{max_file_mb: -5}", "max_file_mb"),
        ("{max_in_flight: 0}", "max_in_flight"),
    ] {
        let msg = generate_config_error(&format!("batch_api: {value}"));
        assert!(
            msg.contains(&format!("stage `g`, field `batch_api.{field}`: must be")),
            "{value}: {msg}"
        );
    }
}

/// `device:` is checked when the spec is loaded: a misspelt device, and CUDA asked of a build
/// without it, name the field (never a silent fall-back to the CPU).
#[test]
fn devices_are_checked_against_the_build() {
    let model = common::demo_model("all-MiniLM-L6-v2");
    let spec = |device: &str| {
        format!(
            "name: p\nstages:\n{QUERIES}  - name: e\n    kind: embed\n    inputs: [q]\n    config:\n      model: {}\n      device: {device}\n",
            model.display()
        )
    };
    let msg = error_of(&spec("gpu"));
    assert!(
        msg.contains("field `device`") && msg.contains("`gpu` is not a device"),
        "{msg}"
    );
    if !synthrank::encoder::CUDA_BUILT {
        let msg = error_of(&spec("cuda:1"));
        assert!(
            msg.starts_with(":12: stage `e`, field `device`: device: `cuda:1` asked of a synthrank built without CUDA"),
            "{msg}"
        );
    }
}

/// Reduced precision where it cannot run: f16 training (no loss scaling) and the onnx backend
/// (the export fixes its own precision) name the field.
#[test]
fn precision_is_checked_where_it_cannot_apply() {
    let model = common::demo_model("all-MiniLM-L6-v2");
    let msg = error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: e\n    kind: embed\n    inputs: [q]\n    config:\n      model: {}\n      backend: onnx\n      onnxruntime: lib.so\n      precision: bf16\n",
        model.display()
    ));
    assert!(
        msg.contains("field `precision`") && msg.contains("onnx_weights: int8"),
        "{msg}"
    );
    let msg = error_of(&format!(
        "name: p\nstages:\n{QUERIES}  - name: t\n    kind: train\n    inputs: [q]\n    config:\n      model: {}\n      lr: 0.00001\n      batch_size: 2\n      precision: f16\n",
        model.display()
    ));
    assert!(
        msg.contains("field `precision`") && msg.contains("use bf16"),
        "{msg}"
    );
}
