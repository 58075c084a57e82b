//! Multi-head self-attention, softmax(q kᵀ · scale + mask) v with dropout on the probabilities.
//!
//! On the CPU in full precision it is one op over the fused (rows, 3 H) projection [q | k | v]:
//! each sequence's heads are read in place (no head split, transpose or copy), the masked
//! softmax and dropout run on one (T x T) block at a time, and the backward pass recomputes the
//! probabilities and regenerates the dropout mask instead of keeping them. candle's autograd
//! adds a zeroed buffer to every gradient it receives, so each of the dozen tensors the
//! primitive form leaves in the graph (three of them T x T per head) cost a fill, a read and a
//! write backward; this form leaves two, neither T x T. Elsewhere (CUDA, mixed precision) the
//! primitive ops run: the same function, tested against each other.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    DropMask, Dropout, Real, linear, masked_softmax, matmul, max_of, maybe_dropout, sum_of,
    unsupported, values,
};
use crate::linalg::{Strided, product};

/// Self-attention for one batch: which positions each sequence attends, the head layout, and
/// whether it runs fused ([`FusedAttention`]) or from primitive ops.
pub(crate) struct SelfAttention {
    batch: usize,
    seq: usize,
    heads: usize,
    form: Form,
    product: Option<DType>,
}

enum Form {
    /// Per sequence and key position, whether it is attended (mask 1).
    Fused(Arc<[bool]>),
    /// The additive mask bias (B, 1, 1, T) for the primitive ops.
    Primitive(Tensor),
}

/// A projection's weight and bias.
pub(crate) type Projection<'a> = (&'a Tensor, &'a Tensor);

impl SelfAttention {
    /// For an attention mask (B, T) of 0/1 u32, token states of `dtype`, and matrix products in
    /// `product` (see [`matmul`]).
    pub(crate) fn new(
        mask: &Tensor,
        heads: usize,
        dtype: DType,
        product: Option<DType>,
    ) -> Result<SelfAttention> {
        let fused = mask.device().is_cpu() && product.is_none_or(|p| p == dtype);
        SelfAttention::with_form(mask, heads, dtype, product, fused)
    }

    /// [`SelfAttention::new`] with the form chosen by the caller.
    fn with_form(
        mask: &Tensor,
        heads: usize,
        dtype: DType,
        product: Option<DType>,
        fused: bool,
    ) -> Result<SelfAttention> {
        let (batch, seq) = mask.dims2()?;
        let form = if fused {
            let mask = mask.flatten_all()?.to_vec1::<u32>()?;
            Form::Fused(mask.iter().map(|&m| m != 0).collect())
        } else {
            let bias = ((mask.to_dtype(dtype)? - 1.0)? * 1e9)?;
            Form::Primitive(bias.reshape((batch, 1, 1, seq))?)
        };
        Ok(SelfAttention {
            batch,
            seq,
            heads,
            form,
            product,
        })
    }

    /// The attention context (B·T, H) of token states `x` (B·T, H), with the query, key and
    /// value projections, and dropout `p` on the probabilities when `dropout` is given.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        [q, k, v]: [Projection<'_>; 3],
        dropout: &mut Option<&mut Dropout>,
        p: f64,
    ) -> Result<Tensor> {
        let (b, t, heads) = (self.batch, self.seq, self.heads);
        let (_, h) = x.dims2()?;
        let hd = h / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        match &self.form {
            Form::Fused(attended) => {
                // One product for the three projections (the weights stacked: a small copy).
                let weight = Tensor::cat(&[q.0, k.0, v.0], 0)?;
                let bias = Tensor::cat(&[q.1, k.1, v.1], 0)?;
                let qkv = linear(x, &weight, &bias, self.product)?;
                qkv.apply_op1(FusedAttention {
                    batch: b,
                    seq: t,
                    heads,
                    scale,
                    attended: attended.clone(),
                    dropout: dropout.as_mut().and_then(|d| d.draw(p)),
                })
            }
            Form::Primitive(bias) => {
                let split = |(w, bias): Projection<'_>| -> Result<Tensor> {
                    linear(x, w, bias, self.product)?
                        .reshape((b, t, heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                // Scaling the queries rather than the scores touches a quarter as many values.
                let (q, k, v) = ((split(q)? * scale)?, split(k)?, split(v)?);
                let scores = matmul(&q, &k.t()?, self.product)?;
                let probs = maybe_dropout(masked_softmax(&scores, bias)?, dropout, p)?;
                matmul(&probs, &v, self.product)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b * t, h))
            }
        }
    }
}

/// (B·T, 3 H) [q | k | v] -> the context (B·T, H): [`SelfAttention`] on the CPU.
#[derive(Clone)]
struct FusedAttention {
    batch: usize,
    seq: usize,
    heads: usize,
    scale: f64,
    attended: Arc<[bool]>,
    dropout: Option<DropMask>,
}

/// Which third of a [q | k | v] row.
#[derive(Clone, Copy)]
enum Part {
    Query = 0,
    Key = 1,
    Value = 2,
}

impl FusedAttention {
    fn check(&self, l: &Layout) -> Result<usize> {
        let (rows, cols) = l.shape().dims2()?;
        if rows != self.batch * self.seq || cols % (3 * self.heads) != 0 {
            candle_core::bail!(
                "attention over {rows} x {cols} projections for {} sequences of {} with {} heads",
                self.batch,
                self.seq,
                self.heads
            );
        }
        Ok(cols / 3)
    }

    /// One head's (T x head_dim) part of a sequence's (T x 3 H) projections, read in place.
    fn part<'a, T>(&self, slab: &'a [T], part: Part, head: usize, h: usize) -> Strided<'a, T> {
        let hd = h / self.heads;
        Strided {
            data: &slab[part as usize * h + head * hd..],
            rows: self.seq,
            cols: hd,
            row_stride: 3 * h,
            col_stride: 1,
        }
    }

    /// The dropout stream of (sequence, head): masks depend on neither thread count nor order.
    fn stream(&self, b: usize, head: usize) -> u64 {
        (b * self.heads + head) as u64
    }

    /// Sequence `b`'s key mask as factors (1 attended, 0 not) and additive biases (0, or a
    /// value far below any score).
    fn key_mask<T: Real>(&self, b: usize) -> (Vec<T>, Vec<T>) {
        let attended = &self.attended[b * self.seq..(b + 1) * self.seq];
        let factor = |a: bool, yes: f64, no: f64| T::from_f64(if a { yes } else { no });
        attended
            .iter()
            .map(|&a| (factor(a, 1.0, 0.0), factor(a, 0.0, -1e30)))
            .unzip()
    }

    /// Sequence `b`'s attention probabilities for `head` (before dropout) into `probs` (T x T),
    /// with `b`'s [`Self::key_mask`]: masked keys get exactly 0.
    fn probabilities<T: Real>(
        &self,
        slab: &[T],
        head: usize,
        h: usize,
        (keep, bias): (&[T], &[T]),
        probs: &mut [T],
    ) {
        let t = self.seq;
        let (q, k) = (
            self.part(slab, Part::Query, head, h),
            self.part(slab, Part::Key, head, h),
        );
        product(q, k.t(), probs, t, false, false);
        let scale = T::from_f64(self.scale);
        for row in probs.chunks_exact_mut(t) {
            for (s, &bias) in row.iter_mut().zip(bias) {
                *s = *s * scale + bias;
            }
            let max = max_of(row);
            for (s, &keep) in row.iter_mut().zip(keep) {
                *s = (*s - max).exp() * keep;
            }
            let sum = sum_of(row);
            // A sequence with no attended position (never from a tokenizer) attends nothing.
            let inv = if sum > T::zero() {
                T::one() / sum
            } else {
                T::zero()
            };
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
    }

    fn forward<T: Real>(&self, qkv: &[T], h: usize) -> Vec<T> {
        let (t, hd) = (self.seq, h / self.heads);
        let mut out = vec![T::zero(); self.batch * t * h];
        out.par_chunks_mut(t * h).enumerate().for_each(|(b, out)| {
            let slab = &qkv[b * t * 3 * h..(b + 1) * t * 3 * h];
            let (keep, bias) = self.key_mask::<T>(b);
            let mut probs = vec![T::zero(); t * t];
            let mut mask = vec![T::zero(); t * t];
            for head in 0..self.heads {
                self.probabilities(slab, head, h, (&keep, &bias), &mut probs);
                if let Some(drop) = &self.dropout {
                    drop.fill(self.stream(b, head), &mut mask);
                    for (p, &m) in probs.iter_mut().zip(&mask) {
                        *p *= m;
                    }
                }
                let v = self.part(slab, Part::Value, head, h);
                product(
                    Strided::rows(&probs, t, t),
                    v,
                    &mut out[head * hd..],
                    h,
                    false,
                    false,
                );
            }
        });
        out
    }

    /// dL/d[q | k | v] from dL/dcontext, per head: with P the probabilities, M the dropout
    /// mask and D = P ⊙ M, dV = Dᵀ dC, dP = (dC Vᵀ) ⊙ M, dS = P ⊙ (dP - rowsum(dP ⊙ P)) ·
    /// scale, dQ = dS K, dK = dSᵀ Q.
    fn backward<T: Real>(&self, qkv: &[T], grad: &[T], h: usize) -> Vec<T> {
        let (t, hd) = (self.seq, h / self.heads);
        let scale = T::from_f64(self.scale);
        let mut dqkv = vec![T::zero(); qkv.len()];
        dqkv.par_chunks_mut(t * 3 * h)
            .enumerate()
            .for_each(|(b, d)| {
                let slab = &qkv[b * t * 3 * h..(b + 1) * t * 3 * h];
                let grad = &grad[b * t * h..(b + 1) * t * h];
                let mut probs = vec![T::zero(); t * t];
                let mut dprobs = vec![T::zero(); t * t];
                let (mut mask, mut dropped) = match self.dropout {
                    Some(_) => (vec![T::zero(); t * t], vec![T::zero(); t * t]),
                    None => (Vec::new(), Vec::new()),
                };
                let (keep, bias) = self.key_mask::<T>(b);
                for head in 0..self.heads {
                    self.probabilities(slab, head, h, (&keep, &bias), &mut probs);
                    let dc = Strided {
                        data: &grad[head * hd..],
                        rows: t,
                        cols: hd,
                        row_stride: h,
                        col_stride: 1,
                    };
                    let v = self.part(slab, Part::Value, head, h);
                    product(dc, v.t(), &mut dprobs, t, false, false);
                    let kept: &[T] = match &self.dropout {
                        Some(drop) => {
                            drop.fill(self.stream(b, head), &mut mask);
                            for (((d, g), &p), &m) in
                                dropped.iter_mut().zip(&mut dprobs).zip(&probs).zip(&mask)
                            {
                                *d = p * m;
                                *g *= m;
                            }
                            &dropped
                        }
                        None => &probs,
                    };
                    let dv = &mut d[2 * h + head * hd..];
                    product(Strided::rows(kept, t, t).t(), dc, dv, 3 * h, false, false);
                    for (g, p) in dprobs.chunks_exact_mut(t).zip(probs.chunks_exact(t)) {
                        let dot = g.iter().zip(p).fold(T::zero(), |a, (&g, &p)| a + g * p);
                        for (g, &p) in g.iter_mut().zip(p) {
                            *g = p * (*g - dot) * scale;
                        }
                    }
                    let ds = Strided::rows(&dprobs, t, t);
                    let (q, k) = (
                        self.part(slab, Part::Query, head, h),
                        self.part(slab, Part::Key, head, h),
                    );
                    product(ds, k, &mut d[head * hd..], 3 * h, false, false);
                    product(ds.t(), q, &mut d[h + head * hd..], 3 * h, false, false);
                }
            });
        dqkv
    }
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "attention_fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = self.check(l)?;
        let storage = float_storage!(s, T => Ok::<_, candle_core::Error>(
            self.forward::<T>(values(s, l)?, h)
        ));
        Ok((storage, Shape::from((self.batch * self.seq, h))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grads = AttentionGrads(self.clone());
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &grads)?))
    }
}

/// ([q | k | v], dL/dcontext) -> dL/d[q | k | v] for [`FusedAttention`].
struct AttentionGrads(FusedAttention);

impl CustomOp2 for AttentionGrads {
    fn name(&self) -> &'static str {
        "attention_fused_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = self.0.check(l1)?;
        if l2.shape().dims2()? != (self.0.batch * self.0.seq, h) {
            candle_core::bail!("attention gradient {:?} for {:?}", l2.shape(), l1.shape());
        }
        let storage = float_storage!(s1, T => Ok::<_, candle_core::Error>(
            self.0.backward::<T>(values(s1, l1)?, values(s2, l2)?, h)
        ));
        Ok((storage, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_close, value_and_grads, var};
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const LENGTHS: [usize; 3] = [7, 4, 1];
    const SEQ: usize = 7;
    const HIDDEN: usize = 12;
    const HEADS: usize = 3;

    fn draw(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
    }

    /// The mask (B, T) of sequences of [`LENGTHS`], padded to [`SEQ`].
    fn mask() -> Tensor {
        let mask: Vec<u32> = LENGTHS
            .iter()
            .flat_map(|&n| (0..SEQ).map(move |i| u32::from(i < n)))
            .collect();
        Tensor::from_vec(mask, (LENGTHS.len(), SEQ), &Device::Cpu).unwrap()
    }

    /// The fused op computes what the primitive ops (the GPU path) do, in value and in the
    /// gradients of the states and all six projection parameters, in f64 and f32, with padded
    /// sequences (one of a single token); its gradients carry no graph.
    #[test]
    fn fused_attention_matches_the_primitive_ops_and_their_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let rows = LENGTHS.len() * SEQ;
        let (xv, probe) = (draw(&mut rng, rows * HIDDEN), draw(&mut rng, rows * HIDDEN));
        let params: Vec<(Vec<f64>, Vec<f64>)> = (0..3)
            .map(|_| (draw(&mut rng, HIDDEN * HIDDEN), draw(&mut rng, HIDDEN)))
            .collect();
        let labels = ["value", "dx", "dwq", "dbq", "dwk", "dbk", "dwv", "dbv"];
        for dtype in [DType::F64, DType::F32] {
            let x = var(&xv, &[rows, HIDDEN], dtype);
            let probe = var(&probe, &[rows, HIDDEN], dtype);
            let params: Vec<(Var, Var)> = params
                .iter()
                .map(|(w, b)| (var(w, &[HIDDEN, HIDDEN], dtype), var(b, &[HIDDEN], dtype)))
                .collect();
            let run = |attention: SelfAttention| {
                let projections =
                    [0, 1, 2].map(|i| (params[i].0.as_tensor(), params[i].1.as_tensor()));
                let y = attention
                    .forward(x.as_tensor(), projections, &mut None, 0.0)
                    .unwrap();
                let vars: Vec<&Var> = std::iter::once(&x)
                    .chain(params.iter().flat_map(|(w, b)| [w, b]))
                    .collect();
                value_and_grads(&y, &probe, &vars)
            };
            let fused = SelfAttention::new(&mask(), HEADS, dtype, None).unwrap();
            assert!(matches!(fused.form, Form::Fused(_)));
            let primitive = SelfAttention::with_form(&mask(), HEADS, dtype, None, false).unwrap();
            let ((f, tracks), (p, _)) = (run(fused), run(primitive));
            assert!(!tracks, "a gradient tracks its graph");
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            assert_close(&format!("attention {dtype:?}"), &labels, &f, &p, tolerance);
        }
    }

    /// With dropout on the probabilities, the fused op's gradient (which regenerates the mask)
    /// agrees with finite differences of its forward pass; the dropout changes the output.
    #[test]
    fn fused_attention_with_dropout_has_the_gradient_of_its_forward() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let rows = LENGTHS.len() * SEQ;
        let qkv = Var::from_vec(
            draw(&mut rng, rows * 3 * HIDDEN),
            (rows, 3 * HIDDEN),
            &Device::Cpu,
        )
        .unwrap();
        let probe =
            Tensor::from_vec(draw(&mut rng, rows * HIDDEN), (rows, HIDDEN), &Device::Cpu).unwrap();
        let attended: Arc<[bool]> = mask()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .map(|&m| m == 1)
            .collect();
        let op = |dropout| FusedAttention {
            batch: LENGTHS.len(),
            seq: SEQ,
            heads: HEADS,
            scale: 0.5,
            attended: attended.clone(),
            dropout,
        };
        let dropped = op(Some(DropMask { key: 9, keep: 0.7 }));
        let loss = |qkv: &Tensor| -> Tensor {
            let y = qkv.apply_op1(dropped.clone()).unwrap();
            (y * &probe).unwrap().sum_all().unwrap()
        };
        let plain = qkv.as_tensor().apply_op1(op(None)).unwrap();
        let with_dropout = qkv.as_tensor().apply_op1(dropped.clone()).unwrap();
        let change = (plain - with_dropout)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(change > 0.01, "dropout changed the output by {change}");
        let grads = loss(qkv.as_tensor()).backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(qkv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original: Vec<f64> = qkv.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let step = 1e-6;
        for i in (0..original.len()).step_by(7) {
            let at = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, qkv.shape(), &Device::Cpu).unwrap();
                loss(&t).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(step) - at(-step)) / (2.0 * step);
            let tolerance = 1e-7 + 1e-6 * numeric.abs();
            assert!(
                (numeric - analytic[i]).abs() <= tolerance,
                "d[{i}]: analytic {} numeric {numeric}",
                analytic[i]
            );
        }
    }
}
