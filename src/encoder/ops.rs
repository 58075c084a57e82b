//! Layer norm, softmax, GELU, linear and dropout, each with a backward pass (candle's fused
//! norms and softmax have none): primitive ops, or on the CPU fused ops of our own whose
//! backward is written out (one pass each).

use candle_core::cpu::erf::erf_f64;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, Var,
    WithDType,
};
use rand::rand_core::block::BlockRngCore;
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Core, ChaCha8Rng};
use rayon::prelude::*;

/// a b, with both sides cast to `product` for the multiplication when it is given (mixed
/// precision: bf16 or f16 products, the result back in `a`'s dtype, gradients flowing through
/// the casts to the f32 parameters, as PyTorch's autocast does).
pub(crate) fn matmul(a: &Tensor, b: &Tensor, product: Option<DType>) -> Result<Tensor> {
    match product {
        Some(dtype) if dtype != a.dtype() => a
            .to_dtype(dtype)?
            .matmul(&b.to_dtype(dtype)?)?
            .to_dtype(a.dtype()),
        _ => a.matmul(b),
    }
}

/// y = x W^T + b over the last dimension, for x of any rank; the product in `product` when
/// given (see [`matmul`]). In full precision on the CPU one fused op: the bias is the GEMM's
/// starting value (no pass over the output to add it), and its gradient one pass.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    product: Option<DType>,
) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, cols) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x2 = x.reshape((rows, cols))?;
    let y = if x.device().is_cpu() && product.is_none_or(|d| d == x.dtype()) {
        x2.contiguous()?.apply_op3(weight, bias, Linear)?
    } else {
        matmul(&x2, &weight.t()?, product)?.broadcast_add(bias)?
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = weight.dims()[0];
    y.reshape(out)
}

/// Layer normalization over the last dimension (biased variance, as PyTorch), with its affine
/// part. On the CPU it is one fused op: one pass forward, and backward one row-wise pass for
/// the input's gradient and one for the weight's and bias's (as primitive ops it was a dozen
/// passes, half of them candle's broadcasting binary ops and strided reductions).
pub(crate) fn layer_norm(x: &Tensor, weight: &Var, bias: &Var, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?
            .apply_op3(weight.as_tensor(), bias.as_tensor(), LayerNorm { eps })
    } else {
        normalize_primitive(x, eps)?
            .broadcast_mul(weight.as_tensor())?
            .broadcast_add(bias.as_tensor())
    }
}

/// (x - mean) / sqrt(var + eps) over the last dimension, from primitive ops (any device).
fn normalize_primitive(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// softmax(scores + bias) over the last dimension, for attention scores (B, H, T, S) and the
/// additive mask bias (B, 1, 1, S). Fused on the CPU (the bias added inside the row pass;
/// forward and backward one pass over each row), elsewhere [`softmax_primitive`] of the sum.
pub(crate) fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() {
        scores
            .contiguous()?
            .apply_op2(&bias.contiguous()?, MaskedSoftmax)
    } else {
        softmax_primitive(&scores.broadcast_add(bias)?)
    }
}

/// Softmax from primitive ops (any device), the row maximum subtracted for stability and
/// detached: its gradient contributions cancel exactly.
fn softmax_primitive(x: &Tensor) -> Result<Tensor> {
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

/// GELU (erf form) of each value of `x` (the second input is unused: kernels take two). The
/// loop calls nothing, so it vectorizes (f32's erf is [`super::fastmath::erf`]).
fn gelu_values<T: Real>(x: &[T], _: &[T], out: &mut [T]) {
    let (half, scale) = (
        T::from_f64(0.5),
        T::from_f64(std::f64::consts::FRAC_1_SQRT_2),
    );
    for (o, &x) in out.iter_mut().zip(x) {
        *o = half * x * (T::one() + (x * scale).erf());
    }
}

/// g dGELU/dx for each (x, g), with dGELU/dx = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) /
/// sqrt(2 pi), in the tensor's own precision (as PyTorch).
fn gelu_backward_values<T: Real>(x: &[T], g: &[T], out: &mut [T]) {
    let (half, scale, inv_sqrt_2pi) = (
        T::from_f64(0.5),
        T::from_f64(std::f64::consts::FRAC_1_SQRT_2),
        T::from_f64(0.398_942_280_401_432_7),
    );
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        let cdf = half * (T::one() + (x * scale).erf());
        let pdf = (T::zero() - half * x * x).exp() * inv_sqrt_2pi;
        *o = g * (cdf + x * pdf);
    }
}

/// The float types the fused ops run in: f32 for training, f64 for gradient checks.
trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
}

/// f32 takes the vectorizable approximations (training's precision); f64, used by gradient
/// checks, stays exact.
impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        super::fastmath::exp(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        super::fastmath::erf(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f64(self)
    }
}

/// A kernel over matching chunks of one or two inputs (the second empty when there is none)
/// into a chunk of the output.
type Kernel<'a, T> = &'a (dyn Fn(&[T], &[T], &mut [T]) + Sync);

/// `f32_fn` or `f64_fn` applied in parallel to chunks of `chunk` values (a multiple of the row
/// length for row-wise ops) of the contiguous values of one or two tensors of one shape.
fn map_chunks(
    a: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    chunk: usize,
    f32_fn: Kernel<f32>,
    f64_fn: Kernel<f64>,
) -> Result<(CpuStorage, Shape)> {
    let shape = a.1.shape().clone();
    let storage = match a.0 {
        CpuStorage::F32(_) => {
            let y = b.map(|(s, l)| values::<f32>(s, l)).transpose()?;
            CpuStorage::F32(map_values(values::<f32>(a.0, a.1)?, y, chunk, f32_fn))
        }
        CpuStorage::F64(_) => {
            let y = b.map(|(s, l)| values::<f64>(s, l)).transpose()?;
            CpuStorage::F64(map_values(values::<f64>(a.0, a.1)?, y, chunk, f64_fn))
        }
        other => return Err(unsupported(other)),
    };
    Ok((storage, shape))
}

/// The contiguous values of a tensor's storage.
fn values<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// `f` over matching chunks of `x` (and `y`) into a new vector, chunks in parallel.
fn map_values<T: WithDType>(x: &[T], y: Option<&[T]>, chunk: usize, f: Kernel<T>) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
        let range = i * chunk..i * chunk + o.len();
        f(&x[range.clone()], y.map_or(&[][..], |y| &y[range]), o);
    });
    out
}

fn unsupported(storage: &CpuStorage) -> candle_core::Error {
    use candle_core::backend::BackendStorage;
    candle_core::Error::UnsupportedDTypeForOp(storage.dtype(), "fused op")
}

/// The storage `$body` (a `Result<Vec<$t>>`) computes, with `$t` the float type of
/// `$storage` (f32 or f64; other types are refused).
macro_rules! float_storage {
    ($storage:expr, $t:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body?)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body?)
            }
            other => return Err(unsupported(other)),
        }
    };
}

// After the macro, which it uses.
mod attention;
pub(crate) use attention::{Projection, SelfAttention};

/// Per-chunk partial sums (each `len` long), added in chunk order: the same result for any
/// number of threads (a resumed run is bit-identical).
fn sum_in_order<T: WithDType>(partials: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut total = vec![T::zero(); len];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}

/// Lanes of the reductions below: kept apart, the loops vectorize (one accumulator would
/// order every addition).
const LANES: usize = 8;

/// `x` folded by `f` in [`LANES`] lanes from `init`, then the lanes and the remainder in order.
#[inline(always)]
fn fold_lanes<T: Real>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut lanes = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = f(*l, v);
        }
    }
    lanes.into_iter().chain(rest.iter().copied()).fold(init, f)
}

/// The largest of `x` (the lowest float when empty).
fn max_of<T: Real>(x: &[T]) -> T {
    fold_lanes(x, T::from_f64(f64::MIN), |m, v| if v > m { v } else { m })
}

/// The sum of `x`, in [`LANES`] partial sums.
fn sum_of<T: Real>(x: &[T]) -> T {
    fold_lanes(x, T::zero(), |a, v| a + v)
}

/// Values per parallel chunk of an elementwise op.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// A row-wise kernel built for the row length (the last dimension) of `a`, applied in
/// parallel to chunks of whole rows, about [`ELEMENTWISE_CHUNK`] values each.
fn map_rows<K32, K64>(
    a: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    f32_kernel: impl FnOnce(usize) -> K32,
    f64_kernel: impl FnOnce(usize) -> K64,
) -> Result<(CpuStorage, Shape)>
where
    K32: Fn(&[f32], &[f32], &mut [f32]) + Sync,
    K64: Fn(&[f64], &[f64], &mut [f64]) + Sync,
{
    let row = row_length(a.1);
    map_chunks(a, b, rows_chunk(row), &f32_kernel(row), &f64_kernel(row))
}

fn row_length(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Whole rows, about [`ELEMENTWISE_CHUNK`] values.
fn rows_chunk(row: usize) -> usize {
    row * (ELEMENTWISE_CHUNK / row).max(1)
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu_erf_fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_chunks(
            (s, l),
            None,
            ELEMENTWISE_CHUNK,
            &gelu_values::<f32>,
            &gelu_values::<f64>,
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
        map_chunks(
            (s1, l1),
            Some((s2, l2)),
            ELEMENTWISE_CHUNK,
            &gelu_backward_values::<f32>,
            &gelu_backward_values::<f64>,
        )
    }
}

/// x W^T + b for x (rows, in), W (out, in), b (out): [`linear`] on the CPU.
struct Linear;

fn linear_values<T: WithDType + 'static>(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    b: &[T],
) -> Result<Vec<T>> {
    let (rows, inputs) = xl.shape().dims2()?;
    let outputs = b.len();
    let (x, w) = (values::<T>(x, xl)?, values::<T>(w, wl)?);
    let mut out = Vec::with_capacity(rows * outputs);
    for _ in 0..rows {
        out.extend_from_slice(b);
    }
    crate::linalg::xwt(x, w, &mut out, (rows, inputs, outputs), true);
    Ok(out)
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear_fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _) = l1.shape().dims2()?;
        let (outputs, _) = l2.shape().dims2()?;
        let storage =
            float_storage!(s1, T => linear_values::<T>((s1, l1), (s2, l2), values(s3, l3)?));
        Ok((storage, Shape::from((rows, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached operands: gradients that carried the forward graph would keep every
        // activation alive for as long as the optimizer keeps anything computed from them.
        let (x, weight, grad) = (x.detach(), weight.detach(), grad.contiguous()?);
        let dx = grad.matmul(&weight)?;
        let dw = grad.t()?.matmul(&x)?;
        let db = grad.apply_op1_no_bwd(&ColumnSums)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// A matrix's column sums (rows in parallel chunks, then [`sum_in_order`]).
struct ColumnSums;

fn column_sums<T: WithDType>((g, gl): (&CpuStorage, &Layout)) -> Result<Vec<T>> {
    let row = row_length(gl);
    let partials: Vec<Vec<T>> = values::<T>(g, gl)?
        .par_chunks(rows_chunk(row))
        .map(|g| {
            let mut sums = vec![T::zero(); row];
            for g in g.chunks_exact(row) {
                for (s, &v) in sums.iter_mut().zip(g) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    Ok(sum_in_order(partials, row))
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column_sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = float_storage!(s, T => column_sums::<T>((s, l)));
        Ok((storage, Shape::from(row_length(l))))
    }
}

/// Layer normalization with its affine part, over the last dimension: (x, weight, bias).
struct LayerNorm {
    eps: f64,
}

/// A row's mean and 1 / sqrt(var + eps) (biased variance, two passes: no cancellation).
fn moments<T: Real>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = x
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, T::one() / (var + T::from_f64(eps)).sqrt())
}

fn layer_norm_values<T: Real>(
    eps: f64,
    (x, xl): (&CpuStorage, &Layout),
    weight: &[T],
    bias: &[T],
) -> Result<Vec<T>> {
    let row = row_length(xl);
    let kernel = move |x: &[T], _: &[T], out: &mut [T]| {
        for (x, out) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
            let (mean, inv_std) = moments(x, eps);
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (v - mean) * inv_std * w + b;
            }
        }
    };
    Ok(map_values(
        values::<T>(x, xl)?,
        None,
        rows_chunk(row),
        &kernel,
    ))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm_fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let storage = float_storage!(s1, T => layer_norm_values::<T>(
            self.eps,
            (s1, l1),
            values(s2, l2)?,
            values(s3, l3)?,
        ));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let eps = self.eps;
        let dx = x.apply_op3_no_bwd(&grad, weight, &LayerNormInputGrad { eps })?;
        let params = x.apply_op2_no_bwd(&grad, &LayerNormParamGrads { eps })?;
        Ok((Some(dx), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

/// (x, dL/dy, weight) -> dL/dx for [`LayerNorm`]: with g' = g w, per row,
/// (g' - mean(g') - x̂ mean(g' x̂)) / std.
struct LayerNormInputGrad {
    eps: f64,
}

fn layer_norm_input_grad<T: Real>(
    eps: f64,
    (x, xl): (&CpuStorage, &Layout),
    (g, gl): (&CpuStorage, &Layout),
    weight: &[T],
) -> Result<Vec<T>> {
    let row = row_length(xl);
    let n = T::from_f64(row as f64);
    let kernel = move |x: &[T], g: &[T], out: &mut [T]| {
        for ((x, g), out) in x
            .chunks_exact(row)
            .zip(g.chunks_exact(row))
            .zip(out.chunks_exact_mut(row))
        {
            let (mean, inv_std) = moments(x, eps);
            let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
            for ((&v, &g), &w) in x.iter().zip(g).zip(weight) {
                sum_g += g * w;
                sum_gx += g * w * (v - mean) * inv_std;
            }
            let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
            for (((o, &v), &g), &w) in out.iter_mut().zip(x).zip(g).zip(weight) {
                *o = (g * w - mean_g - (v - mean) * inv_std * mean_gx) * inv_std;
            }
        }
    };
    Ok(map_values(
        values::<T>(x, xl)?,
        Some(values::<T>(g, gl)?),
        rows_chunk(row),
        &kernel,
    ))
}

impl CustomOp3 for LayerNormInputGrad {
    fn name(&self) -> &'static str {
        "layer_norm_fused_input_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = ((s1, l1), (s2, l2));
        let storage =
            float_storage!(s1, T => layer_norm_input_grad::<T>(self.eps, x, g, values(s3, l3)?));
        Ok((storage, l1.shape().clone()))
    }
}

/// (x, dL/dy) -> (2, H): the weight's gradient (sum over rows of g x̂) and the bias's (sum of
/// g). Rows are summed in chunks in parallel, then [`sum_in_order`].
struct LayerNormParamGrads {
    eps: f64,
}

fn layer_norm_param_grads<T: Real>(
    eps: f64,
    (x, xl): (&CpuStorage, &Layout),
    (g, gl): (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let row = row_length(xl);
    let chunk = rows_chunk(row);
    let (x, g) = (values::<T>(x, xl)?, values::<T>(g, gl)?);
    let partials: Vec<Vec<T>> = x
        .par_chunks(chunk)
        .zip(g.par_chunks(chunk))
        .map(|(x, g)| {
            let mut sums = vec![T::zero(); 2 * row];
            let (dw, db) = sums.split_at_mut(row);
            for (x, g) in x.chunks_exact(row).zip(g.chunks_exact(row)) {
                let (mean, inv_std) = moments(x, eps);
                for (((dw, db), &v), &g) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(g) {
                    *dw += g * (v - mean) * inv_std;
                    *db += g;
                }
            }
            sums
        })
        .collect();
    Ok(sum_in_order(partials, 2 * row))
}

impl CustomOp2 for LayerNormParamGrads {
    fn name(&self) -> &'static str {
        "layer_norm_fused_param_grads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = ((s1, l1), (s2, l2));
        let storage = float_storage!(s1, T => layer_norm_param_grads::<T>(self.eps, x, g));
        Ok((storage, Shape::from((2, row_length(l1)))))
    }
}

/// softmax(x + bias) over the last dimension: [`masked_softmax`] on the CPU. The bias is a
/// constant (no gradient).
struct MaskedSoftmax;

fn masked_softmax_values<T: Real>(
    (x, xl): (&CpuStorage, &Layout),
    (m, ml): (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let (batch, heads, queries, row) = xl.shape().dims4()?;
    if ml.shape().elem_count() != batch * row {
        candle_core::bail!("mask bias {:?} for scores {:?}", ml.shape(), xl.shape());
    }
    let per_batch = heads * queries * row;
    let (x, m) = (values::<T>(x, xl)?, values::<T>(m, ml)?);
    let chunk = rows_chunk(row);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
        let start = i * chunk;
        let rows = out.chunks_exact_mut(row).zip(x[start..].chunks_exact(row));
        for (j, (out, x)) in rows.enumerate() {
            let b = (start + j * row) / per_batch;
            let bias = &m[b * row..(b + 1) * row];
            let mut max = x[0] + bias[0];
            for (o, (&v, &c)) in out.iter_mut().zip(x.iter().zip(bias)) {
                *o = v + c;
                if *o > max {
                    max = *o;
                }
            }
            // Exponentials, then their sum: one loop would serialize the exponentials behind
            // the sum's additions.
            for o in out.iter_mut() {
                *o = (*o - max).exp();
            }
            let sum = out.iter().fold(T::zero(), |a, &o| a + o);
            let inv = T::one() / sum;
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    });
    Ok(out)
}

/// dL/dx = y (g - sum(g y)), per row.
fn softmax_backward_rows<T: Real>(row: usize) -> impl Fn(&[T], &[T], &mut [T]) + Sync {
    move |y, g, out| {
        for ((y, g), out) in y
            .chunks_exact(row)
            .zip(g.chunks_exact(row))
            .zip(out.chunks_exact_mut(row))
        {
            let dot = y.iter().zip(g).fold(T::zero(), |a, (&y, &g)| a + y * g);
            for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        }
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked_softmax_fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = ((s1, l1), (s2, l2));
        let storage = float_storage!(s1, T => masked_softmax_values::<T>(x, m));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?;
        Ok((Some(dx), None))
    }
}

/// (y, dL/dy) -> dL/dx for [`MaskedSoftmax`].
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax_fused_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_rows(
            (s1, l1),
            Some((s2, l2)),
            softmax_backward_rows::<f32>,
            softmax_backward_rows::<f64>,
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

    /// The mask of the next dropout with probability `p` (none when `p` is 0).
    pub(crate) fn draw(&mut self, p: f64) -> Option<DropMask> {
        (p > 0.0).then(|| DropMask {
            key: self.rng.random::<u64>(),
            keep: 1.0 - p,
        })
    }

    pub(crate) fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(mask) = self.draw(p) else {
            return Ok(x.clone());
        };
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there from the device's generator seeded with the same
            // per-call key: still a function of (seed, step), though not the CPU's masks.
            // Copying a layer's mask from the host would take longer than the layer.
            x.device().set_seed(mask.key)?;
            let kept = Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?;
            return x.mul(&(kept.to_dtype(x.dtype())? * (1.0 / mask.keep))?);
        }
        x.contiguous()?.apply_op1(DropoutOp(mask))
    }
}

/// One dropout's mask: kept values scaled by 1 / keep, the rest zeroed, drawn in streams of a
/// generator keyed by one draw of [`Dropout`]'s: any stream can be regenerated (backward
/// passes do, instead of keeping masks), and masks depend on neither thread count nor order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropMask {
    key: u64,
    keep: f64,
}

impl DropMask {
    /// Stream `stream`'s mask values (1 / keep or 0) into `out`: a kept value draws a u32
    /// below keep * 2^32. The words come from ChaCha8 keyed by (key, stream), block by block
    /// from its core (`Rng::fill` copied them a byte at a time), so the loop vectorizes.
    fn fill<T: WithDType>(&self, stream: u64, out: &mut [T]) {
        let threshold = (self.keep * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32;
        let scale = T::from_f64(1.0 / self.keep);
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.key.to_le_bytes());
        seed[8..16].copy_from_slice(&stream.to_le_bytes());
        let mut core = ChaCha8Core::from_seed(seed);
        let mut words = Default::default();
        for out in out.chunks_mut(64) {
            core.generate(&mut words);
            for (m, &w) in out.iter_mut().zip(AsRef::<[u32]>::as_ref(&words)) {
                *m = if w < threshold { scale } else { T::zero() };
            }
        }
    }
}

/// x ⊙ mask on the CPU, chunk i of [`DROPOUT_CHUNK`] values masked by stream i; its backward
/// is the same op on the gradient (no mask is kept).
struct DropoutOp(DropMask);

impl DropoutOp {
    fn dropped<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(DROPOUT_CHUNK)
            .zip(x.par_chunks(DROPOUT_CHUNK))
            .enumerate()
            .for_each(|(i, (out, x))| {
                self.0.fill(i as u64, out);
                for (o, &x) in out.iter_mut().zip(x) {
                    *o *= x;
                }
            });
        out
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = float_storage!(s, T => Ok::<_, candle_core::Error>(
            self.dropped::<T>(values(s, l)?)
        ));
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&DropoutOp(self.0))?,
        ))
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

    /// A (1, 1, 1, S) mask bias from a bias vector: its values, and -1e9 on every seventh.
    fn mask_bias(b: &Var) -> Result<Tensor> {
        let n = b.dims()[0];
        let masked: Vec<f64> = (0..n)
            .map(|i| if i % 7 == 3 { -1e9 } else { 0.0 })
            .collect();
        let masked = Tensor::from_vec(masked, n, b.device())?.to_dtype(b.dtype())?;
        (b.as_tensor().detach() + masked)?.reshape((1, 1, 1, n))
    }

    /// What an affine op's checks compare.
    const AFFINE: [&str; 4] = ["value", "dx", "dweight", "dbias"];

    /// A variable of `values` in `shape` and `dtype`.
    pub(super) fn var(values: &[f64], shape: &[usize], dtype: DType) -> Var {
        let t = Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap();
        Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
    }

    /// y's values, then the gradients of sum(y * probe) for each of `vars` (empty where none
    /// reaches it), as f64; and whether any gradient tracks its graph (the optimizer's moments
    /// are made from gradients: one that carried its graph would keep every step's
    /// activations alive).
    pub(super) fn value_and_grads(y: &Tensor, probe: &Var, vars: &[&Var]) -> (Vec<Vec<f64>>, bool) {
        let grads = (y * probe.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            t.to_vec1().unwrap()
        };
        let mut out = vec![flat(y)];
        let mut tracks = false;
        for v in vars {
            let grad = grads.get(v.as_tensor());
            tracks |= grad.is_some_and(Tensor::track_op);
            out.push(grad.map(flat).unwrap_or_default());
        }
        (out, tracks)
    }

    /// The value and gradients `labels` names (as `value_and_grads` lists them) equal within
    /// `tolerance`, relative to max(|expected|, 1).
    pub(super) fn assert_close(
        case: &str,
        labels: &[&str],
        got: &[Vec<f64>],
        want: &[Vec<f64>],
        tolerance: f64,
    ) {
        assert_eq!(
            (labels.len(), got.len()),
            (want.len(), want.len()),
            "{case}"
        );
        for ((what, a), b) in labels.iter().zip(got).zip(want) {
            assert_eq!(a.len(), b.len(), "{case} {what}");
            let worst = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0.0, f64::max);
            assert!(worst < tolerance, "{case} {what}: {worst}");
        }
    }

    /// The fused layer norm and softmax compute what their primitive-op forms (the GPU path)
    /// do, value and gradients (the input's; layer norm's weight and bias), in f64 and f32, on
    /// rows with large offsets and spreads; their gradients carry no graph.
    #[test]
    fn fused_norm_and_softmax_match_their_primitive_forms_and_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, cols) = (37, 48);
        let values: Vec<f64> = (0..rows * cols)
            .map(|i| (rng.random::<f64>() - 0.5) * 8.0 + (i / cols) as f64)
            .collect();
        let weights: Vec<f64> = (0..rows * cols)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let affine: Vec<f64> = (0..2 * cols).map(|_| rng.random::<f64>() + 0.5).collect();
        type Op = fn(&Tensor, &Var, &Var) -> Result<Tensor>;
        let cases: [(&str, Op, Op); 2] = [
            (
                "layer norm",
                |x, w, b| layer_norm(x, w, b, 1e-12),
                |x, w, b| {
                    normalize_primitive(x, 1e-12)?
                        .broadcast_mul(w.as_tensor())?
                        .broadcast_add(b.as_tensor())
                },
            ),
            (
                "masked softmax",
                |x, _, b| {
                    masked_softmax(&x.reshape((1, 1, 37, 48))?, &mask_bias(b)?)?.reshape((37, 48))
                },
                |x, _, b| softmax_primitive(&x.broadcast_add(&mask_bias(b)?.reshape((1, 48))?)?),
            ),
        ];
        for dtype in [DType::F64, DType::F32] {
            let tolerance = if dtype == DType::F64 { 1e-10 } else { 5e-5 };
            let x = var(&values, &[rows, cols], dtype);
            let (w, b) = (
                var(&affine[..cols], &[cols], dtype),
                var(&affine[cols..], &[cols], dtype),
            );
            let probe = var(&weights, &[rows, cols], dtype);
            let run = |op: Op| {
                value_and_grads(&op(x.as_tensor(), &w, &b).unwrap(), &probe, &[&x, &w, &b])
            };
            for (name, fused, primitive) in cases {
                let ((f, tracks), (p, _)) = (run(fused), run(primitive));
                assert!(!tracks, "{name}: a gradient tracks its graph");
                assert_close(&format!("{name} {dtype:?}"), &AFFINE, &f, &p, tolerance);
            }
        }
    }

    /// The fused linear op (bias as the GEMM's starting value, column sums for its gradient)
    /// equals matmul + broadcast add in value and in all three gradients, which carry no graph.
    #[test]
    fn fused_linear_matches_matmul_and_bias_add() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (rows, inputs, outputs) = (300, 40, 24);
        let mut draw =
            |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random::<f64>() - 0.5).collect() };
        let (xv, wv, bv, pv) = (
            draw(rows * inputs),
            draw(outputs * inputs),
            draw(outputs),
            draw(rows * outputs),
        );
        for dtype in [DType::F64, DType::F32] {
            let (x, w, b) = (
                var(&xv, &[3, rows / 3, inputs], dtype),
                var(&wv, &[outputs, inputs], dtype),
                var(&bv, &[outputs], dtype),
            );
            let probe = var(&pv, &[3, rows / 3, outputs], dtype);
            let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), None).unwrap();
            let primitive = x
                .as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let (f, tracks) = value_and_grads(&fused, &probe, &[&x, &w, &b]);
            let (p, _) = value_and_grads(&primitive, &probe, &[&x, &w, &b]);
            assert!(!tracks, "fused linear: a gradient tracks its graph");
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert_close(&format!("linear {dtype:?}"), &AFFINE, &f, &p, tolerance);
        }
    }
}
