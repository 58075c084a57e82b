//! Paired significance tests against scipy's numbers on fixed inputs
//! (`tests/fixtures/significance.json`, written by `tests/fixtures/significance.py`).

mod common;

use synthrank::metrics::paired_test;

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    baseline: Vec<f64>,
    run: Vec<f64>,
    difference: f64,
    std_error: f64,
    t: f64,
    p_t_test: f64,
    p_permutation: Option<f64>,
}

#[test]
fn p_values_equal_scipys_to_1e_9() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/significance.json"),
    )
    .unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert_eq!(fixture.cases.len(), 5);
    let mut permutation_cases = 0;
    for case in &fixture.cases {
        let got = paired_test(&case.baseline, &case.run, 10_000, 0);
        let close = |what: &str, got: f64, want: f64, tol: f64| {
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{}: {what} {got} vs scipy {want}",
                case.name
            );
        };
        assert_eq!(got.queries, case.run.len());
        close("difference", got.difference, case.difference, 1e-12);
        close("std_error", got.std_error, case.std_error, 1e-12);
        close("t", got.t, case.t, 1e-9);
        close("p_t_test", got.p_t_test, case.p_t_test, 1e-9);
        if let Some(p) = case.p_permutation {
            assert_eq!(
                got.permutations,
                1 << case.run.len(),
                "{}: exact",
                case.name
            );
            close("p_permutation", got.p_permutation, p, 1e-9);
            permutation_cases += 1;
        } else {
            assert_eq!(got.permutations, 10_000, "{}: sampled", case.name);
        }
    }
    assert_eq!(permutation_cases, 4);
}

/// The report stage carries the same p-values: two metrics tables made from a fixture case,
/// a report against the first, and its `significance` table read back with SQL.
#[test]
fn the_report_writes_scipys_p_values() {
    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/significance.json")).unwrap(),
    )
    .unwrap();
    let case = &fixture.cases[1];
    let rows = |values: &[f64]| -> String {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("('q{i}', 'ndcg_cut_10', {v:?})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let metrics = |name: &str, values: &[f64]| {
        format!(
            "  - name: {name}\n    kind: sql\n    config:\n      schema: metrics\n      query: \"SELECT column1 AS query_id, column2 AS measure, column3 AS value FROM (VALUES {})\"\n",
            rows(values)
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &format!(
            "name: p\nworkdir: work\nstages:\n{}{}  - name: report\n    kind: report\n    inputs: {{base: base, run: run}}\n    config: {{baseline: base}}\n",
            metrics("base", &case.baseline),
            metrics("run", &case.run)
        ),
    );
    common::run(
        &common::load(&spec, &dir.path().join("work")),
        synthrank::pipeline::Selection::All,
        false,
    );
    let out = common::success(&common::synthrank(&[
        "sql",
        spec.to_str().unwrap(),
        "SELECT queries, p_t_test, p_permutation FROM report.significance",
        "--format",
        "csv",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let row: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(row[0], case.run.len().to_string());
    let p_t: f64 = row[1].parse().unwrap();
    let p_perm: f64 = row[2].parse().unwrap();
    assert!(
        (p_t - case.p_t_test).abs() <= 1e-9,
        "{p_t} vs {}",
        case.p_t_test
    );
    let want = case.p_permutation.unwrap();
    assert!((p_perm - want).abs() <= 1e-9, "{p_perm} vs {want}");
}
