//! A llama-architecture decoder (SmolLM2, Llama and their GGUF files) that runs many sequences
//! in one forward pass, for continuous batching: every linear layer is one product over the new
//! tokens of all sequences, so its weights are read once per step however many sequences
//! decode; each sequence attends over its own KV cache.
//!
//! Weights stay in the file's 32-weight blocks where `blocks` has a kernel for the format (f32
//! otherwise); a prompt being read goes through the f32 GEMM kernels instead. The arithmetic
//! follows candle's `quantized_llama` operation for operation (RMS norm, interleaved RoPE,
//! SiLU, softmax); only the products are summed in orders of their own.

use std::fs::File;

use crate::allocator::TensorWork;

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, bail};
use rayon::prelude::*;

use super::blocks::BlockMatrix;
use crate::linalg::{Strided, product, xwt};

#[derive(Debug, Clone, Copy)]
struct Dims {
    dim: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    eps: f32,
}

impl Dims {
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// A row of the fused query/key/value projection.
    fn qkv_dim(&self) -> usize {
        self.dim + 2 * self.kv_dim()
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// The query, key and value weights stacked.
    qkv: Weights,
    output: Weights,
    ffn_norm: Vec<f32>,
    /// The gate and up weights stacked.
    gate_up: Weights,
    down: Weights,
}

pub struct Llama {
    dims: Dims,
    context: usize,
    /// vocab x dim.
    embeddings: Vec<f32>,
    lm_head: Weights,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// RoPE's frequencies, one per pair of a head's dimensions.
    inv_freq: Vec<f32>,
    /// Keeps freed tensor buffers cached for reuse while this exists.
    _tensor_work: TensorWork,
}

/// One sequence's attention keys and values, a vector per layer, position-major:
/// `[position][kv_head][head_dim]`.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// The new tokens of one sequence in a forward pass (at positions `cache.len()..`), and
/// whether the logits after its last token are wanted.
pub struct Chunk<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: bool,
}

fn metadata_u32(content: &gguf_file::Content, key: &str) -> candle_core::Result<Option<usize>> {
    content
        .metadata
        .get(key)
        .map(|v| v.to_u32().map(|n| n as usize))
        .transpose()
}

fn required_u32(content: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    metadata_u32(content, key)?
        .ok_or_else(|| candle_core::Error::Msg(format!("no `{key}` in the GGUF metadata")))
}

fn tensor(
    content: &gguf_file::Content,
    file: &mut File,
    name: &str,
    expected: &[usize],
) -> candle_core::Result<QTensor> {
    let tensor = content.tensor(file, name, &Device::Cpu)?;
    if tensor.shape().dims() != expected {
        bail!(
            "tensor `{name}` has shape {:?}, expected {expected:?}",
            tensor.shape().dims()
        );
    }
    Ok(tensor)
}

fn values(tensor: &QTensor) -> candle_core::Result<Vec<f32>> {
    tensor.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

/// Rows an elementwise task takes at least: a decoding step's few rows are not worth handing
/// to another thread.
const MIN_ROWS_PER_TASK: usize = 16;

/// From this many activation rows on (a prompt being read), block weights are expanded to f32
/// for the GEMM kernels, which reuse each weight across rows far better than the block kernel.
const DENSE_FROM_ROWS: usize = 64;

/// A linear layer's weights (outputs x inputs): in blocks where the file's format has a block
/// kernel, f32 otherwise.
enum Weights {
    Blocks(BlockMatrix),
    /// inputs x outputs: transposed, GEMM then reads them in place as its packed-friendly
    /// operand, where outputs x inputs would be repacked (a full copy) in every product.
    Dense {
        transposed: Vec<f32>,
        outputs: usize,
    },
}

impl Weights {
    /// The tensors (each `? x cols`) stacked, rows of the first first.
    fn stacked(tensors: &[QTensor], cols: usize) -> candle_core::Result<Weights> {
        let blocks = tensors
            .iter()
            .map(BlockMatrix::from_qtensor)
            .collect::<candle_core::Result<Option<Vec<_>>>>()?;
        if let Some(blocks) = blocks {
            return Ok(Weights::Blocks(BlockMatrix::stack(blocks)));
        }
        let parts = tensors
            .iter()
            .map(values)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let outputs = parts.iter().map(Vec::len).sum::<usize>() / cols;
        let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        Ok(Weights::Dense {
            transposed: transpose(&parts, outputs, cols),
            outputs,
        })
    }

    /// `out = x W^T` for `x`, `rows` x inputs.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            Weights::Blocks(m) if rows < DENSE_FROM_ROWS => m.product(x, rows, out),
            Weights::Blocks(m) => {
                let dense = m.dequantize();
                xwt(x, &dense, out, (rows, m.cols(), m.rows()), false);
            }
            Weights::Dense {
                transposed,
                outputs,
            } => {
                let inputs = transposed.len() / outputs;
                let x = Strided::rows(x, rows, inputs);
                let w = Strided::rows(&transposed[..], inputs, *outputs);
                product(x, w, out, *outputs, false, true);
            }
        }
    }
}

impl Llama {
    /// Reads a GGUF file of the llama architecture.
    pub fn from_gguf(content: &gguf_file::Content, file: &mut File) -> candle_core::Result<Llama> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!("architecture `{arch}` is not supported (llama is)");
        }
        let heads = required_u32(content, "llama.attention.head_count")?;
        let kv_heads = required_u32(content, "llama.attention.head_count_kv")?;
        let dim = required_u32(content, "llama.embedding_length")?;
        let ffn = required_u32(content, "llama.feed_forward_length")?;
        let blocks = required_u32(content, "llama.block_count")?;
        if heads == 0 || kv_heads == 0 || dim % heads != 0 || heads % kv_heads != 0 {
            bail!("{heads} heads, {kv_heads} key/value heads and width {dim} do not fit");
        }
        let head_dim = dim / heads;
        let rope_dim = metadata_u32(content, "llama.rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim != head_dim {
            bail!("RoPE over {rope_dim} of {head_dim} head dimensions is not supported");
        }
        let eps = content
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .ok_or_else(|| candle_core::Error::Msg("no RMS norm epsilon in the metadata".into()))?
            .to_f32()?;
        let freq_base = match content.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10000.0,
        };
        let context = metadata_u32(content, "llama.context_length")?.unwrap_or(2048);
        let embedding_info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| candle_core::Error::Msg("no tensor `token_embd.weight`".into()))?;
        let shape = embedding_info.shape.dims().to_vec();
        if shape.len() != 2 || shape[1] != dim {
            bail!("tensor `token_embd.weight` has shape {shape:?}, expected [vocab, {dim}]");
        }
        let token_embd = tensor(content, file, "token_embd.weight", &shape)?;
        let embeddings = values(&token_embd)?;
        let dims = Dims {
            dim,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab: shape[0],
            eps,
        };
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            tensor(content, file, "output.weight", &shape)?
        } else {
            token_embd // tied
        };
        let lm_head = Weights::stacked(&[lm_head], dim)?;
        let norm = values(&tensor(content, file, "output_norm.weight", &[dim])?)?;
        let kv_dim = dims.kv_dim();
        let mut layers = Vec::with_capacity(blocks);
        for b in 0..blocks {
            let mut read = |name: &str, shape: &[usize]| {
                tensor(content, file, &format!("blk.{b}.{name}.weight"), shape)
            };
            let qkv = [
                read("attn_q", &[dim, dim])?,
                read("attn_k", &[kv_dim, dim])?,
                read("attn_v", &[kv_dim, dim])?,
            ];
            let gate_up = [read("ffn_gate", &[ffn, dim])?, read("ffn_up", &[ffn, dim])?];
            layers.push(Layer {
                attn_norm: values(&read("attn_norm", &[dim])?)?,
                qkv: Weights::stacked(&qkv, dim)?,
                output: Weights::stacked(&[read("attn_output", &[dim, dim])?], dim)?,
                ffn_norm: values(&read("ffn_norm", &[dim])?)?,
                gate_up: Weights::stacked(&gate_up, dim)?,
                down: Weights::stacked(&[read("ffn_down", &[dim, ffn])?], ffn)?,
            });
        }
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
            .collect();
        Ok(Llama {
            dims,
            context,
            embeddings,
            lm_head,
            layers,
            norm,
            inv_freq,
            _tensor_work: TensorWork::begin(),
        })
    }

    /// The longest sequence (prompt and answer) the model was trained for.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn vocab(&self) -> usize {
        self.dims.vocab
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            keys: vec![Vec::new(); self.layers.len()],
            values: vec![Vec::new(); self.layers.len()],
            len: 0,
        }
    }

    /// Runs the chunks' tokens through the model, appending their keys and values to their
    /// caches, and returns the next-token logits (`vocab` each) of the chunks that asked for
    /// them, in order. Runs on the current rayon pool.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Vec<f32> {
        let d = self.dims;
        let (dim, qkv_dim) = (d.dim, d.qkv_dim());
        // The position of every row of the batch in its sequence.
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|chunk| chunk.cache.len..chunk.cache.len + chunk.tokens.len())
            .collect();
        let n = positions.len();
        let mut x = Vec::with_capacity(n * dim);
        for &token in chunks.iter().flat_map(|c| c.tokens) {
            x.extend_from_slice(&self.embeddings[token as usize * dim..][..dim]);
        }
        let rope = self.rope_table(&positions);
        let mut normed = vec![0f32; n * dim];
        let mut qkv = vec![0f32; n * qkv_dim];
        let mut projected = vec![0f32; n * dim];
        let mut gate_up = vec![0f32; n * 2 * d.ffn];
        let mut act = vec![0f32; n * d.ffn];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, d.eps, &mut normed);
            layer.qkv.apply(&normed, n, &mut qkv);
            self.rotate(&mut qkv, &rope);
            let mut row = 0;
            for chunk in chunks.iter_mut() {
                for _ in 0..chunk.tokens.len() {
                    let r = &qkv[row * qkv_dim..][..qkv_dim];
                    chunk.cache.keys[l].extend_from_slice(&r[dim..dim + d.kv_dim()]);
                    chunk.cache.values[l].extend_from_slice(&r[dim + d.kv_dim()..]);
                    row += 1;
                }
            }
            let attended = self.attend(chunks, l, &qkv);
            layer.output.apply(&attended, n, &mut projected);
            add_assign(&mut x, &projected);
            rms_norm(&x, &layer.ffn_norm, d.eps, &mut normed);
            layer.gate_up.apply(&normed, n, &mut gate_up);
            act.par_chunks_mut(d.ffn)
                .zip(gate_up.par_chunks(2 * d.ffn))
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|(a, gu)| {
                    let (gate, up) = gu.split_at(d.ffn);
                    for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
                        *a = g / (1.0 + (-g).exp()) * u;
                    }
                });
            layer.down.apply(&act, n, &mut projected);
            add_assign(&mut x, &projected);
        }
        for chunk in chunks.iter_mut() {
            chunk.cache.len += chunk.tokens.len();
        }
        // Only the rows whose logits are wanted go through the final norm and the head.
        let mut last = Vec::new();
        let mut end = 0;
        for chunk in chunks.iter() {
            end += chunk.tokens.len();
            if chunk.logits {
                last.extend_from_slice(&x[(end - 1) * dim..end * dim]);
            }
        }
        let picked = last.len() / dim;
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, d.eps, &mut normed);
        let mut logits = vec![0f32; picked * d.vocab];
        self.lm_head.apply(&normed, picked, &mut logits);
        logits
    }

    /// cos and sin of every row's rotation angles, interleaved: `[row][pair][cos, sin]`.
    fn rope_table(&self, positions: &[usize]) -> Vec<[f32; 2]> {
        positions
            .iter()
            .flat_map(|&position| {
                self.inv_freq.iter().map(move |&f| {
                    let angle = position as f32 * f;
                    [angle.cos(), angle.sin()]
                })
            })
            .collect()
    }

    /// RoPE on the query and key heads of every row, rotating interleaved pairs as llama's
    /// GGUF layout expects.
    fn rotate(&self, qkv: &mut [f32], rope: &[[f32; 2]]) {
        let d = self.dims;
        let pairs = self.inv_freq.len();
        let rotated = (d.heads + d.kv_heads) * d.head_dim;
        qkv.par_chunks_mut(d.qkv_dim())
            .zip(rope.par_chunks(pairs))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(row, angles)| {
                for head in row[..rotated].chunks_exact_mut(d.head_dim) {
                    for (pair, &[cos, sin]) in head.chunks_exact_mut(2).zip(angles) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos - b * sin;
                        pair[1] = a * sin + b * cos;
                    }
                }
            });
    }

    /// Causal attention of every row over its own sequence's cache (which already holds the
    /// rows' keys and values), two small GEMMs per task. A task is one head over a chunk's
    /// rows or, for a chunk of one token (decoding), the heads sharing a key/value head: their
    /// queries are then adjacent, one matrix, and the cache is read once for all of them.
    fn attend(&self, chunks: &[Chunk<'_>], layer: usize, qkv: &[f32]) -> Vec<f32> {
        let d = self.dims;
        let (hd, kv_dim, qkv_dim) = (d.head_dim, d.kv_dim(), d.qkv_dim());
        let group = d.heads / d.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut firsts = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for chunk in chunks {
            firsts.push(row);
            row += chunk.tokens.len();
        }
        // (chunk, first head, heads)
        let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
        for (c, chunk) in chunks.iter().enumerate() {
            if chunk.tokens.len() == 1 {
                tasks.extend((0..d.kv_heads).map(|g| (c, g * group, group)));
            } else {
                tasks.extend((0..d.heads).map(|h| (c, h, 1)));
            }
        }
        let outputs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(c, h, heads)| {
                let chunk = &chunks[c];
                let rows = chunk.tokens.len();
                let past = chunk.cache.len; // positions before this pass's tokens
                let keys_len = past + rows;
                let kv_offset = (h / group) * hd;
                let keys = &chunk.cache.keys[layer][kv_offset..];
                let values = &chunk.cache.values[layer][kv_offset..];
                // Matrix row i: head h + i of the one token, or head h of token i.
                let (m, row_stride) = if heads > 1 {
                    (heads, hd)
                } else {
                    (rows, qkv_dim)
                };
                let queries = Strided {
                    data: &qkv[firsts[c] * qkv_dim + h * hd..],
                    rows: m,
                    cols: hd,
                    row_stride,
                    col_stride: 1,
                };
                let cached = |data| Strided {
                    data,
                    rows: keys_len,
                    cols: hd,
                    row_stride: kv_dim,
                    col_stride: 1,
                };
                let mut scores = vec![0f32; m * keys_len];
                product(
                    queries,
                    cached(keys).t(),
                    &mut scores,
                    keys_len,
                    false,
                    false,
                );
                for (i, row) in scores.chunks_exact_mut(keys_len).enumerate() {
                    let token = if heads > 1 { 0 } else { i };
                    let (seen, future) = row.split_at_mut(past + token + 1);
                    softmax_scaled(seen, scale);
                    future.fill(0.0);
                }
                let mut out = vec![0f32; m * hd];
                let weights = Strided::rows(&scores[..], m, keys_len);
                product(weights, cached(values), &mut out, hd, false, false);
                out
            })
            .collect();
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut attended = vec![0f32; total * d.dim];
        for (&(c, h, heads), out) in tasks.iter().zip(&outputs) {
            for (i, o) in out.chunks_exact(hd).enumerate() {
                let (token, head) = if heads > 1 { (0, h + i) } else { (i, h) };
                attended[(firsts[c] + token) * d.dim + head * hd..][..hd].copy_from_slice(o);
            }
        }
        attended
    }
}

/// Softmax of `scale * row`, in place.
fn softmax_scaled(row: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for v in row.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// RMS norm of each row of `x` times `weight`, into `out` (candle's order of operations).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each(|(o, x)| {
            let sum2: f32 = x.iter().map(|v| v * v).sum();
            let m = (sum2 / dim as f32 + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = v / m * w;
            }
        });
}

/// The matrices (each `? x cols`, together `rows x cols`) stacked, then transposed.
fn transpose(parts: &[&[f32]], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    let stacked = parts.iter().flat_map(|p| p.chunks_exact(cols));
    for (r, row) in stacked.enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}
