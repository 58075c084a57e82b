//! The losses reproduce the reference implementations (SyCL's WS2Loss, Trove's KL and InfoNCE,
//! float64 PyTorch) in value and gradient for every case of ../shared/golden/losses.json, and
//! their gradients agree with finite differences on random batches.

mod common;

use rand::{Rng, SeedableRng};
use synthrank::loss::{self, Batch, LossKind, Matrix};

fn matrix(value: &serde_json::Value) -> Matrix {
    let rows: Vec<Vec<f64>> = value
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    Matrix::from_rows(&rows)
}

fn close(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= tolerance * expected.abs().max(1.0)
}

#[test]
fn reference_values_and_gradients() {
    let path = common::shared().join("golden/losses.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for (n, case) in golden["cases"].as_array().unwrap().iter().enumerate() {
        let logits = matrix(&case["logits"]);
        let labels = matrix(&case["labels"]);
        let batch = Batch {
            logits: &logits,
            labels: &labels,
            in_batch_negatives: case["in_batch_negatives"].as_bool().unwrap(),
            temperature: case["temperature"].as_f64().unwrap(),
        };
        for (name, kind) in [
            ("wasserstein", LossKind::Wasserstein),
            ("kl", LossKind::Kl),
            ("infonce", LossKind::Infonce),
        ] {
            let Some(expected) = case.get(name) else {
                continue;
            };
            let got = loss::compute(kind, batch).unwrap();
            let want = expected["loss"].as_f64().unwrap();
            assert!(
                close(got.loss, want, 1e-9),
                "case {n} {name}: loss {} != {want}",
                got.loss
            );
            let grad = matrix(&expected["grad_logits"]);
            assert_eq!(got.grad.data().len(), grad.data().len(), "case {n} {name}");
            for (i, (a, b)) in got.grad.data().iter().zip(grad.data()).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-9,
                    "case {n} {name}: grad[{i}] {a} != {b}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 26, "every loss of every case");
}

/// Central differences on random batches, with and without in-batch negatives.
#[test]
fn gradients_match_finite_differences() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for trial in 0..24 {
        let b = rng.random_range(1..6);
        let g = rng.random_range(2..5);
        let in_batch = trial % 2 == 0;
        let n = if in_batch { b * g } else { g };
        let temperature = [1.0, 0.5, 0.1][trial % 3];
        let logits = Matrix::from_vec(
            b,
            n,
            (0..b * n).map(|_| rng.random_range(-3.0..3.0)).collect(),
        );
        let labels = Matrix::from_vec(
            b,
            g,
            (0..b * g).map(|_| rng.random_range(0..4) as f64).collect(),
        );
        for kind in [LossKind::Wasserstein, LossKind::Kl, LossKind::Infonce] {
            let at = |m: &Matrix| {
                loss::compute(
                    kind,
                    Batch {
                        logits: m,
                        labels: &labels,
                        in_batch_negatives: in_batch,
                        temperature,
                    },
                )
                .unwrap()
            };
            let analytic = at(&logits).grad;
            let h = 1e-6;
            for k in 0..b * n {
                let mut plus = logits.clone();
                plus.data_mut()[k] += h;
                let mut minus = logits.clone();
                minus.data_mut()[k] -= h;
                let numeric = (at(&plus).loss - at(&minus).loss) / (2.0 * h);
                assert!(
                    (numeric - analytic.data()[k]).abs() < 1e-6,
                    "trial {trial} {kind:?} b={b} g={g} t={temperature}: d/dz[{k}] numeric {numeric} analytic {}",
                    analytic.data()[k]
                );
            }
        }
    }
}

#[test]
fn shape_and_temperature_errors() {
    let logits = Matrix::zeros(2, 4);
    let labels = Matrix::zeros(2, 4);
    let batch = Batch {
        logits: &logits,
        labels: &labels,
        in_batch_negatives: true,
        temperature: 1.0,
    };
    let err = loss::compute(LossKind::Wasserstein, batch).unwrap_err();
    assert_eq!(
        err.to_string(),
        "logits are 2x4, labels 2x4: expected 2x8 logits"
    );
    let batch = Batch {
        logits: &logits,
        labels: &labels,
        in_batch_negatives: false,
        temperature: 0.0,
    };
    assert_eq!(
        loss::compute(LossKind::Kl, batch).unwrap_err().to_string(),
        "temperature must be positive, got 0"
    );
}

#[test]
fn svd_reconstructs_random_matrices() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for n in [1, 2, 5, 16, 64] {
        let m = Matrix::from_vec(
            n,
            n,
            (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect(),
        );
        let (u, s, v) = m.svd();
        let mut us = u.clone();
        for i in 0..n {
            for j in 0..n {
                us[(i, j)] *= s[j];
            }
        }
        let back = us.matmul(&v.transpose());
        assert_eq!(back.data().len(), m.data().len());
        for (a, b) in back.data().iter().zip(m.data()) {
            assert!((a - b).abs() < 1e-12, "n={n}");
        }
        assert!(s.iter().all(|&x| x >= 0.0));
    }
}
