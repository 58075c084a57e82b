//! InfoNCE: cross-entropy of each query's logits against its positive, the first passage of its
//! group; every other passage in the row (its group, and other groups with in-batch negatives)
//! is a negative. Mean over queries.

use super::{Batch, LossValue, log_softmax_rows, softmax_rows};

pub fn loss(batch: &Batch<'_>) -> LossValue {
    let log_p = log_softmax_rows(batch.logits, batch.temperature);
    let p = softmax_rows(batch.logits, batch.temperature);
    let (b, group) = (batch.labels.rows(), batch.labels.cols());
    let mut grad = p.clone();
    let mut value = 0.0;
    for i in 0..b {
        let positive = if batch.in_batch_negatives {
            i * group
        } else {
            0
        };
        value -= log_p[(i, positive)];
        grad[(i, positive)] -= 1.0;
    }
    let scale = 1.0 / (batch.temperature * b as f64);
    LossValue {
        loss: value / b as f64,
        grad: grad.scale(scale),
    }
}
