//! Paired significance tests against scipy's numbers on fixed inputs
//! (`tests/fixtures/significance.json`, written by `tests/fixtures/significance.py`).

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
