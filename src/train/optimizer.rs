//! AdamW (decoupled weight decay) as PyTorch implements it, with its state saved and restored
//! for resumable training.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use super::TrainError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    steps: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW, TrainError> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        let v = m.clone();
        Ok(AdamW {
            config,
            params,
            m,
            v,
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with gradients in parameter order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, ((_, param), grad)) in self.params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
            let update = ((&m / &denom)? * (lr / bias1))?;
            let decayed = (param.as_tensor() * (1.0 - lr * c.weight_decay))?;
            param.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    pub(crate) fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.insert(format!("m.{name}"), self.m[i].clone());
            tensors.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Restores moments saved by [`AdamW::save`] after `steps` optimizer steps.
    pub fn load(&mut self, path: &Path, steps: u64, device: &Device) -> Result<(), TrainError> {
        let mut tensors = candle_core::safetensors::load(path, device)?;
        for (i, (name, _)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                *slot = tensors.remove(&format!("{prefix}.{name}")).ok_or_else(|| {
                    TrainError::Checkpoint(format!("{}: no `{prefix}.{name}`", path.display()))
                })?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
