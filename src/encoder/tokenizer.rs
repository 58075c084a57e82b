//! Hugging Face `tokenizer.json` tokenizers with synthrank's own truncation and no padding
//! (batches are padded later, to their own longest sequence).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::EncoderError;

pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`. Whatever padding and truncation the file sets (all-MiniLM-L6-v2's
    /// pads everything to 128) is replaced: lengths are chosen per call.
    pub(crate) fn from_file(path: &Path) -> Result<TextTokenizer, EncoderError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| EncoderError::Tokenizer {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .expect("disabling truncation cannot fail");
        Ok(TextTokenizer { inner, pad_id })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids with special tokens, truncated to `max_len` (special tokens included).
    pub fn encode_batch(
        &mut self,
        texts: &[&str],
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>, EncoderError> {
        let tokenizer = &mut self.inner;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EncoderError::Tokenizer {
                file: "tokenizer.json".into(),
                message: e.to_string(),
            })?;
        let encodings =
            tokenizer
                .encode_batch(texts.to_vec(), true)
                .map_err(|e| EncoderError::Tokenizer {
                    file: "tokenizer.json".into(),
                    message: e.to_string(),
                })?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }
}
