//! Inference backends: token id batches in, pooled embeddings out.

use candle_core::Device;

use super::{Bert, EncoderError, Pooling, pad_batch};
use crate::allocator::TensorWork;

/// An inference backend for the `embed` stage.
pub trait Embedder: Send {
    /// The embedding dimension.
    fn dim(&self) -> usize;
    /// Embeds a batch of token id sequences (special tokens included, unpadded): row-major
    /// (batch.len() x dim).
    fn embed(&mut self, batch: &[&[u32]]) -> Result<Vec<f32>, EncoderError>;
}

/// The training encoder run forward in evaluation mode: the reference backend.
pub struct CandleEmbedder {
    model: Bert,
    pooling: Pooling,
    normalize: bool,
    pad_id: u32,
    /// Keeps freed tensor buffers cached for reuse while this exists.
    _tensor_work: TensorWork,
}

impl CandleEmbedder {
    pub fn new(model: Bert, pooling: Pooling, normalize: bool, pad_id: u32) -> CandleEmbedder {
        CandleEmbedder {
            model,
            pooling,
            normalize,
            pad_id,
            _tensor_work: TensorWork::begin(),
        }
    }
}

impl Embedder for CandleEmbedder {
    fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    fn embed(&mut self, batch: &[&[u32]]) -> Result<Vec<f32>, EncoderError> {
        let device: &Device = self.model.device();
        let (ids, mask) = pad_batch(batch, self.pad_id, device)?;
        let pooled = self
            .model
            .embed(&ids, &mask, self.pooling, self.normalize, None)?;
        Ok(pooled.flatten_all()?.to_vec1::<f32>()?)
    }
}
