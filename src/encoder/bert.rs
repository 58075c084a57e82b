//! The BERT encoder: embeddings, self-attention layers, pooling; forward and (through candle's
//! autograd) backward. Parameters are `Var`s named as in Hugging Face checkpoints, without the
//! `bert.` prefix.

use std::collections::HashMap;

use candle_core::{DType, Device, Result as CandleResult, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::BertConfig;
use super::ops::{self, Dropout, SelfAttention, maybe_dropout};
use super::{EncoderError, Pooling, Precision};

struct Linear {
    weight: Var,
    bias: Var,
}

impl Linear {
    fn projection(&self) -> ops::Projection<'_> {
        (self.weight.as_tensor(), self.bias.as_tensor())
    }
}

struct Norm {
    weight: Var,
    bias: Var,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

/// A BERT-family encoder with trainable weights.
pub struct Bert {
    config: BertConfig,
    word: Var,
    position: Var,
    token_type: Var,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    /// Every trainable parameter by checkpoint name, in a fixed order.
    params: Vec<(String, Var)>,
    /// Tensors of the checkpoint the encoder does not use (the pooler): written back on save.
    passthrough: Vec<(String, Tensor)>,
    device: Device,
    /// The dtype matrix products run in; `None`: the parameters' own.
    product: Option<DType>,
}

/// Checkpoint names vary: `bert.` prefixes, TF-era `gamma`/`beta` for layer norms.
fn canonical_name(name: &str) -> String {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    if name.contains("LayerNorm.") {
        return name
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
    }
    name.to_string()
}

struct Loader<'a> {
    tensors: HashMap<String, Tensor>,
    params: Vec<(String, Var)>,
    source: &'a str,
}

impl Loader<'_> {
    fn var(&mut self, name: &str, shape: &[usize]) -> Result<Var, EncoderError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| EncoderError::MissingWeight {
                file: self.source.to_string(),
                name: name.to_string(),
            })?;
        if tensor.dims() != shape {
            return Err(EncoderError::WeightShape {
                file: self.source.to_string(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        // f64 is kept (gradient checks); half-precision checkpoints are trained in f32.
        let dtype = if tensor.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let var = Var::from_tensor(&tensor.to_dtype(dtype)?)?;
        self.params.push((name.to_string(), var.clone()));
        Ok(var)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> Result<Linear, EncoderError> {
        Ok(Linear {
            weight: self.var(&format!("{prefix}.weight"), &[out, inp])?,
            bias: self.var(&format!("{prefix}.bias"), &[out])?,
        })
    }

    fn norm(&mut self, prefix: &str, size: usize) -> Result<Norm, EncoderError> {
        Ok(Norm {
            weight: self.var(&format!("{prefix}.weight"), &[size])?,
            bias: self.var(&format!("{prefix}.bias"), &[size])?,
        })
    }
}

impl Bert {
    /// Builds the encoder from checkpoint tensors (names with or without `bert.`). `source`
    /// names the file in errors.
    pub fn from_tensors(
        config: BertConfig,
        tensors: HashMap<String, Tensor>,
        source: &str,
        device: &Device,
    ) -> Result<Bert, EncoderError> {
        config.validate().map_err(|message| EncoderError::Config {
            file: source.to_string(),
            message,
        })?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((canonical_name(&k), v.to_device(device)?)))
            .collect::<CandleResult<HashMap<_, _>>>()?;
        let mut l = Loader {
            tensors,
            params: Vec::new(),
            source,
        };
        let h = config.hidden_size;
        let word = l.var("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = l.var(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type = l.var(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let embedding_norm = l.norm("embeddings.LayerNorm", h)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                query: l.linear(&format!("{p}.attention.self.query"), h, h)?,
                key: l.linear(&format!("{p}.attention.self.key"), h, h)?,
                value: l.linear(&format!("{p}.attention.self.value"), h, h)?,
                attention_out: l.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: l.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: l.linear(
                    &format!("{p}.intermediate.dense"),
                    config.intermediate_size,
                    h,
                )?,
                output: l.linear(&format!("{p}.output.dense"), h, config.intermediate_size)?,
                output_norm: l.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        let mut passthrough: Vec<(String, Tensor)> = l
            .tensors
            .into_iter()
            // Buffers, not weights: transformers recreates them.
            .filter(|(k, _)| !k.ends_with("position_ids"))
            .collect();
        passthrough.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Bert {
            config,
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            params: l.params,
            passthrough,
            device: device.clone(),
            product: None,
        })
    }

    /// A randomly initialized encoder (small uniform weights, norms near 1) in `dtype`, for
    /// tests and gradient checks.
    pub fn random(
        config: BertConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Bert, EncoderError> {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let h = config.hidden_size;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![config.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![config.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![config.type_vocab_size, h],
            ),
        ];
        let norm = |p: &str| {
            [
                (format!("{p}.weight"), vec![h]),
                (format!("{p}.bias"), vec![h]),
            ]
        };
        let linear = |p: &str, o: usize, i: usize| {
            [
                (format!("{p}.weight"), vec![o, i]),
                (format!("{p}.bias"), vec![o]),
            ]
        };
        shapes.extend(norm("embeddings.LayerNorm"));
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for s in ["query", "key", "value"] {
                shapes.extend(linear(&format!("{p}.attention.self.{s}"), h, h));
            }
            shapes.extend(linear(&format!("{p}.attention.output.dense"), h, h));
            shapes.extend(norm(&format!("{p}.attention.output.LayerNorm")));
            let inter = config.intermediate_size;
            shapes.extend(linear(&format!("{p}.intermediate.dense"), inter, h));
            shapes.extend(linear(&format!("{p}.output.dense"), h, inter));
            shapes.extend(norm(&format!("{p}.output.LayerNorm")));
        }
        let mut tensors = HashMap::new();
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains("LayerNorm.weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.random::<f32>()).collect()
            } else {
                (0..n)
                    .map(|_| 0.02 * (rng.random::<f32>() * 2.0 - 1.0) * 1.7)
                    .collect()
            };
            tensors.insert(
                name,
                Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?,
            );
        }
        Bert::from_tensors(config, tensors, "<random>", device)
    }

    /// Runs the matrix products in `precision` (parameters, norms, softmax and everything
    /// after the encoder stay in the parameters' dtype).
    pub fn with_precision(mut self, precision: Precision) -> Bert {
        self.product = precision.product_dtype();
        self
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trainable parameter with its checkpoint name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Tensors to save: trained parameters and the untouched passthrough ones.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .chain(self.passthrough.iter().cloned())
            .collect()
    }

    fn activation(&self, x: &Tensor) -> CandleResult<Tensor> {
        match self.config.hidden_act.as_str() {
            "gelu" => ops::gelu_erf(x),
            "gelu_new" => x.gelu(),
            _ => x.relu(),
        }
    }

    /// Token states (B, T, H) for token ids (B, T) u32 and an attention mask (B, T) of 0/1
    /// u32. `dropout` is `Some` in training mode. Between layers the states are (B·T, H).
    pub(crate) fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut dropout: Option<&mut Dropout>,
    ) -> CandleResult<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let h = c.hidden_size;
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let words = self
            .word
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let types = self.token_type.as_tensor().narrow(0, 0, 1)?;
        let x = words
            .broadcast_add(&self.position.as_tensor().index_select(&positions, 0)?)?
            .broadcast_add(&types)?
            .reshape((b * t, h))?;
        let x = ops::layer_norm(
            &x,
            &self.embedding_norm.weight,
            &self.embedding_norm.bias,
            c.layer_norm_eps,
        )?;
        let mut x = maybe_dropout(x, &mut dropout, c.hidden_dropout_prob)?;
        let attention = SelfAttention::new(mask, c.num_attention_heads, x.dtype(), self.product)?;
        let linear = |x: &Tensor, l: &Linear| -> CandleResult<Tensor> {
            ops::linear(x, l.weight.as_tensor(), l.bias.as_tensor(), self.product)
        };
        for layer in &self.layers {
            let context = attention.forward(
                &x,
                [&layer.query, &layer.key, &layer.value].map(Linear::projection),
                &mut dropout,
                c.attention_probs_dropout_prob,
            )?;
            let a = linear(&context, &layer.attention_out)?;
            let a = maybe_dropout(a, &mut dropout, c.hidden_dropout_prob)?;
            let a = ops::layer_norm(
                &(a + &x)?,
                &layer.attention_norm.weight,
                &layer.attention_norm.bias,
                c.layer_norm_eps,
            )?;
            let i = self.activation(&linear(&a, &layer.intermediate)?)?;
            let o = linear(&i, &layer.output)?;
            let o = maybe_dropout(o, &mut dropout, c.hidden_dropout_prob)?;
            x = ops::layer_norm(
                &(o + a)?,
                &layer.output_norm.weight,
                &layer.output_norm.bias,
                c.layer_norm_eps,
            )?;
        }
        x.reshape((b, t, h))
    }

    /// Pooled sentence embeddings (B, H).
    pub fn embed(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        pooling: Pooling,
        normalize: bool,
        dropout: Option<&mut Dropout>,
    ) -> CandleResult<Tensor> {
        let hidden = self.forward(ids, mask, dropout)?;
        let pooled = match pooling {
            Pooling::Mean => ops::mean_pool(&hidden, mask)?,
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        if normalize {
            ops::l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// Pads token id lists into (ids, mask) tensors of shape (B, longest).
pub fn pad_batch(batch: &[&[u32]], pad_id: u32, device: &Device) -> CandleResult<(Tensor, Tensor)> {
    let t = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(batch.len() * t);
    let mut mask = Vec::with_capacity(batch.len() * t);
    for seq in batch {
        ids.extend_from_slice(seq);
        ids.extend(std::iter::repeat_n(pad_id, t - seq.len()));
        mask.extend(std::iter::repeat_n(1u32, seq.len()));
        mask.extend(std::iter::repeat_n(0u32, t - seq.len()));
    }
    let shape = (batch.len(), t);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}
