//! KL(target || prediction) with target = softmax(labels) and prediction = softmax(logits / t),
//! summed over passages and averaged over queries.

use super::{Batch, LossValue, log_softmax_rows, softmax_rows};

pub fn loss(batch: &Batch<'_>) -> LossValue {
    let log_p = log_softmax_rows(batch.logits, batch.temperature);
    let p = softmax_rows(batch.logits, batch.temperature);
    let target = softmax_rows(&batch.label_matrix(), 1.0);
    let b = p.rows();
    let mut value = 0.0;
    for (t, log_q) in target.data().iter().zip(log_p.data()) {
        if *t > 0.0 {
            value += t * (t.ln() - log_q);
        }
    }
    let grad = p.sub(&target).scale(1.0 / (batch.temperature * b as f64));
    LossValue {
        loss: value / b as f64,
        grad,
    }
}
