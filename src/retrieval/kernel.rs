//! The integer products of the first pass, 4 queries by one panel of 16 documents at a time,
//! and the f32 inner product of the exact pass.
//!
//! On x86-64 with AVX2 the byte products run as `vpmaddubsw` + `vpmaddwd`: 32 multiply-adds
//! per instruction pair, twice the rate of f32 FMA on AMD Zen 3. Elsewhere a portable loop
//! computes the same integers: both are exact, so the search returns the same hits on any CPU.

use super::quantize::PANEL;

/// Queries per kernel call.
pub const ROWS: usize = 4;

/// One group of 4 components of the [`PANEL`] documents of a panel, document-major.
pub type PanelQuad = [i8; 4 * PANEL];

#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    avx2: bool,
}

impl Kernel {
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Kernel { avx2 }
    }

    /// `rows` are [`ROWS`] queries as unsigned bytes, one group of 4 per element; `panel` is
    /// the same groups of [`PANEL`] documents. Row r of the result holds query r's products.
    pub fn panel(&self, rows: [&[[u8; 4]]; ROWS], panel: &[PanelQuad]) -> [[i32; PANEL]; ROWS] {
        assert!(rows.iter().all(|r| r.len() == panel.len()));
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 was detected at run time.
            return unsafe { panel_avx2(rows, panel) };
        }
        rows.map(|row| {
            let mut out = [0i32; PANEL];
            for (a, docs) in row.iter().zip(panel) {
                for (o, d) in out.iter_mut().zip(docs.chunks_exact(4)) {
                    *o += (0..4)
                        .map(|i| i32::from(a[i]) * i32::from(d[i]))
                        .sum::<i32>();
                }
            }
            out
        })
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn panel_avx2(rows: [&[[u8; 4]]; ROWS], panel: &[PanelQuad]) -> [[i32; PANEL]; ROWS] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
    // Plain loads through slices and `transmute`, no pointer reads: in the dev profile the
    // standard library's pointer-read checks would cost more than the arithmetic.
    for (quad, docs) in panel.iter().enumerate() {
        // SAFETY: 64 bytes as two 256-bit vectors, every bit pattern valid.
        let [b0, b1] = unsafe { std::mem::transmute::<PanelQuad, [__m256i; 2]>(*docs) };
        for (acc, row) in acc.iter_mut().zip(rows) {
            // The query's 4 bytes against 4 bytes of each of 8 documents: the byte products
            // sum in pairs (16 bits, no saturation: 2·127·127 < 2¹⁵), then in pairs again into
            // 32 bits.
            let x = _mm256_set1_epi32(i32::from_le_bytes(row[quad]));
            let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones);
            let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones);
            acc[0] = _mm256_add_epi32(acc[0], p0);
            acc[1] = _mm256_add_epi32(acc[1], p1);
        }
    }
    // SAFETY: two 256-bit vectors are 16 i32.
    acc.map(|v| unsafe { std::mem::transmute::<[__m256i; 2], [i32; PANEL]>(v) })
}

/// Asks the CPU to start loading `row` into cache (a hint; nothing on other architectures).
pub fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch never faults; the address is inside `row` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// The inner product in f32, summed in 8 lanes in a fixed order (no fused multiply-add): the
/// score every search reports, the same on every CPU.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a8.remainder(), b8.remainder());
    let mut lanes = lane_sums(a8.map(as_8), b8.map(as_8));
    for (l, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        lanes[l] += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

fn as_8(chunk: &[f32]) -> &[f32; 8] {
    chunk.try_into().expect("chunks of 8")
}

/// Lane l sums `x[l] · y[l]` over the chunks, in order.
#[cfg(target_arch = "x86_64")]
fn lane_sums<'a>(
    a: impl Iterator<Item = &'a [f32; 8]>,
    b: impl Iterator<Item = &'a [f32; 8]>,
) -> [f32; 8] {
    use std::arch::x86_64::*;
    // The compiler leaves this loop scalar (measured: 3x slower). The same lane-wise products
    // and sums round exactly as the portable loop's.
    // SAFETY: SSE is part of x86-64; 8 f32 are two 128-bit vectors, every bit pattern valid.
    unsafe {
        let (mut low, mut high) = (_mm_setzero_ps(), _mm_setzero_ps());
        for (x, y) in a.zip(b) {
            let [x0, x1] = std::mem::transmute::<[f32; 8], [__m128; 2]>(*x);
            let [y0, y1] = std::mem::transmute::<[f32; 8], [__m128; 2]>(*y);
            low = _mm_add_ps(low, _mm_mul_ps(x0, y0));
            high = _mm_add_ps(high, _mm_mul_ps(x1, y1));
        }
        std::mem::transmute::<[__m128; 2], [f32; 8]>([low, high])
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn lane_sums<'a>(
    a: impl Iterator<Item = &'a [f32; 8]>,
    b: impl Iterator<Item = &'a [f32; 8]>,
) -> [f32; 8] {
    let mut lanes = [0f32; 8];
    for (x, y) in a.zip(b) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The vectorized dot rounds exactly as the documented order does, tails included: the
    /// scores are the same on every CPU.
    #[test]
    fn dot_rounds_in_the_documented_order() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for dim in [0, 1, 7, 8, 13, 384, 771] {
            let a: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..dim).map(|_| rng.random_range(-1e3..1e3)).collect();
            let mut lanes = [0f32; 8];
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                lanes[i % 8] += x * y;
            }
            let expected = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            assert_eq!(dot(&a, &b).to_bits(), expected.to_bits(), "dim {dim}");
        }
    }

    /// The AVX2 kernel and the portable loop compute the same integers, at the extremes of
    /// both operands' ranges too.
    #[test]
    fn kernels_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for quads in [1, 3, 96] {
            let rows: Vec<Vec<[u8; 4]>> = (0..ROWS)
                .map(|r| {
                    (0..quads)
                        .map(|_| {
                            [0; 4].map(|_| {
                                if r == 0 {
                                    127
                                } else {
                                    rng.random_range(1..=127)
                                }
                            })
                        })
                        .collect()
                })
                .collect();
            let panel: Vec<PanelQuad> = (0..quads)
                .map(|_| [0; 4 * PANEL].map(|_| rng.random_range(-127..=127)))
                .collect();
            let rows = std::array::from_fn(|r| rows[r].as_slice());
            let fast = Kernel::detect().panel(rows, &panel);
            let portable = Kernel { avx2: false }.panel(rows, &panel);
            assert_eq!(fast, portable, "quads {quads}");
            let expected: i32 = (0..quads * 4)
                .map(|i| 127 * i32::from(panel[i / 4][i % 4]))
                .sum();
            assert_eq!(portable[0][0], expected);
        }
    }
}
