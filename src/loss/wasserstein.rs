//! SyCL's list-wise loss: the squared 2-Wasserstein distance between two Gaussians fitted over
//! the batch. Each query contributes one sample, its predicted distribution over passages
//! (softmax of logits / t) on one side and its target distribution (softmax of labels) on the
//! other:
//!
//!   W2^2 = |mu_p - mu_q|^2 + tr S_p + tr S_q - 2 tr (S_p^1/2 S_q S_p^1/2)^1/2
//!
//! With centred samples A (predictions) and C (targets), B x N, and f = 1/(B-1):
//! S_p = f A^T A, S_q = f C^T C, and the last trace is the nuclear norm of f A C^T, a B x B
//! matrix, so one small SVD gives both the value and its gradient U V^T.
//!
//! Like SyCL's reference code, each singular value s enters as sqrt(s^2 + EPS): the square root
//! of an eigenvalue of M^T M stabilized against zero, which centred samples always produce. This
//! keeps the gradient s / sqrt(s^2 + EPS) bounded and reproduces the reference values exactly.

use super::{Batch, LossValue, Matrix, softmax_backward, softmax_rows};

/// The reference implementation's stabilizer under the square root of each eigenvalue.
const EPS: f64 = 1e-15;

/// Subtracts the mean row from every row.
fn centre_rows(m: &Matrix) -> Matrix {
    let (b, n) = (m.rows(), m.cols());
    let mut out = m.clone();
    for j in 0..n {
        let mean = (0..b).map(|i| m[(i, j)]).sum::<f64>() / b as f64;
        for i in 0..b {
            out[(i, j)] -= mean;
        }
    }
    out
}

fn mean_row(m: &Matrix) -> Vec<f64> {
    let b = m.rows() as f64;
    (0..m.cols())
        .map(|j| (0..m.rows()).map(|i| m[(i, j)]).sum::<f64>() / b)
        .collect()
}

pub fn loss(batch: &Batch<'_>) -> LossValue {
    let p = softmax_rows(batch.logits, batch.temperature);
    let q = softmax_rows(&batch.label_matrix(), 1.0);
    let (b, n) = (p.rows(), p.cols());

    let mean_gap: Vec<f64> = mean_row(&p)
        .iter()
        .zip(mean_row(&q))
        .map(|(x, y)| x - y)
        .collect();
    let mut value: f64 = mean_gap.iter().map(|d| d * d).sum();
    let mut grad_p = Matrix::zeros(b, n);
    for i in 0..b {
        for (g, d) in grad_p.row_mut(i).iter_mut().zip(&mean_gap) {
            *g = 2.0 * d / b as f64;
        }
    }

    // With one query the fitted covariances are zero: only the means (and the stabilizer of
    // the one zero singular value) remain.
    if b == 1 {
        value -= 2.0 * EPS.sqrt();
    }
    if b > 1 {
        let f = 1.0 / (b - 1) as f64;
        let a = centre_rows(&p);
        let c = centre_rows(&q);
        let cross = a.matmul(&c.transpose()).scale(f);
        let (mut u, singular, v) = cross.svd();
        let trace_root: f64 = singular.iter().map(|s| (s * s + EPS).sqrt()).sum();
        value += f * a.squared_norm() + f * c.squared_norm() - 2.0 * trace_root;
        // d/dP of f|A|^2 is 2fA; of -2 sum sqrt(s^2 + EPS) it is -2f * centre(U W V^T C) with
        // W = diag(s / sqrt(s^2 + EPS)).
        for (j, s) in singular.iter().enumerate() {
            let weight = s / (s * s + EPS).sqrt();
            for i in 0..b {
                u[(i, j)] *= weight;
            }
        }
        let polar = u.matmul(&v.transpose());
        let nuclear_grad = centre_rows(&polar.matmul(&c));
        for i in 0..b {
            for j in 0..n {
                grad_p[(i, j)] += 2.0 * f * a[(i, j)] - 2.0 * f * nuclear_grad[(i, j)];
            }
        }
    }
    LossValue {
        loss: value,
        grad: softmax_backward(&p, &grad_p, batch.temperature),
    }
}
