//! The BERT-family bi-encoder: Hugging Face model directories, tokenization, a trainable
//! candle implementation written from primitive ops, and inference backends behind one trait
//! (candle, ONNX Runtime). Knows nothing of pipelines or Parquet.

mod bert;
mod config;
mod device;
mod embedder;
mod fastmath;
mod model_dir;
mod onnx_export;
mod ops;
mod ort_backend;
mod tokenizer;

pub use bert::{Bert, pad_batch};
pub use config::BertConfig;
pub(crate) use device::device_label;
pub use device::{CUDA_BUILT, DeviceChoice};
pub use embedder::{CandleEmbedder, Embedder};
pub use model_dir::ModelDir;
pub use onnx_export::{OnnxOps, export_onnx};
pub use ops::Dropout;
pub use ort_backend::OrtEmbedder;
pub use tokenizer::TextTokenizer;

use std::path::Path;

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Masked mean over all tokens, [CLS] and [SEP] included (sentence-transformers, Contriever).
    Mean,
    /// The [CLS] token's state.
    Cls,
}

/// The precision of the encoder's matrix products. Parameters (the optimizer's master
/// weights), layer norms, softmax, pooling and the loss stay f32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// The dtype products are cast to; `None` for full precision.
    pub(crate) fn product_dtype(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(candle_core::DType::BF16),
            Precision::F16 => Some(candle_core::DType::F16),
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{path}: not a model directory ({reason})")]
    NotAModelDir { path: String, reason: String },
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("{file}: no weight `{name}` (is this a BERT-family checkpoint?)")]
    MissingWeight { file: String, name: String },
    #[error("{file}: weight `{name}` has shape {found:?}, the config implies {expected:?}")]
    WeightShape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: tokenizer: {message}")]
    Tokenizer { file: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tensor engine: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("ONNX Runtime: {0}")]
    Onnx(String),
    #[error("device: {0}")]
    Device(String),
}

impl EncoderError {
    /// The spec names a model, tokenizer or device that cannot serve (exit 2).
    pub(crate) fn is_usage(&self) -> bool {
        matches!(
            self,
            EncoderError::NotAModelDir { .. }
                | EncoderError::Config { .. }
                | EncoderError::MissingWeight { .. }
                | EncoderError::WeightShape { .. }
                | EncoderError::Tokenizer { .. }
                | EncoderError::Device(_)
        )
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> EncoderError {
        EncoderError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
