//! Spec templates: `vars:`, `matrix:` stages and fan-in inputs expand into plain stages with
//! generated names that `--only`, `status` and SQL use; errors point at the template's line.

mod common;

use synthrank::spec::PipelineSpec;

const SPEC: &str = "\
name: t
vars:
  root: data
  k: 7
  sets: [alpha, beta]
stages:
  - name: ${set}_queries
    kind: load_queries
    matrix: {set: sets}
    config: {path: \"${root}/${set}.jsonl\"}
  - name: ${set}_${copy}
    kind: sql
    matrix: {set: sets, copy: [one, two]}
    inputs: [\"${set}_queries\"]
    config: {query: \"SELECT * FROM ${set}_queries LIMIT ${k}\"}
  - name: everything
    kind: sql
    inputs: {\"${sets}\": \"${sets}_one\"}
    config: {query: SELECT * FROM alpha UNION ALL SELECT * FROM beta}
";

/// One matrix over `sets`, for command-line overrides.
const SMALL: &str = "\
name: t
vars:
  sets: [alpha, beta]
stages:
  - name: ${set}_queries
    kind: load_queries
    matrix: {set: sets}
    config: {path: \"data/${set}.jsonl\"}
";

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    for (set, n) in [("alpha", 3), ("beta", 2)] {
        let lines: String = (0..n)
            .map(|i| format!("{{\"_id\": \"{set}{i}\", \"text\": \"{set} query {i}\"}}\n"))
            .collect();
        std::fs::write(dir.path().join(format!("data/{set}.jsonl")), lines).unwrap();
    }
    dir
}

#[test]
fn matrices_expand_into_named_stages_with_substituted_fields() {
    let dir = data_dir();
    let path = common::write_spec(dir.path(), "t.yaml", SPEC);
    let spec = PipelineSpec::load(&path).unwrap();
    let names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "alpha_queries",
            "beta_queries",
            // Matrix keys in name order, the last varying fastest.
            "alpha_one",
            "beta_one",
            "alpha_two",
            "beta_two",
            "everything"
        ]
    );
    let alpha = spec.stage("alpha_queries").unwrap();
    assert_eq!(alpha.config["path"], "data/alpha.jsonl");
    assert_eq!(alpha.line, 7, "expanded stages keep the template's line");
    let everything = spec.stage("everything").unwrap();
    let roles: Vec<(Option<&str>, &str)> = everything
        .inputs
        .iter()
        .map(|i| (i.role.as_deref(), i.stage.as_str()))
        .collect();
    assert_eq!(
        roles,
        [(Some("alpha"), "alpha_one"), (Some("beta"), "beta_one")]
    );

    // The expanded pipeline runs, and SQL sees the generated names.
    let pipeline = common::load(&path, &dir.path().join("work"));
    common::run(&pipeline, synthrank::pipeline::Selection::All, false);
    let out = cli(
        dir.path(),
        &[
            "sql",
            path.to_str().unwrap(),
            "SELECT count(*) AS n FROM everything",
            "--format",
            "csv",
        ],
    );
    assert_eq!(out, "n\n5\n");
}

/// Runs synthrank on the work directory under `dir`; its standard output on success.
fn cli(dir: &std::path::Path, args: &[&str]) -> String {
    let workdir = dir.join("work");
    let mut all = args.to_vec();
    all.extend(["--workdir", workdir.to_str().unwrap()]);
    common::success(&common::synthrank(&all))
}

#[test]
fn vars_can_be_overridden_from_the_command_line() {
    let dir = data_dir();
    let path = common::write_spec(dir.path(), "t.yaml", SMALL);
    let spec = path.to_str().unwrap();
    cli(
        dir.path(),
        &[
            "run",
            spec,
            "--only",
            "beta_queries",
            "--var",
            "sets=[beta]",
        ],
    );
    let status = cli(dir.path(), &["status", spec, "--var", "sets=[beta]"]);
    assert!(
        status.contains("beta_queries") && !status.contains("alpha_queries"),
        "{status}"
    );
    let out = common::synthrank(&["status", path.to_str().unwrap(), "--var", "set=[x]"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no variable `set`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn template_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_spec(dir.path(), "t.yaml", text);
    let message = PipelineSpec::load(&path).unwrap_err().to_string();
    message[path.display().to_string().len()..].to_string()
}

#[test]
fn template_errors_point_at_the_template() {
    let head = "name: t\nvars:\n  sets: [a, b]\nstages:\n";
    assert_eq!(
        template_error(&format!(
            "{head}  - name: queries\n    kind: load_queries\n    matrix: {{set: sets}}\n"
        )),
        ":5: stage template `queries`: the name does not use the matrix key `${set}`: each \
         expanded stage needs a name of its own"
    );
    let msg = template_error(&format!(
        "{head}  - name: q_${{set}}\n    kind: load_queries\n    matrix: {{set: sets}}\n    config: {{path: \"${{sett}}\"}}\n"
    ));
    assert!(
        msg.starts_with(":8: stage template `q_${set}`: `${sett}` names no matrix key"),
        "{msg}"
    );
    let msg = template_error(&format!(
        "{head}  - name: q_${{set}}\n    kind: load_queries\n    matrix: {{set: setz}}\n"
    ));
    assert!(
        msg.starts_with(":7: stage template `q_${set}`: matrix key `set`: `setz` is not a list"),
        "{msg}"
    );
    let msg = template_error(&format!(
        "{head}  - name: q\n    kind: load_queries\n    config: {{path: \"data/${{sets}}\"}}\n"
    ));
    assert!(msg.contains("`${sets}` is a list"), "{msg}");
    let msg = template_error("name: t\nvars:\n  bad: {nested: map}\nstages: []\n");
    assert!(
        msg.starts_with(":3: `vars:` variable `bad` must be"),
        "{msg}"
    );
    // A generated name that is not an identifier is refused like a written one.
    let msg = template_error(
        "name: t\nvars:\n  sets: [a-b]\nstages:\n  - name: q_${set}\n    kind: load_queries\n    matrix: {set: sets}\n",
    );
    assert!(
        msg.starts_with(":5: stage name `q_a-b` is not allowed"),
        "{msg}"
    );
}
