//! Training losses on a batch of logits, in f64, with their gradient with respect to the logits.
//! Engine-free: the trainer moves logits to the host, calls these, and feeds the gradient back
//! into the tensor engine's backward pass.
//!
//! Shapes: `logits` is B x N row-major, one row per query. Without in-batch negatives N = G
//! (each query scores its own group of G passages); with them N = B * G (every passage of the
//! batch, query i's group at columns i*G..(i+1)*G). `labels` is B x G: the graded relevance of
//! each query's own passages.

mod infonce;
mod kl;
mod matrix;
mod wasserstein;

pub use matrix::Matrix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// SyCL's list-wise 2-Wasserstein distance between Gaussians fitted over the batch.
    Wasserstein,
    /// Contrastive cross-entropy; the first passage of each group is the positive.
    Infonce,
    /// KL(target || prediction), target = softmax of the labels; batch mean.
    Kl,
}

#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub logits: &'a Matrix,
    pub labels: &'a Matrix,
    pub in_batch_negatives: bool,
    pub temperature: f64,
}

#[derive(Debug, Clone)]
pub struct LossValue {
    pub loss: f64,
    /// dL/dlogits, the shape of the logits.
    pub grad: Matrix,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    #[error(
        "logits are {rows}x{cols}, labels {label_rows}x{group}: expected {rows}x{expected} logits"
    )]
    Shape {
        rows: usize,
        cols: usize,
        label_rows: usize,
        group: usize,
        expected: usize,
    },
    #[error("temperature must be positive, got {0}")]
    Temperature(f64),
    #[error("a non-finite logit or label")]
    NotFinite,
}

impl Batch<'_> {
    fn check(&self) -> Result<(), LossError> {
        let (b, g) = (self.labels.rows(), self.labels.cols());
        let expected = if self.in_batch_negatives { b * g } else { g };
        if self.logits.rows() != b || self.logits.cols() != expected || b == 0 {
            return Err(LossError::Shape {
                rows: self.logits.rows(),
                cols: self.logits.cols(),
                label_rows: b,
                group: g,
                expected,
            });
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(LossError::Temperature(self.temperature));
        }
        if !self
            .logits
            .data()
            .iter()
            .chain(self.labels.data())
            .all(|v| v.is_finite())
        {
            return Err(LossError::NotFinite);
        }
        Ok(())
    }

    /// Labels laid out like the logits: with in-batch negatives, query i's labels sit in its
    /// own block and every other passage gets label 0, as in SyCL's reference implementation.
    fn label_matrix(&self) -> Matrix {
        if !self.in_batch_negatives {
            return self.labels.clone();
        }
        let (b, g) = (self.labels.rows(), self.labels.cols());
        let mut full = Matrix::zeros(b, b * g);
        for i in 0..b {
            for j in 0..g {
                full[(i, i * g + j)] = self.labels[(i, j)];
            }
        }
        full
    }
}

pub fn compute(kind: LossKind, batch: Batch<'_>) -> Result<LossValue, LossError> {
    batch.check()?;
    Ok(match kind {
        LossKind::Wasserstein => wasserstein::loss(&batch),
        LossKind::Infonce => infonce::loss(&batch),
        LossKind::Kl => kl::loss(&batch),
    })
}

/// Row-wise log-softmax of `m / temperature`, computed without overflow or underflow.
fn log_softmax_rows(m: &Matrix, temperature: f64) -> Matrix {
    let mut out = m.clone();
    for i in 0..m.rows() {
        let row = out.row_mut(i);
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = row
            .iter()
            .map(|v| ((v - max) / temperature).exp())
            .sum::<f64>()
            .ln();
        for v in row.iter_mut() {
            *v = (*v - max) / temperature - log_sum;
        }
    }
    out
}

/// Row-wise softmax of `m / temperature`.
fn softmax_rows(m: &Matrix, temperature: f64) -> Matrix {
    let mut out = log_softmax_rows(m, temperature);
    out.data_mut().iter_mut().for_each(|v| *v = v.exp());
    out
}

/// Chain rule through a row-wise softmax with temperature: given P = softmax(Z / t) and
/// dL/dP, returns dL/dZ = (P * (dL/dP - <dL/dP, P>)) / t, row by row.
fn softmax_backward(p: &Matrix, grad_p: &Matrix, temperature: f64) -> Matrix {
    let mut out = Matrix::zeros(p.rows(), p.cols());
    for i in 0..p.rows() {
        let dot: f64 = p.row(i).iter().zip(grad_p.row(i)).map(|(a, b)| a * b).sum();
        for j in 0..p.cols() {
            out[(i, j)] = p[(i, j)] * (grad_p[(i, j)] - dot) / temperature;
        }
    }
    out
}
