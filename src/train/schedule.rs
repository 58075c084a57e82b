//! Learning-rate schedules: warmup (linear, logarithmic, or exactly DeepSpeed's WarmupDecayLR as
//! the paper's trainer drove it), then linear decay to zero or constant.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    #[default]
    Linear,
    /// lr * ln(step + 1) / ln(warmup_steps).
    Log,
    /// DeepSpeed's WarmupDecayLR (log warmup) as the Hugging Face trainer steps it, which the
    /// paper's reference ran: the scheduler is first stepped after the first optimizer step,
    /// so optimizer step s (0-based) uses iteration i = s - 1; i = -1 gives the minimum lr
    /// (0), i < W gives lr * ln(i + 1) / ln(W) (0 again at i = 0), later i decay as
    /// lr * (T - i) / (T - W). W is at least 2, as DeepSpeed enforces.
    DeepspeedLog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Linear to zero at the last step.
    #[default]
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: Warmup,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub(crate) fn lr_at(&self, step: u64) -> f64 {
        if self.warmup == Warmup::DeepspeedLog {
            return self.deepspeed_lr(step);
        }
        let w = self.warmup_steps;
        if step < w {
            let gamma = match self.warmup {
                Warmup::Linear => (step + 1) as f64 / w as f64,
                Warmup::Log if w > 1 => ((step + 1) as f64).ln() / (w as f64).ln(),
                Warmup::Log | Warmup::DeepspeedLog => 1.0,
            };
            return self.lr * gamma;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => {
                let remaining = self.total_steps.saturating_sub(step) as f64;
                let span = self.total_steps.saturating_sub(w).max(1) as f64;
                self.lr * (remaining / span).clamp(0.0, 1.0)
            }
        }
    }

    fn deepspeed_lr(&self, step: u64) -> f64 {
        let Some(i) = step.checked_sub(1) else {
            return 0.0;
        };
        let w = self.warmup_steps.max(2);
        if i < w {
            return self.lr * ((i + 1) as f64).ln() / (w as f64).ln();
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => {
                let remaining = self.total_steps.saturating_sub(i) as f64;
                let span = self.total_steps.saturating_sub(w).max(1) as f64;
                self.lr * (remaining / span).max(0.0)
            }
        }
    }
}

/// Warmup steps for a ratio of the total, rounded up as the Hugging Face trainer does.
pub(crate) fn warmup_steps_for_ratio(ratio: f64, total_steps: u64) -> u64 {
    (ratio * total_steps as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay() {
        let s = Schedule {
            lr: 1.0,
            warmup: Warmup::Linear,
            warmup_steps: 4,
            decay: Decay::Linear,
            total_steps: 12,
        };
        let lrs: Vec<f64> = (0..12).map(|i| s.lr_at(i)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0);
        assert_eq!(lrs[8], 0.5);
        assert!(lrs[11] > 0.0 && lrs[11] < lrs[10]);
    }

    #[test]
    fn log_warmup_is_concave_and_reaches_the_peak() {
        let s = Schedule {
            lr: 2.0,
            warmup: Warmup::Log,
            warmup_steps: 100,
            decay: Decay::Constant,
            total_steps: 1000,
        };
        assert_eq!(s.lr_at(0), 0.0);
        // ln(51)/ln(100) ~ 0.854: most of the rate arrives early.
        assert!((s.lr_at(50) - 2.0 * 51f64.ln() / 100f64.ln()).abs() < 1e-12);
        assert!((s.lr_at(99) - 2.0).abs() < 1e-12);
        assert_eq!(s.lr_at(500), 2.0);
    }

    #[test]
    fn deepspeed_warmup_decay_as_the_reference_ran_it() {
        // T = 100 optimizer steps, warmup_ratio 0.05 -> W = ceil(5.0) = 5.
        let s = Schedule {
            lr: 1e-5,
            warmup: Warmup::DeepspeedLog,
            warmup_steps: warmup_steps_for_ratio(0.05, 100),
            decay: Decay::Linear,
            total_steps: 100,
        };
        assert_eq!(s.warmup_steps, 5);
        // Two steps at lr 0: the minimum before the scheduler's first step, then ln(1).
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(1), 0.0);
        for step in 2..=5 {
            let want = 1e-5 * ((step) as f64).ln() / 5f64.ln();
            assert!((s.lr_at(step) - want).abs() < 1e-20, "step {step}");
        }
        // Iteration 5 = W: the decay starts at its peak.
        assert!((s.lr_at(6) - 1e-5).abs() < 1e-20);
        assert!((s.lr_at(99) - 1e-5 * 2.0 / 95.0).abs() < 1e-20);
        // DeepSpeed warms up over at least 2 iterations.
        let short = Schedule {
            warmup_steps: 1,
            ..s
        };
        assert!((short.lr_at(2) - 1e-5 * 2f64.ln() / 2f64.ln()).abs() < 1e-20);
        assert_eq!(warmup_steps_for_ratio(0.05, 101), 6);
    }
}
