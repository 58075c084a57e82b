//! One optimizer step: forward queries and passages, logits to the host, loss and dL/dlogits,
//! backward through the surrogate, accumulate, clip, AdamW.

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{AdamW, AdamWConfig, Schedule, TrainError};
use crate::allocator::TensorWork;
use crate::encoder::{Bert, Dropout, Pooling, pad_batch};
use crate::loss::{self, LossKind, Matrix};

#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub loss: LossKind,
    pub temperature: f64,
    /// Score every query against every passage of the batch (else only its own group).
    pub in_batch_negatives: bool,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Dropout on (training mode) or off (evaluation mode, as the golden reference runs).
    pub dropout: bool,
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// GradCache: embed a micro-batch this many groups at a time, so memory holds one chunk's
    /// activations while the loss still sees every group (None: the whole micro-batch at once).
    pub chunk_size: Option<usize>,
}

/// A query and its list of passages with graded labels, as token ids.
#[derive(Debug, Clone)]
pub struct TrainGroup {
    pub query: Vec<u32>,
    pub passages: Vec<Vec<u32>>,
    pub labels: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    /// 1-based optimizer step.
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
}

pub struct Trainer {
    model: Bert,
    optimizer: AdamW,
    config: TrainConfig,
    pad_id: u32,
    /// Keeps freed tensor buffers cached for reuse while this exists.
    _tensor_work: TensorWork,
}

impl Trainer {
    pub fn new(model: Bert, config: TrainConfig, pad_id: u32) -> Result<Trainer, TrainError> {
        let optimizer = AdamW::new(model.params().to_vec(), config.adamw)?;
        Ok(Trainer {
            model,
            optimizer,
            config,
            pad_id,
            _tensor_work: TensorWork::begin(),
        })
    }

    pub fn model(&self) -> &Bert {
        &self.model
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// Dropout for chunk `chunk` of micro-batch `micro` of optimizer step `step`: a pure
    /// function of (seed, step, micro, chunk). Chunk 0 draws what an unchunked batch draws.
    fn dropout(&self, step: u64, micro: usize, chunk: usize) -> Option<Dropout> {
        self.config.dropout.then(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(step * 1024 + micro as u64);
            rng.set_word_pos((chunk as u128) << 40);
            Dropout::new(rng)
        })
    }

    /// Query embeddings (B x H) and passage embeddings (B*G x H, group by group).
    fn embed_groups(
        &self,
        groups: &[TrainGroup],
        mut dropout: Option<Dropout>,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let device = self.model.device();
        let queries: Vec<&[u32]> = groups.iter().map(|x| x.query.as_slice()).collect();
        let passages: Vec<&[u32]> = groups
            .iter()
            .flat_map(|x| x.passages.iter().map(Vec::as_slice))
            .collect();
        let (qi, qm) = pad_batch(&queries, self.pad_id, device)?;
        let (pi, pm) = pad_batch(&passages, self.pad_id, device)?;
        let c = &self.config;
        let q = self
            .model
            .embed(&qi, &qm, c.pooling, c.normalize, dropout.as_mut())?;
        let p = self
            .model
            .embed(&pi, &pm, c.pooling, c.normalize, dropout.as_mut())?;
        Ok((q, p))
    }

    /// The loss of the batch's scores, and the surrogate whose gradient with respect to the
    /// embeddings is the loss's: sum(logits * dL/dlogits).
    fn loss_surrogate(
        &self,
        q: &Tensor,
        p: &Tensor,
        groups: &[TrainGroup],
    ) -> Result<(f64, Tensor), TrainError> {
        let (b, g) = (groups.len(), groups.first().map_or(0, |x| x.passages.len()));
        let c = &self.config;
        let logits = if c.in_batch_negatives {
            q.matmul(&p.t()?)?
        } else {
            let h = q.dim(1)?;
            q.unsqueeze(1)?
                .matmul(&p.reshape((b, g, h))?.transpose(1, 2)?)?
                .squeeze(1)?
        };
        let host: Vec<f64> = logits
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let logits_m = Matrix::from_vec(b, host.len() / b.max(1), host);
        let labels = Matrix::from_vec(
            b,
            g,
            groups
                .iter()
                .flat_map(|x| x.labels.iter().copied())
                .collect(),
        );
        let value = loss::compute(
            c.loss,
            loss::Batch {
                logits: &logits_m,
                labels: &labels,
                in_batch_negatives: c.in_batch_negatives,
                temperature: c.temperature,
            },
        )?;
        let grad = Tensor::from_vec(value.grad.into_data(), logits.shape(), logits.device())?
            .to_dtype(logits.dtype())?;
        Ok((value.loss, (logits * grad)?.sum_all()?))
    }

    /// Gradients of `surrogate` for every parameter, in parameter order.
    fn param_grads(&self, surrogate: &Tensor) -> Result<Vec<Tensor>, TrainError> {
        let store = surrogate.backward()?;
        Ok(self
            .model
            .params()
            .iter()
            // Detached: the optimizer's moments are computed from these and live on.
            .map(|(_, var)| match store.get(var.as_tensor()) {
                Some(g) => Ok(g.detach()),
                None => var.as_tensor().zeros_like(),
            })
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Loss and gradients (in parameter order) of micro-batch `micro` of optimizer step
    /// `step`. With `chunk_size`, GradCache: embed chunk by chunk without keeping the graph,
    /// take the loss and its gradient with respect to every embedding, then re-embed each
    /// chunk (same dropout masks) and backpropagate that gradient through it.
    pub fn loss_and_grads(
        &self,
        groups: &[TrainGroup],
        step: u64,
        micro: usize,
    ) -> Result<(f64, Vec<Tensor>), TrainError> {
        let b = groups.len();
        let g = groups.first().map_or(0, |x| x.passages.len());
        if let Some(other) = groups.iter().find(|x| x.passages.len() != g) {
            return Err(TrainError::RaggedGroups(g, other.passages.len()));
        }
        let chunk = self.config.chunk_size.unwrap_or(b).max(1);
        if chunk >= b {
            let (q, p) = self.embed_groups(groups, self.dropout(step, micro, 0))?;
            let (loss, surrogate) = self.loss_surrogate(&q, &p, groups)?;
            return Ok((loss, self.param_grads(&surrogate)?));
        }
        let mut queries = Vec::new();
        let mut passages = Vec::new();
        for (i, part) in groups.chunks(chunk).enumerate() {
            let (q, p) = self.embed_groups(part, self.dropout(step, micro, i))?;
            queries.push(q.detach());
            passages.push(p.detach());
        }
        let q = Var::from_tensor(&Tensor::cat(&queries, 0)?)?;
        let p = Var::from_tensor(&Tensor::cat(&passages, 0)?)?;
        let (loss, surrogate) = self.loss_surrogate(q.as_tensor(), p.as_tensor(), groups)?;
        let store = surrogate.backward()?;
        let grad_of = |v: &Var| match store.get(v.as_tensor()) {
            Some(t) => Ok(t.clone()),
            None => v.as_tensor().zeros_like(),
        };
        let (dq, dp) = (grad_of(&q)?, grad_of(&p)?);
        let mut total: Option<Vec<Tensor>> = None;
        for (i, part) in groups.chunks(chunk).enumerate() {
            let (qc, pc) = self.embed_groups(part, self.dropout(step, micro, i))?;
            let rows = part.len();
            let surrogate = ((qc * dq.narrow(0, i * chunk, rows)?)?.sum_all()?
                + (pc * dp.narrow(0, i * chunk * g, rows * g)?)?.sum_all()?)?;
            total = Some(add_grads(total, self.param_grads(&surrogate)?)?);
        }
        Ok((loss, total.unwrap_or_default()))
    }

    /// One optimizer step over `micro_batches` (gradient accumulation: the mean of their
    /// gradients).
    pub fn step(&mut self, micro_batches: &[&[TrainGroup]]) -> Result<StepStats, TrainError> {
        let step = self.optimizer.steps();
        let n = micro_batches.len().max(1) as f64;
        let mut total: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        for (i, groups) in micro_batches.iter().enumerate() {
            let (loss, grads) = self.loss_and_grads(groups, step, i)?;
            if !loss.is_finite() {
                return Err(TrainError::Diverged {
                    step: step + 1,
                    loss,
                });
            }
            loss_sum += loss;
            total = Some(add_grads(total, grads)?);
        }
        let mut grads = total.unwrap_or_default();
        if n > 1.0 {
            grads = grads.iter().map(|g| g / n).collect::<Result<Vec<_>, _>>()?;
        }
        let mut squares = 0.0f64;
        for g in &grads {
            squares += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let grad_norm = squares.sqrt();
        if let Some(max) = self.config.max_grad_norm {
            // PyTorch's clip_grad_norm_: scale by max / (norm + 1e-6) when that is below 1.
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                grads = grads
                    .iter()
                    .map(|g| g * coef)
                    .collect::<Result<Vec<_>, _>>()?;
            }
        }
        let lr = self.config.schedule.lr_at(step);
        self.optimizer.step(&grads, lr)?;
        Ok(StepStats {
            step: step + 1,
            loss: loss_sum / n,
            lr,
            grad_norm,
        })
    }

    /// Writes weights, optimizer moments and the step count into the new directory `dir`,
    /// every file fsync'd, the step last: a directory without `trainer_state.json` is not a
    /// checkpoint. Callers make it visible by renaming it (see the `train` stage).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |e: std::io::Error| TrainError::Checkpoint(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let weights: std::collections::HashMap<String, Tensor> =
            self.model.state().into_iter().collect();
        let model = dir.join("model.safetensors");
        candle_core::safetensors::save(&weights, &model)?;
        let optimizer = dir.join("optimizer.safetensors");
        self.optimizer.save(&optimizer)?;
        for file in [&model, &optimizer] {
            std::fs::File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
        }
        let state = serde_json::to_string(&TrainerState {
            step: self.optimizer.steps(),
        })
        .expect("state serializes");
        write_synced(&dir.join("trainer_state.json"), state.as_bytes()).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]; returns its step.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<u64, TrainError> {
        let bad = |what: String| TrainError::Checkpoint(format!("{}: {what}", dir.display()));
        let state: TrainerState = serde_json::from_str(
            &std::fs::read_to_string(dir.join("trainer_state.json"))
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let device = self.model.device().clone();
        let mut weights = candle_core::safetensors::load(dir.join("model.safetensors"), &device)?;
        for (name, var) in self.model.params() {
            let t = weights
                .remove(name)
                .ok_or_else(|| bad(format!("no weight `{name}`")))?;
            var.set(&t)?;
        }
        self.optimizer
            .load(&dir.join("optimizer.safetensors"), state.step, &device)?;
        Ok(state.step)
    }
}

/// Element-wise sum of two gradient lists (the first may be empty).
fn add_grads(acc: Option<Vec<Tensor>>, grads: Vec<Tensor>) -> Result<Vec<Tensor>, TrainError> {
    Ok(match acc {
        None => grads,
        Some(acc) => acc
            .iter()
            .zip(&grads)
            .map(|(a, g)| a + g)
            .collect::<Result<Vec<_>, _>>()?,
    })
}

/// Writes `bytes` to `path` and flushes them to the disk.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
