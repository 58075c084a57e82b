//! Layer norm, softmax, linear and dropout written with candle's primitive ops only, so that
//! every one of them has a backward pass (candle's fused versions have none).

use candle_core::cpu::erf::{erf_f32, erf_f64};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor, Var, WithDType,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// y = x W^T + b over the last dimension, for x of any rank.
pub fn linear(x: &Tensor, weight: &Var, bias: &Var) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, cols) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let y = x
        .reshape((rows, cols))?
        .matmul(&weight.as_tensor().t()?)?
        .broadcast_add(bias.as_tensor())?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = weight.dims()[0];
    y.reshape(out)
}

/// Layer normalization over the last dimension (biased variance, as PyTorch).
pub(crate) fn layer_norm(x: &Tensor, weight: &Var, bias: &Var, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(weight.as_tensor())?
        .broadcast_add(bias.as_tensor())
}

/// Softmax over the last dimension. The row maximum is subtracted for stability and detached:
/// its gradient contributions cancel exactly.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), as one op whose backward is one pass too.
/// candle's `gelu_erf` builds its gradient from a dozen elementwise ops over the whole
/// (tokens x intermediate) activation, the largest tensor of a layer.
/// On other devices (CUDA) it is candle's own `gelu_erf`, whose kernels run there and whose
/// backward is made of elementwise ops: the same function and gradient (tested on the CPU).
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

/// dGELU/dx = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi).
fn gelu_erf_grad(x: f64) -> f64 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    0.5 * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
        + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

/// `f` applied to the contiguous f32 or f64 values of one or two tensors, in parallel.
fn map_float(
    a: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    f32_fn: impl Fn(f32, f32) -> f32 + Sync,
    f64_fn: impl Fn(f64, f64) -> f64 + Sync,
) -> Result<(CpuStorage, Shape)> {
    fn values<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
        Ok(&s.as_slice::<T>()?[start..end])
    }
    fn map<T: WithDType>(x: &[T], y: Option<&[T]>, f: &(impl Fn(T, T) -> T + Sync)) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        let chunk = 1 << 14;
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            let xs = &x[i * chunk..i * chunk + o.len()];
            match y {
                Some(y) => {
                    let ys = &y[i * chunk..i * chunk + o.len()];
                    for ((o, &x), &y) in o.iter_mut().zip(xs).zip(ys) {
                        *o = f(x, y);
                    }
                }
                None => {
                    for (o, &x) in o.iter_mut().zip(xs) {
                        *o = f(x, T::zero());
                    }
                }
            }
        });
        out
    }
    let shape = a.1.shape().clone();
    let storage = match a.0 {
        CpuStorage::F32(_) => {
            let y = b.map(|(s, l)| values::<f32>(s, l)).transpose()?;
            CpuStorage::F32(map(values::<f32>(a.0, a.1)?, y, &f32_fn))
        }
        CpuStorage::F64(_) => {
            let y = b.map(|(s, l)| values::<f64>(s, l)).transpose()?;
            CpuStorage::F64(map(values::<f64>(a.0, a.1)?, y, &f64_fn))
        }
        other => {
            use candle_core::backend::BackendStorage;
            return Err(candle_core::Error::UnsupportedDTypeForOp(
                other.dtype(),
                "gelu_erf",
            ));
        }
    };
    Ok((storage, shape))
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu_erf_fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_float(
            (s, l),
            None,
            |x, _| 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)),
            |x, _| 0.5 * x * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2)),
        )
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

/// (x, dL/dy) -> dL/dx for [`GeluErf`].
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "gelu_erf_fused_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_float(
            (s1, l1),
            Some((s2, l2)),
            |x, g| g * gelu_erf_grad(f64::from(x)) as f32,
            |x, g| g * gelu_erf_grad(x),
        )
    }
}

/// Inverted dropout with masks drawn from a seeded generator, so a training step is a pure
/// function of (weights, batch, seed, step): resuming reproduces an uninterrupted run.
pub struct Dropout {
    rng: ChaCha8Rng,
}

impl Dropout {
    pub fn new(rng: ChaCha8Rng) -> Dropout {
        Dropout { rng }
    }

    pub(crate) fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        // A kept element draws a u32 below keep * 2^32. The mask is drawn in parallel chunks,
        // chunk i from stream i of a generator keyed by one draw of `rng`: the same mask for
        // any number of threads (masks of attention probabilities run to millions of values).
        let threshold = (keep * 4_294_967_296.0) as u64;
        let key = self.rng.random::<u64>();
        let mut mask = vec![0f32; x.elem_count()];
        mask.par_chunks_mut(DROPOUT_CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut rng = ChaCha8Rng::seed_from_u64(key);
                rng.set_stream(i as u64);
                for m in chunk {
                    if u64::from(rng.next_u32()) < threshold {
                        *m = scale;
                    }
                }
            });
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// Mask elements drawn from one generator stream.
const DROPOUT_CHUNK: usize = 1 << 16;

/// Dropout in training, identity in evaluation.
pub(crate) fn maybe_dropout(
    x: Tensor,
    dropout: &mut Option<&mut Dropout>,
    p: f64,
) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(&x, p),
        None => Ok(x),
    }
}

/// Masked mean over the sequence: (B, T, H) x (B, T) -> (B, H).
pub(crate) fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    summed.broadcast_div(&counts)
}

/// Rows scaled to unit L2 norm (sentence-transformers' Normalize: eps 1e-12).
pub(crate) fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// The additive attention bias: 0 where attended, a large negative where padded; (B, 1, 1, T).
pub(crate) fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let bias = ((mask.to_dtype(dtype)? - 1.0)? * 1e9)?;
    bias.reshape((b, 1, 1, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn mask(threads: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let ones = Tensor::ones(300_000, DType::F32, &Device::Cpu).unwrap();
        let mut dropout = Dropout::new(ChaCha8Rng::seed_from_u64(7));
        pool.install(|| dropout.apply(&ones, 0.1).unwrap().to_vec1().unwrap())
    }

    #[test]
    fn dropout_keeps_the_expected_share_scaled_and_the_same_on_any_thread_count() {
        let one = mask(1);
        assert_eq!(one, mask(3), "masks depend on the seed only");
        let scale = 1.0 / 0.9f32;
        assert!(one.iter().all(|&v| v == 0.0 || v == scale));
        let kept = one.iter().filter(|&&v| v > 0.0).count() as f64 / one.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
    }

    /// The GPU path's GELU (candle's op) computes what the fused CPU op does, value and
    /// gradient, so a CUDA step trains the same function.
    #[test]
    fn candles_gelu_matches_the_fused_op_and_its_gradient() {
        let values: Vec<f64> = (-40..=40).map(|i| f64::from(i) * 0.15).collect();
        let x = candle_core::Var::from_vec(values.clone(), values.len(), &Device::Cpu).unwrap();
        let fused = gelu_erf(x.as_tensor()).unwrap();
        let candle = x.as_tensor().gelu_erf().unwrap();
        let (a, b): (Vec<f64>, Vec<f64>) = (fused.to_vec1().unwrap(), candle.to_vec1().unwrap());
        assert_eq!(a.len(), b.len());
        // candle's erf is a rational approximation good to ~1e-9: far below f32 training noise.
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-7, "{p} vs {q}");
        }
        let grad = |y: &Tensor| -> Vec<f64> {
            let store = (y * 1.0).unwrap().sum_all().unwrap().backward().unwrap();
            store.get(x.as_tensor()).unwrap().to_vec1().unwrap()
        };
        let (ga, gb) = (grad(&fused), grad(&candle));
        assert_eq!(ga.len(), values.len());
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }
}
