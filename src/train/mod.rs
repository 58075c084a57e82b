//! Training the encoder: AdamW, learning-rate schedules, gradient accumulation and clipping,
//! checkpoints that resume bit-for-bit. The loss is computed by [`crate::loss`] on the host in
//! f64 and fed back through a surrogate `sum(logits * dL/dlogits)`. Knows nothing of pipelines.

mod optimizer;
mod schedule;
mod trainer;

pub use optimizer::{AdamW, AdamWConfig};
pub(crate) use schedule::warmup_steps_for_ratio;
pub use schedule::{Decay, Schedule, Warmup};
pub use trainer::StepStats;
pub(crate) use trainer::write_synced;
pub use trainer::{TrainConfig, TrainGroup, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Encoder(#[from] crate::encoder::EncoderError),
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("a batch of groups of different sizes ({0} and {1})")]
    RaggedGroups(usize, usize),
    #[error("the loss is not finite at step {step} ({loss}); lower the learning rate")]
    Diverged { step: u64, loss: f64 },
}

impl TrainError {
    /// A base model the spec names that cannot serve (exit 2); training itself failing is 1.
    pub fn is_usage(&self) -> bool {
        matches!(self, TrainError::Encoder(e) if e.is_usage())
    }
}
