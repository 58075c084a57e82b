//! Weight matrices kept in GGUF's 32-weight blocks (Q4_0, Q4_1, Q8_0), for the decoding steps
//! of the embedded model: a step multiplies a few rows of activations by every weight, so it
//! is bound by reading the weights, and blocks are a third of f32's bytes.
//!
//! Every format is unpacked once, at load, into one layout, 32 signed bytes with an f32 scale
//! and offset, so one kernel serves them all; each weight it forms is `q * scale + offset`,
//! multiplied then added (not fused), exactly the f32 value candle's dequantization gives. The
//! products accumulate in f32 (FMA on x86-64: AVX-512F 16 lanes, AVX2 8 lanes, chosen at run
//! time; a portable loop elsewhere).

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

pub(super) const BLOCK: usize = 32;
/// Activation rows one kernel call multiplies (its accumulators fill the vector registers).
const ROWS: usize = 8;
/// Weight rows one parallel task covers: its blocks stay in cache while every group of
/// activation rows passes over them.
const TASK_ROWS: usize = 16;

/// 32 weights: weight j is `q[j] * scale + offset`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Block {
    scale: f32,
    offset: f32,
    q: [i8; BLOCK],
}

/// A matrix of `rows` x `cols` weights (`cols` a multiple of [`BLOCK`]), row-major in blocks.
pub(super) struct BlockMatrix {
    rows: usize,
    cols: usize,
    blocks: Vec<Block>,
    kernel: Kernel,
}

fn scale(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// A block from the bytes of one GGUF block.
type Unpack = fn(&[u8]) -> Block;

/// How one GGUF block format unpacks: its size in bytes, and the block from those bytes.
fn unpacker(dtype: GgmlDType) -> Option<(usize, Unpack)> {
    fn nibbles(bytes: &[u8], minus: i8) -> [i8; BLOCK] {
        let mut q = [0i8; BLOCK];
        for (j, &b) in bytes.iter().enumerate() {
            q[j] = (b & 0x0f) as i8 - minus;
            q[j + BLOCK / 2] = (b >> 4) as i8 - minus;
        }
        q
    }
    // Formats without an offset add -0.0, which leaves every product as it is (+0.0 would turn
    // a -0.0 weight into +0.0).
    match dtype {
        GgmlDType::Q4_0 => Some((18, |b| Block {
            scale: scale(b),
            offset: -0.0,
            q: nibbles(&b[2..18], 8),
        })),
        GgmlDType::Q4_1 => Some((20, |b| Block {
            scale: scale(b),
            offset: scale(&b[2..]),
            q: nibbles(&b[4..20], 0),
        })),
        GgmlDType::Q8_0 => Some((34, |b| Block {
            scale: scale(b),
            offset: -0.0,
            q: std::array::from_fn(|j| b[2 + j] as i8),
        })),
        _ => None,
    }
}

impl BlockMatrix {
    /// The tensor's blocks, if its format is one of the block formats above (`None`: another
    /// format, to be dequantized instead).
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<BlockMatrix>> {
        let Some((size, unpack)) = unpacker(tensor.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = tensor.shape().dims2()?;
        let data = tensor.data()?;
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * size {
            candle_core::bail!(
                "a {rows} x {cols} {:?} tensor of {} bytes",
                tensor.dtype(),
                data.len()
            );
        }
        let blocks = data.chunks_exact(size).map(unpack).collect();
        Ok(Some(BlockMatrix {
            rows,
            cols,
            blocks,
            kernel: Kernel::detect(),
        }))
    }

    /// The matrices' rows one after the other (their widths must agree).
    pub fn stack(parts: Vec<BlockMatrix>) -> BlockMatrix {
        let cols = parts[0].cols;
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "stacked widths differ"
        );
        BlockMatrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            kernel: parts[0].kernel,
            blocks: parts.into_iter().flat_map(|p| p.blocks).collect(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Every weight as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(BLOCK)
            .zip(self.blocks.par_iter())
            .for_each(|(out, block)| {
                for (o, &q) in out.iter_mut().zip(&block.q) {
                    *o = f32::from(q) * block.scale + block.offset;
                }
            });
        out
    }

    /// `out = x W^T` for `x` (`n` rows of `cols`), into `out` (`n` rows of `rows`), on the
    /// current rayon pool.
    pub fn product(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.product_with(self.kernel, x, n, out);
    }

    fn product_with(&self, kernel: Kernel, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n * cols && out.len() >= n * rows);
        let per_row = cols / BLOCK;
        // Each task fills a column band of `out` for every activation row: transposed here,
        // then put in place.
        let mut bands = vec![0f32; rows * n];
        bands
            .par_chunks_mut(TASK_ROWS * n)
            .zip(self.blocks.par_chunks(TASK_ROWS * per_row))
            .for_each(|(band, blocks)| {
                for (w, weights) in blocks.chunks_exact(per_row).enumerate() {
                    for first in (0..n).step_by(ROWS) {
                        let count = ROWS.min(n - first);
                        let xs: [&[f32]; ROWS] = std::array::from_fn(|r| {
                            let row = first + r.min(count - 1);
                            &x[row * cols..(row + 1) * cols]
                        });
                        let sums = kernel.dot(weights, xs, count);
                        band[w * n + first..][..count].copy_from_slice(&sums[..count]);
                    }
                }
            });
        for (w, column) in bands.chunks_exact(n).enumerate() {
            for (t, &v) in column.iter().enumerate() {
                out[t * rows + w] = v;
            }
        }
    }
}

/// The instructions the products run on, the widest this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Kernel {
        Kernel::available().pop().expect("the portable kernel")
    }

    /// Every kernel this CPU can run, slowest first.
    fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                kernels.push(Kernel::Avx2);
            }
            if has!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }

    /// The inner products of one row of blocks with the first `count` of `xs` (each 32
    /// values per block; the sums of the others are zero).
    fn dot(self, blocks: &[Block], xs: [&[f32]; ROWS], count: usize) -> [f32; ROWS] {
        match self {
            // SAFETY: the features were detected at run time (`available`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { dot_avx512(blocks, xs, count) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { dot_avx2(blocks, xs, count) },
            Kernel::Portable => dot_portable(blocks, xs, count),
        }
    }
}

fn dot_portable(blocks: &[Block], xs: [&[f32]; ROWS], count: usize) -> [f32; ROWS] {
    let mut sums = [0f32; ROWS];
    for (b, block) in blocks.iter().enumerate() {
        let weights = block.q.map(|q| f32::from(q) * block.scale + block.offset);
        for (sum, x) in sums.iter_mut().zip(&xs).take(count) {
            for (w, v) in weights.iter().zip(&x[b * BLOCK..][..BLOCK]) {
                *sum += w * v;
            }
        }
    }
    sums
}

/// Runs `$kernel::<R>` with `R` = `$count` (1 to [`ROWS`]): with the row count a constant, the
/// accumulators stay in registers and the row loops unroll.
#[cfg(target_arch = "x86_64")]
macro_rules! for_count {
    ($kernel:ident, $count:expr, $($arg:expr),*) => {
        match $count {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            _ => $kernel::<8>($($arg),*),
        }
    };
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(blocks: &[Block], xs: [&[f32]; ROWS], count: usize) -> [f32; ROWS] {
    for_count!(dot_avx512_rows, count, blocks, xs)
}

/// The rows' values a block at a time, each slice as long as the blocks (checked here, once).
#[cfg(target_arch = "x86_64")]
fn block_rows<const R: usize>(xs: [&[f32]; ROWS], blocks: usize) -> [&[[f32; BLOCK]]; R] {
    let mut rows: [&[[f32; BLOCK]]; R] = [&[]; R];
    for (row, x) in rows.iter_mut().zip(xs) {
        *row = &x.as_chunks::<BLOCK>().0[..blocks];
    }
    rows
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512_rows<const R: usize>(blocks: &[Block], xs: [&[f32]; ROWS]) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let rows = block_rows::<R>(xs, blocks.len());
    // Two accumulators per row (a block's two halves): independent FMA chains. Plain loops
    // over the constant R, and transmutes rather than loads: in the dev profile a load is a
    // checked call, and these must unroll into registers.
    let mut low = [_mm512_setzero_ps(); R];
    let mut high = [_mm512_setzero_ps(); R];
    for (b, block) in blocks.iter().enumerate() {
        let (scale, offset) = (_mm512_set1_ps(block.scale), _mm512_set1_ps(block.offset));
        // SAFETY: 16 bytes as one 128-bit vector, every bit pattern valid.
        let halves = unsafe { std::mem::transmute::<[i8; BLOCK], [__m128i; 2]>(block.q) };
        let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(halves[0]));
        let w0 = _mm512_add_ps(_mm512_mul_ps(w0, scale), offset);
        let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(halves[1]));
        let w1 = _mm512_add_ps(_mm512_mul_ps(w1, scale), offset);
        for r in 0..R {
            // SAFETY: 32 f32 as two 512-bit vectors, every bit pattern valid.
            let x = unsafe { std::mem::transmute::<[f32; BLOCK], [__m512; 2]>(rows[r][b]) };
            low[r] = _mm512_fmadd_ps(w0, x[0], low[r]);
            high[r] = _mm512_fmadd_ps(w1, x[1], high[r]);
        }
    }
    let mut sums = [0f32; ROWS];
    for r in 0..R {
        sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(low[r], high[r]));
    }
    sums
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(blocks: &[Block], xs: [&[f32]; ROWS], count: usize) -> [f32; ROWS] {
    for_count!(dot_avx2_rows, count, blocks, xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2_rows<const R: usize>(blocks: &[Block], xs: [&[f32]; ROWS]) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let rows = block_rows::<R>(xs, blocks.len());
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, block) in blocks.iter().enumerate() {
        let (scale, offset) = (_mm256_set1_ps(block.scale), _mm256_set1_ps(block.offset));
        // SAFETY: 8 bytes as one i64, every bit pattern valid.
        let quarters = unsafe { std::mem::transmute::<[i8; BLOCK], [i64; 4]>(block.q) };
        let mut weights = [_mm256_setzero_ps(); 4];
        for i in 0..4 {
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_set_epi64x(0, quarters[i])));
            weights[i] = _mm256_add_ps(_mm256_mul_ps(q, scale), offset);
        }
        for r in 0..R {
            // SAFETY: 32 f32 as four 256-bit vectors, every bit pattern valid.
            let x = unsafe { std::mem::transmute::<[f32; BLOCK], [__m256; 4]>(rows[r][b]) };
            for i in 0..4 {
                acc[r] = _mm256_fmadd_ps(weights[i], x[i], acc[r]);
            }
        }
    }
    let mut sums = [0f32; ROWS];
    for r in 0..R {
        let a = acc[r];
        let sum = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1));
        sums[r] = _mm_cvtss_f32(sum);
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, BlockMatrix) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let m = BlockMatrix::from_qtensor(&q)
            .unwrap()
            .expect("a block format");
        (q, m)
    }

    #[test]
    fn unpacked_blocks_dequantize_exactly_as_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, m) = matrix(dtype, 24, 96);
            let candle: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours = m.dequantize();
            assert!(
                candle
                    .iter()
                    .zip(&ours)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?}"
            );
        }
        let f16 = QTensor::quantize(
            &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F16,
        )
        .unwrap();
        assert!(BlockMatrix::from_qtensor(&f16).unwrap().is_none());
    }

    #[test]
    fn every_kernel_computes_the_products_of_the_dequantized_weights() {
        let (_, m) = matrix(GgmlDType::Q4_1, 37, 128);
        let dense = m.dequantize();
        for n in [1, 3, 8, 11] {
            let x: Vec<f32> = (0..n * 128)
                .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
                .collect();
            let mut expected = vec![0f32; n * 37];
            for t in 0..n {
                for o in 0..37 {
                    expected[t * 37 + o] = (0..128)
                        .map(|i| f64::from(x[t * 128 + i]) * f64::from(dense[o * 128 + i]))
                        .sum::<f64>() as f32;
                }
            }
            for kernel in Kernel::available() {
                let mut out = vec![0f32; n * 37];
                m.product_with(kernel, &x, n, &mut out);
                for (a, b) in out.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{kernel:?} n={n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
