//! Learning-rate schedules: warmup (linear, or logarithmic as DeepSpeed's WarmupDecayLR that the
//! paper's trainer used), then linear decay to zero or constant.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    #[default]
    Linear,
    /// lr * ln(step + 1) / ln(warmup_steps).
    Log,
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
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            let gamma = match self.warmup {
                Warmup::Linear => (step + 1) as f64 / w as f64,
                Warmup::Log if w > 1 => ((step + 1) as f64).ln() / (w as f64).ln(),
                Warmup::Log => 1.0,
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
}
