//! 8-bit integer copies of the vectors for the first, approximate pass of the search, with the
//! terms of a bound on its error, so the exact pass knows which documents it may skip.
//!
//! A vector x is stored as s·x̂ + r: x̂ integer, s = max|xᵢ| / levels, r the rounding residual.
//! For a query q and a document d,
//!
//! ```text
//! q·d − s_q s_d (q̂·d̂) = q·r_d + r_q·(s_d d̂)          (exact algebra)
//! |q·d − s_q s_d (q̂·d̂)| ≤ ‖q‖‖r_d‖ + ‖r_q‖‖s_d d̂‖     (Cauchy–Schwarz)
//! ```
//!
//! and the f32 score of the exact pass ([`super::dot`]) is within γ‖q‖‖d‖ of q·d, γ covering
//! any summation order over `dim` terms plus the rounding of the bound's own arithmetic. So
//! the approximate score minus and plus that bound enclose the exact score: a document whose
//! upper bound falls below k other documents' lower bounds cannot enter the top k.

use super::Vectors;
use super::kernel::{Kernel, PanelQuad};

/// Documents per panel: the kernel's column count.
pub(crate) const PANEL: usize = 16;
/// Document components lie in [-127, 127] (never -128: the bound stays symmetric).
const DOC_LEVELS: f32 = 127.0;

/// The relative allowance γ in the bound's γ‖q‖‖d‖ term: (dim + 16)·ε covers the rounding of
/// the exact f32 score in any summation order and of the approximate score; the bound's own
/// terms are computed in f32 too (relative error under dim·ε each), so γ is doubled.
fn rounding_allowance(dim: usize) -> f32 {
    2.0 * (dim as f32 + 16.0) * f32::EPSILON
}

/// A vector as s·x̂ + r, with the norms the bound needs.
struct Quantized {
    scale: f32,
    /// ‖x‖: infinite or NaN when x is not finite.
    norm: f32,
    /// ‖r‖
    residual_norm: f32,
    /// ‖s·x̂‖
    stored_norm: f32,
}

/// Independent partial sums per norm: 32 lanes are 4 (AVX2) or 2 (AVX-512) vector chains, so
/// the adds overlap instead of waiting on one another (measured 2.3x faster than 8 lanes).
const LANES: usize = 32;

/// Writes x̂ to `out` (levels in [-levels, levels]). One pass after the maximum: each
/// component is rounded and its three squared terms summed lane by lane.
#[inline(always)]
fn quantize(x: &[f32], levels: f32, out: &mut [i32]) -> Quantized {
    let max = max_abs(x);
    let (scale, inverse) = if max > 0.0 && max.is_finite() {
        (max / levels, levels / max)
    } else {
        (0.0, 0.0)
    };
    let [mut norm, mut residual, mut stored] = [[0f32; LANES]; 3];
    let mut lane = |l: usize, v: f32, o: &mut i32| {
        // `max`/`min` ignore NaN (a vector that is not finite), so the value is an integer in
        // [-levels, levels].
        let q = round_small(v * inverse).max(-levels).min(levels);
        // SAFETY: finite and within i32 (an `as` cast would not vectorize).
        *o = unsafe { q.to_int_unchecked::<i32>() };
        let kept = q * scale;
        norm[l] += v * v;
        residual[l] += (v - kept) * (v - kept);
        stored[l] += kept * kept;
    };
    let (xs, x_tail) = x.as_chunks::<LANES>();
    let (outs, out_tail) = out.as_chunks_mut::<LANES>();
    for (xs, outs) in xs.iter().zip(outs) {
        for l in 0..LANES {
            lane(l, xs[l], &mut outs[l]);
        }
    }
    for (l, (&v, o)) in x_tail.iter().zip(out_tail).enumerate() {
        lane(l, v, o);
    }
    let norm_of = |lanes: [f32; LANES]| lanes.iter().sum::<f32>().sqrt();
    Quantized {
        scale,
        norm: norm_of(norm),
        residual_norm: norm_of(residual),
        stored_norm: norm_of(stored),
    }
}

/// Round to nearest (ties to even) for |x| < 2²²: adding and taking back 1.5·2²³ leaves no
/// fraction bits. Unlike `f32::round` it vectorizes without SSE4.1.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Largest |xᵢ| of the finite components, in 8 lanes (a scalar fold would not vectorize).
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    // A comparison, not `f32::max`: that one orders NaN and stays scalar. NaN never wins it.
    let larger = |lane: &mut f32, v: &f32| {
        if v.abs() > *lane {
            *lane = v.abs();
        }
    };
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    lanes
        .iter_mut()
        .zip(chunks.remainder())
        .for_each(|(l, v)| larger(l, v));
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| larger(l, v));
    }
    lanes.into_iter().fold(0.0, f32::max)
}

/// The documents of a search, quantized and packed in panels of [`PANEL`].
pub(crate) struct QuantizedDocs {
    /// Groups of 4 components per vector (the dimension rounded up to a multiple of 4).
    pub quads: usize,
    /// `[panel][quad]`; the last panel is padded with zero documents.
    pub panels: Vec<PanelQuad>,
    /// Per document, padded to whole panels like `panels`.
    scale: Vec<f32>,
    /// `Σ d̂ᵢ`: the query's offset times this is taken out of the kernel's sums.
    sum: Vec<i32>,
    /// `‖r_d‖ + γ‖d‖`, multiplied by ‖q‖ in the bound; infinite for a vector that is not finite
    /// (always rescored).
    slack_per_query_norm: Vec<f32>,
    /// `‖s_d d̂‖`, multiplied by ‖r_q‖ in the bound.
    slack_per_query_residual: Vec<f32>,
}

impl QuantizedDocs {
    pub fn new(docs: Vectors<'_>, kernel: Kernel, threads: usize) -> QuantizedDocs {
        let (dim, rows) = (docs.dim, docs.rows());
        let quads = dim.div_ceil(4);
        let panels = rows.div_ceil(PANEL);
        let mut out = QuantizedDocs {
            quads,
            panels: vec![[0; 4 * PANEL]; panels * quads],
            scale: vec![0.0; panels * PANEL],
            sum: vec![0; panels * PANEL],
            slack_per_query_norm: vec![0.0; panels * PANEL],
            slack_per_query_residual: vec![0.0; panels * PANEL],
        };
        let per_thread = panels.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            let chunks = out
                .panels
                .chunks_mut(per_thread * quads)
                .zip(out.scale.chunks_mut(per_thread * PANEL))
                .zip(out.sum.chunks_mut(per_thread * PANEL))
                .zip(out.slack_per_query_norm.chunks_mut(per_thread * PANEL))
                .zip(out.slack_per_query_residual.chunks_mut(per_thread * PANEL));
            for (chunk, ((((panels, scale), sum), slack_norm), slack_residual)) in
                chunks.enumerate()
            {
                let share = Share {
                    first: chunk * per_thread * PANEL,
                    panels,
                    scale,
                    sum,
                    slack_norm,
                    slack_residual,
                };
                // Compiled for the kernel's instruction set: the quantizer's loops go wider.
                scope.spawn(move || {
                    kernel.vectorized(
                        #[inline(always)]
                        || share.fill(docs),
                    );
                });
            }
        });
        out
    }

    /// The bounds on the exact scores of one panel's documents against one query, given their
    /// integer products (NaN where a vector is not finite).
    #[inline(always)]
    pub(crate) fn bounds(
        &self,
        panel: usize,
        query: &QuantizedQuery,
        integer: &[i32; PANEL],
    ) -> Bounds {
        let docs = panel * PANEL..(panel + 1) * PANEL;
        let per_doc = |v: &[f32]| -> [f32; PANEL] { v[docs.clone()].try_into().expect("a panel") };
        let (scale, slack_norm, slack_residual) = (
            per_doc(&self.scale),
            per_doc(&self.slack_per_query_norm),
            per_doc(&self.slack_per_query_residual),
        );
        let sum: [i32; PANEL] = self.sum[docs].try_into().expect("a panel");
        // Plain loops over the lanes, not `array::from_fn`: that one is not inlined in the
        // dev profile, and a call per bound costs more than the arithmetic.
        let mut bounds = Bounds {
            lower: [0.0; PANEL],
            upper: [0.0; PANEL],
        };
        for j in 0..PANEL {
            // Exact in i32: both sums are below 255 · 127 · dim (`super::MAX_DIM`).
            let products = integer[j].wrapping_sub(query.offset.wrapping_mul(sum[j]));
            let approx = products as f32 * (query.scale * scale[j]);
            let slack = query.norm * slack_norm[j] + query.residual_norm * slack_residual[j];
            bounds.lower[j] = approx - slack;
            bounds.upper[j] = approx + slack;
        }
        bounds
    }
}

/// One thread's share of [`QuantizedDocs`]: whole panels, from document `first`.
struct Share<'a> {
    first: usize,
    panels: &'a mut [PanelQuad],
    scale: &'a mut [f32],
    sum: &'a mut [i32],
    slack_norm: &'a mut [f32],
    slack_residual: &'a mut [f32],
}

impl Share<'_> {
    #[inline(always)]
    fn fill(self, docs: Vectors<'_>) {
        let (dim, rows) = (docs.dim, docs.rows());
        let quads = dim.div_ceil(4);
        let mut q = vec![0i32; dim];
        let last = (self.first + self.scale.len()).min(rows);
        for (i, row) in (self.first..last).enumerate() {
            let x = &docs.data[row * dim..(row + 1) * dim];
            let (panel, col) = (i / PANEL, i % PANEL);
            let v = quantize(x, DOC_LEVELS, &mut q);
            if !v.norm.is_finite() {
                // Never skipped: its exact score decides (NaN is never kept).
                self.slack_norm[i] = f32::INFINITY;
                continue;
            }
            let quads = &mut self.panels[panel * quads..(panel + 1) * quads];
            for (quad, values) in quads.iter_mut().zip(q.chunks(4)) {
                for (byte, &value) in quad[col * 4..col * 4 + 4].iter_mut().zip(values) {
                    *byte = value as i8;
                }
            }
            self.scale[i] = v.scale;
            // |Σ| ≤ 127 · dim: no overflow.
            self.sum[i] = q.iter().fold(0i32, |a, &v| a.wrapping_add(v));
            self.slack_norm[i] = v.residual_norm + rounding_allowance(dim) * v.norm;
            self.slack_residual[i] = v.stored_norm;
        }
    }
}

/// Bounds on the exact scores of one query against the [`PANEL`] documents of a panel.
pub(crate) struct Bounds {
    pub lower: [f32; PANEL],
    pub upper: [f32; PANEL],
}

/// One query, quantized: unsigned bytes for the kernel and the terms of its side of the bound.
pub(crate) struct QuantizedQuery {
    /// Added to each component to store it as an unsigned byte.
    offset: i32,
    pub scale: f32,
    /// ‖q‖: infinite or NaN for a vector that is not finite (every document is then rescored).
    pub norm: f32,
    /// ‖r_q‖
    pub residual_norm: f32,
}

impl QuantizedQuery {
    /// Quantizes `x` into `bytes` (`dim` rounded up to groups of 4; padding components are
    /// zero) as components in [-levels, levels] plus `levels + 1`: unsigned bytes in
    /// [1, 2·levels + 1] (`levels` ≤ 127, [`super::kernel::Kernel::query_levels`]).
    #[inline(always)]
    pub fn new(
        x: &[f32],
        levels: u8,
        bytes: &mut [[u8; 4]],
        scratch: &mut Vec<i32>,
    ) -> QuantizedQuery {
        assert!(levels <= 127, "query levels {levels} exceed a byte");
        let offset = i32::from(levels) + 1;
        scratch.resize(x.len(), 0);
        let v = quantize(x, f32::from(levels), scratch);
        bytes.fill([offset as u8; 4]);
        for (b, &q) in bytes.as_flattened_mut().iter_mut().zip(scratch.iter()) {
            *b = (q + offset) as u8;
        }
        QuantizedQuery {
            offset,
            scale: v.scale,
            norm: v.norm,
            residual_norm: v.residual_norm,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::retrieval::kernel::{ROWS, dot};

    /// The lower and upper bounds the search derives for one pair with `kernel`.
    fn bounds_of(kernel: Kernel, q: &[f32], d: &[f32]) -> (f32, f32) {
        let docs = QuantizedDocs::new(
            Vectors {
                data: d,
                dim: d.len(),
            },
            kernel,
            1,
        );
        let mut bytes = vec![[0u8; 4]; docs.quads];
        let query = QuantizedQuery::new(q, kernel.query_levels(), &mut bytes, &mut Vec::new());
        let integer = kernel.panel([bytes.as_slice(); ROWS], &docs.panels[..docs.quads]);
        let bounds = docs.bounds(0, &query, &integer[0]);
        (bounds.lower[0], bounds.upper[0])
    }

    /// The bound holds for random and for adversarial pairs, with every kernel's query code,
    /// and the adversarial ones (an exactly quantized query along the document's rounding
    /// residual) come within 10% of the document term, so that term cannot be made smaller.
    #[test]
    fn bounds_hold_and_the_document_term_is_reached() {
        for kernel in Kernel::available() {
            let levels = f32::from(kernel.query_levels());
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut tightest = 0f32;
            for trial in 0..3000 {
                let dim = [384, 7, 768][trial % 3];
                let scale = 10f32.powi(rng.random_range(-4..5));
                let d: Vec<f32> = (0..dim)
                    .map(|_| rng.random_range(-1.0..1.0) * scale)
                    .collect();
                let mut q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                let adversarial = trial % 2 == 0;
                let mut residual_norm = 0.0;
                if adversarial {
                    let mut ints = vec![0; dim];
                    let v = quantize(&d, DOC_LEVELS, &mut ints);
                    residual_norm = v.residual_norm;
                    // Integers of magnitude up to the query levels: the query's own rounding
                    // residual is zero, so the error is all the document's, q·r_d.
                    let r: Vec<f32> = d
                        .iter()
                        .zip(&ints)
                        .map(|(&x, &i)| x - i as f32 * v.scale)
                        .collect();
                    let max = max_abs(&r);
                    for (q, r) in q.iter_mut().zip(r) {
                        *q = round_small(levels * r / max);
                    }
                }
                let exact = dot(&q, &d);
                let (lower, upper) = bounds_of(kernel, &q, &d);
                assert!(
                    lower <= exact && exact <= upper,
                    "{kernel:?}, trial {trial}: {lower} {exact} {upper}"
                );
                if adversarial && residual_norm > 0.0 && max_abs(&q) > 0.0 {
                    let approx = (lower + upper) / 2.0;
                    let doc_term = dot(&q, &q).sqrt() * residual_norm;
                    tightest = tightest.max((exact - approx) / doc_term);
                }
            }
            assert!(tightest > 0.9, "{kernel:?}: closest approach {tightest}");
        }
    }
}
