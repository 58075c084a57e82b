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
//!
//! The same bound holds for any query code. The kernels' 8-bit code (151 levels under AVX2)
//! screens every pair; a document that passes is bounded again with a 16-bit query code
//! ([`FineQuery`]) against its bytes, kept in a row of their own: ‖r_q‖ then all but
//! vanishes, and the fine bound is the document's rounding alone, a third to a half as wide.

use super::Vectors;
use super::kernel::{GROUP, Kernel, LANE_BYTES, LANE_QUADS, PanelQuad, ROWS};

/// Documents per panel: the kernel's column count.
pub(crate) const PANEL: usize = 16;
/// Document components lie in [-127, 127] (never -128: the bound stays symmetric).
const DOC_LEVELS: f32 = 127.0;
/// The sum of |xᵢ| / s over each lane group is at most this: rounding adds at most ½ to each
/// of its 2·[`LANE_QUADS`] components, so the bytes sum to at most [`LANE_BYTES`].
const GROUP_L1: f32 = (LANE_BYTES - LANE_QUADS as i32) as f32;

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
fn quantize(x: &[f32], max: f32, levels: f32, out: &mut [i32]) -> Quantized {
    let (scale, inverse) = scale_of(max, levels);
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

/// What a document is quantized against: its largest |xᵢ|, or more where a lane group needs
/// it. The AVX2 kernel adds in one 16-bit lane the byte products of 2·[`LANE_QUADS`]
/// components (components {0, 1} of [`LANE_QUADS`] consecutive groups of 4, and {2, 3});
/// scaled so that each such group's |xᵢ| sum to at most [`GROUP_L1`] · s, their rounded bytes
/// sum to at most [`LANE_BYTES`] in magnitude and the lane stays within i16. `groups` is the
/// largest group sum ([`largest_group`]), given only for that kernel ([`Kernel::lane_groups`]):
/// on Gaussian vectors the groups decide for most documents, and applied under every kernel
/// such coarser scales made the AVX-512 search 3% slower.
#[inline(always)]
fn document_max(largest: f32, groups: Option<f32>) -> f32 {
    let needed = groups.map_or(0.0, |g| g * (DOC_LEVELS / GROUP_L1));
    // A comparison: NaN (a vector that is not finite, zeroed anyway) never wins it.
    if needed > largest { needed } else { largest }
}

/// [`document_max`] of `x`, lane groups counted where `grouped`.
#[inline(always)]
fn document_range(x: &[f32], grouped: bool) -> f32 {
    document_max(max_abs(x), grouped.then(|| largest_group(x)))
}

/// The largest lane-group sum of `x` ([`document_max`]): each group of 4 components adds its
/// pairs `[|x₀| + |x₁|, |x₂| + |x₃|]` to its lane group's two sums, in that order, as the vector
/// quantizer does (`largest_group_avx2`).
#[inline(always)]
fn largest_group(x: &[f32]) -> f32 {
    let mut largest = 0f32;
    for lane in x.chunks(4 * LANE_QUADS) {
        let mut sums = [0f32; 2];
        for quad in lane.chunks(4) {
            let a = |i: usize| quad.get(i).map_or(0.0, |v| v.abs());
            sums[0] += a(0) + a(1);
            sums[1] += a(2) + a(3);
        }
        for sum in sums {
            // A comparison: NaN (a vector that is not finite) never wins it.
            largest = if sum > largest { sum } else { largest };
        }
    }
    largest
}

/// The scale s = max / levels and its inverse; (0, 0) where there is nothing to scale or the
/// inverse would overflow (a subnormal maximum): every component then rounds to 0 and the
/// residual is the vector itself, so the bound still holds.
#[inline(always)]
fn scale_of(max: f32, levels: f32) -> (f32, f32) {
    let inverse = levels / max;
    if max > 0.0 && max.is_finite() && inverse.is_finite() {
        (max / levels, inverse)
    } else {
        (0.0, 0.0)
    }
}

/// Round to nearest (ties to even) for |x| < 2²²: adding and taking back 1.5·2²³ leaves no
/// fraction bits. Unlike `f32::round` it vectorizes without SSE4.1.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Largest |xᵢ| of the finite components, in [`LANES`] lanes (a scalar fold would not
/// vectorize; 8 lanes made one short vector chain).
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    // A comparison, not `f32::max`: that one orders NaN and stays scalar. NaN never wins it.
    // A select, not a conditional store: that one became masked stores to the stack.
    let larger = |lane: &mut f32, v: &f32| *lane = if v.abs() > *lane { v.abs() } else { *lane };
    let mut lanes = [0f32; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    lanes.iter_mut().zip(tail).for_each(|(l, v)| larger(l, v));
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| larger(l, v));
    }
    lanes.into_iter().fold(0.0, f32::max)
}

/// Documents quantized and packed in panels of [`PANEL`]: a run of the corpus's panels,
/// refilled as the search moves through the corpus, so the corpus is never copied whole.
pub(crate) struct QuantizedDocs {
    kernel: Kernel,
    /// Groups of 4 components per vector (the dimension rounded up to a multiple of 4).
    pub quads: usize,
    /// The corpus panel held first.
    pub first: usize,
    /// `[panel][quad]`; a panel past the last document holds zero documents.
    pub panels: Vec<PanelQuad>,
    /// Per panel, the document side of the bound.
    terms: Vec<PanelTerms>,
    /// Each held document's bytes again, in a row of [`FineQuery::len`] (zero-padded), for
    /// its fine bounds: a column of a panel is scattered over as many cache lines as groups.
    rows: Vec<i8>,
    /// Documents quantized within the lane groups' limit ([`Kernel::lane_groups`]).
    grouped: bool,
}

/// The document side of the bound for the [`PANEL`] documents of a panel (zero for padding),
/// one 64-byte line per term so a panel's terms load as four vectors.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
pub(crate) struct PanelTerms {
    scale: [f32; PANEL],
    /// `(levels + 1)·Σ d̂ᵢ`: the query bytes' offset times the components' sum, taken out of
    /// the kernel's sums. |levels + 1| ≤ 128 and |Σ| ≤ 127 · dim: inside i32 to `MAX_DIM`.
    offset_sum: [i32; PANEL],
    /// `‖r_d‖ + γ‖d‖`, multiplied by ‖q‖ in the bound; infinite for a vector that is not finite
    /// (always rescored).
    slack_norm: [f32; PANEL],
    /// `‖s_d d̂‖`, multiplied by ‖r_q‖ in the bound.
    slack_residual: [f32; PANEL],
}

impl PanelTerms {
    /// Document j's (lower, upper) bound against `query` given their integer product (NaN
    /// where a vector is not finite). [`QuantizedDocs::screen`] computes the same bounds, with
    /// the same operations in the same order, 16 documents at a time.
    #[inline(always)]
    fn bounds(&self, j: usize, query: &QuantizedQuery, integer: i32) -> (f32, f32) {
        // Exact in i32: both sums are below 255 · 127 · dim (`super::MAX_DIM`).
        self.bounds_of_products(j, query, integer.wrapping_sub(self.offset_sum[j]))
    }

    /// The bounds given q̂·d̂ itself (no query offset in it).
    #[inline(always)]
    fn bounds_of_products(&self, j: usize, query: &QuantizedQuery, products: i32) -> (f32, f32) {
        let approx = products as f32 * (query.scale * self.scale[j]);
        let slack = query.norm * self.slack_norm[j] + query.residual_norm * self.slack_residual[j];
        (approx - slack, approx + slack)
    }
}

impl QuantizedDocs {
    /// Empty, for documents of `dim` components scored with `kernel`.
    pub fn new(kernel: Kernel, dim: usize) -> QuantizedDocs {
        QuantizedDocs {
            kernel,
            quads: dim.div_ceil(4),
            first: 0,
            panels: Vec::new(),
            terms: Vec::new(),
            rows: Vec::new(),
            grouped: kernel.lane_groups(),
        }
    }

    /// Quantizes the corpus panels `range` of `docs` in place of those held (reusing the
    /// memory: the search refills it for every run of panels).
    pub fn fill(&mut self, docs: Vectors<'_>, range: std::ops::Range<usize>) {
        debug_assert_eq!(docs.dim.div_ceil(4), self.quads);
        self.first = range.start;
        self.panels.resize(range.len() * self.quads, [0; 4 * PANEL]);
        self.terms.resize(range.len(), PanelTerms::default());
        self.rows
            .resize(range.len() * PANEL * FineQuery::len(docs.dim), 0);
        let (kernel, grouped) = (self.kernel, self.grouped);
        let share = Share {
            first: range.start * PANEL,
            panels: &mut self.panels,
            rows: &mut self.rows,
            terms: &mut self.terms,
        };
        // Compiled for the kernel's instruction set: the quantizer's loops go wider.
        kernel.vectorized(
            #[inline(always)]
            || share.fill(docs, kernel, grouped),
        );
    }

    /// Document j of held panel `panel`'s bounds on its exact score against `query`, given
    /// their integer product: (lower, upper), NaN where a vector is not finite (the screen's
    /// bounds, one at a time).
    #[cfg(test)]
    pub(crate) fn bounds(
        &self,
        panel: usize,
        j: usize,
        query: &QuantizedQuery,
        integer: i32,
    ) -> (f32, f32) {
        self.terms[panel].bounds(j, query, integer)
    }

    /// Document j of held panel `panel`'s bounds against a query's fine code (its product
    /// with the document's row): the query's rounding all but leaves the bound. The screen
    /// lets through the documents whose coarse bound reaches the floor; these bounds decide
    /// which are kept, and raise the floor.
    #[inline(always)]
    pub(crate) fn fine_bounds(&self, panel: usize, j: usize, query: &FineQuery<'_>) -> (f32, f32) {
        let len = query.codes.len();
        let row = (panel * PANEL + j) * len;
        let products = self
            .kernel
            .fine_product(&self.rows[row..row + len], query.codes);
        self.terms[panel].bounds_of_products(j, &query.terms, products)
    }

    /// Which documents of the held panels from `first` (one per element of `products`, at most
    /// [`GROUP`]) reach each query's floor: bit j of `[g][r]` is set where the `side` bound of
    /// document j of panel `first + g` against query r is at least `floors[r]`, or NaN. Under
    /// AVX-512 a whole group is screened in vector registers, the scalar bounds left for the
    /// few documents that pass.
    #[inline(always)]
    pub(crate) fn screen(
        &self,
        side: Side,
        first: usize,
        queries: &[QuantizedQuery; ROWS],
        floors: &[f32; ROWS],
        products: &[[[i32; PANEL]; ROWS]],
    ) -> [[u32; ROWS]; GROUP] {
        let terms = &self.terms[first..first + products.len()];
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512Vnni
            && let (Ok(terms), Ok(products)) = (terms.try_into(), products.try_into())
        {
            // SAFETY: the kernel's features (AVX-512F among them) were detected at run time.
            return unsafe { screen_avx512(side, terms, queries, floors, products) };
        }
        let mut masks = [[0; ROWS]; GROUP];
        for ((masks, terms), products) in masks.iter_mut().zip(terms).zip(products) {
            for r in 0..ROWS {
                let mut bound = [0.0; PANEL];
                for (j, bound) in bound.iter_mut().enumerate() {
                    let (lower, upper) = terms.bounds(j, &queries[r], products[r][j]);
                    *bound = side.of(lower, upper);
                }
                masks[r] = reaching(&bound, floors[r]);
            }
        }
        masks
    }
}

/// Which bound [`QuantizedDocs::screen`] holds against the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Lower,
    Upper,
}

impl Side {
    /// This side of a (lower, upper) pair, scalars or vectors.
    #[inline(always)]
    pub(crate) fn of<T>(self, lower: T, upper: T) -> T {
        match self {
            Side::Lower => lower,
            Side::Upper => upper,
        }
    }
}

/// [`QuantizedDocs::screen`] for a whole group, 16 documents per vector: the operations of
/// [`PanelTerms::bounds`], lane by lane, so the mask is the scalar one's.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn screen_avx512(
    side: Side,
    terms: &[PanelTerms; GROUP],
    queries: &[QuantizedQuery; ROWS],
    floors: &[f32; ROWS],
    products: &[[[i32; PANEL]; ROWS]; GROUP],
) -> [[u32; ROWS]; GROUP] {
    use std::arch::x86_64::*;
    // SAFETY (the transmutes): 16 lanes of 4 bytes are one 512-bit vector, every bit pattern
    // valid.
    let floats = |v: &[f32; PANEL]| unsafe { std::mem::transmute::<[f32; PANEL], __m512>(*v) };
    let ints = |v: &[i32; PANEL]| unsafe { std::mem::transmute::<[i32; PANEL], __m512i>(*v) };
    let mut masks = [[0; ROWS]; GROUP];
    for g in 0..GROUP {
        let t = &terms[g];
        let (scale, offset_sum) = (floats(&t.scale), ints(&t.offset_sum));
        let (slack_norm, slack_residual) = (floats(&t.slack_norm), floats(&t.slack_residual));
        for r in 0..ROWS {
            let q = &queries[r];
            let products = _mm512_cvtepi32_ps(_mm512_sub_epi32(ints(&products[g][r]), offset_sum));
            let approx = _mm512_mul_ps(products, _mm512_mul_ps(_mm512_set1_ps(q.scale), scale));
            let slack = _mm512_add_ps(
                _mm512_mul_ps(_mm512_set1_ps(q.norm), slack_norm),
                _mm512_mul_ps(_mm512_set1_ps(q.residual_norm), slack_residual),
            );
            let bound = side.of(_mm512_sub_ps(approx, slack), _mm512_add_ps(approx, slack));
            // "Not less than", unordered: true for NaN.
            masks[g][r] = u32::from(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(
                bound,
                _mm512_set1_ps(floors[r]),
            ));
        }
    }
    masks
}

/// Bit j is set where `bound[j]` reaches `floor` or is NaN. Most panels have none.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn reaching(bound: &[f32; PANEL], floor: f32) -> u32 {
    use std::arch::x86_64::*;
    // The compiler builds the mask bit by bit; SSE (part of x86-64) compares 4 at a time.
    // SAFETY: 16 f32 are four 128-bit vectors, every bit pattern valid.
    unsafe {
        let floor = _mm_set1_ps(floor);
        let quarters = std::mem::transmute::<[f32; PANEL], [__m128; 4]>(*bound);
        quarters.iter().enumerate().fold(0, |mask, (i, &u)| {
            // "Not less than": true for NaN.
            mask | ((_mm_movemask_ps(_mm_cmpnlt_ps(u, floor)) as u32) << (4 * i))
        })
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn reaching(bound: &[f32; PANEL], floor: f32) -> u32 {
    bound.iter().enumerate().fold(0, |mask, (j, &u)| {
        mask | (u32::from(u >= floor || u.is_nan()) << j)
    })
}

/// The panels being filled, from document `first`.
struct Share<'a> {
    first: usize,
    panels: &'a mut [PanelQuad],
    terms: &'a mut [PanelTerms],
    rows: &'a mut [i8],
}

impl Share<'_> {
    /// Quantizes every column of the panels: a document's, or zero past the last document.
    #[inline(always)]
    fn fill(self, docs: Vectors<'_>, kernel: Kernel, grouped: bool) {
        let (dim, rows) = (docs.dim, docs.rows());
        let quads = dim.div_ceil(4);
        // The query bytes' offset, taken out of the kernel's sums with the document's sum.
        let offset = i32::from(kernel.query_levels()) + 1;
        let mut scratch = vec![0i32; dim];
        let row_len = FineQuery::len(dim);
        for i in 0..self.terms.len() * PANEL {
            let (panel, col) = (i / PANEL, i % PANEL);
            let mut out = DocumentBytes {
                quads: &mut self.panels[panel * quads..(panel + 1) * quads],
                col,
                row: &mut self.rows[i * row_len..(i + 1) * row_len],
            };
            let terms = &mut self.terms[panel];
            let row = self.first + i;
            // An `if`, not `bool::then`: that one's closure stayed a call, compiled for the
            // baseline instruction set (SSE2), where the quantizer ran at half speed.
            let quantized = if row < rows {
                let x = &docs.data[row * dim..(row + 1) * dim];
                Some(match kernel {
                    // SAFETY: the kernel's features (AVX-512F among them) were detected at run
                    // time.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => unsafe { quantize_document_avx512(x, &mut out) },
                    // SAFETY: as above, AVX2.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 | Kernel::AvxVnni => unsafe {
                        quantize_document_avx2(x, &mut out, grouped)
                    },
                    _ => quantize_document(x, &mut out, &mut scratch, grouped),
                })
            } else {
                None
            };
            match quantized {
                Some((v, sum)) if v.norm.is_finite() => {
                    terms.scale[col] = v.scale;
                    terms.offset_sum[col] = offset.wrapping_mul(sum);
                    terms.slack_norm[col] = v.residual_norm + rounding_allowance(dim) * v.norm;
                    terms.slack_residual[col] = v.stored_norm;
                }
                not_finite_or_padding => {
                    for quad in 0..quads {
                        out.put(quad, [0; 4]);
                    }
                    terms.scale[col] = 0.0;
                    terms.offset_sum[col] = 0;
                    terms.slack_residual[col] = 0.0;
                    // A vector that is not finite is never skipped: its exact score decides
                    // (NaN is never kept). Padding is masked out by the search.
                    terms.slack_norm[col] = match not_finite_or_padding {
                        Some(_) => f32::INFINITY,
                        None => 0.0,
                    };
                }
            }
        }
    }
}

/// Where a document's bytes go: column `col` of its panel's groups of 4, and its row.
struct DocumentBytes<'a> {
    quads: &'a mut [PanelQuad],
    col: usize,
    row: &'a mut [i8],
}

impl DocumentBytes<'_> {
    /// Writes group `quad`'s 4 bytes (nothing past the last group), each copy as one store
    /// (byte by byte, the loops stayed scalar).
    #[inline(always)]
    fn put(&mut self, quad: usize, bytes: [i8; 4]) {
        if let Some(panel) = self.quads.get_mut(quad) {
            panel[self.col * 4..self.col * 4 + 4].copy_from_slice(&bytes);
            self.row[4 * quad..4 * quad + 4].copy_from_slice(&bytes);
        }
    }
}

/// Quantizes document `x` into `out`; returns its terms and the sum of its components
/// (|Σ| ≤ 127 · dim: no overflow). A vector that is not finite leaves its bytes undefined
/// (`norm` says so).
#[inline(always)]
fn quantize_document(
    x: &[f32],
    out: &mut DocumentBytes<'_>,
    scratch: &mut [i32],
    grouped: bool,
) -> (Quantized, i32) {
    let v = quantize(x, document_range(x, grouped), DOC_LEVELS, scratch);
    let (whole, tail) = scratch.as_chunks::<4>();
    for (quad, values) in whole.iter().enumerate() {
        out.put(quad, values.map(|v| v as i8));
    }
    let mut last = [0i8; 4];
    for (byte, &value) in last.iter_mut().zip(tail) {
        *byte = value as i8;
    }
    out.put(whole.len(), last);
    (v, scratch.iter().fold(0i32, |a, &v| a.wrapping_add(v)))
}

/// [`quantize_document`] 16 components per vector: the same integers (rounding to nearest,
/// ties to even, needs no clamp: |xᵢ|·127/max ≤ 127 rounds to at most 127), norms summed in
/// another order (the bound's allowance covers any). The corpus is read once here; the
/// portable loops took twice as long as the products of a thousand queries' first pass.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_document_avx512(x: &[f32], out: &mut DocumentBytes<'_>) -> (Quantized, i32) {
    use std::arch::x86_64::*;
    let (chunks, tail) = x.as_chunks::<16>();
    let tail_mask: __mmask16 = (1 << tail.len()) - 1;
    // SAFETY: 16 f32 as one 512-bit vector; the tail's masked load reads its own elements only.
    let load = |i: usize| unsafe {
        match chunks.get(i) {
            Some(chunk) => std::mem::transmute::<[f32; 16], __m512>(*chunk),
            None => _mm512_maskz_loadu_ps(tail_mask, tail.as_ptr()),
        }
    };
    let vectors = chunks.len() + usize::from(!tail.is_empty());
    let mut largest = _mm512_setzero_ps();
    for i in 0..vectors {
        largest = _mm512_max_ps(largest, _mm512_abs_ps(load(i)));
    }
    let (scale, inverse) = scale_of(_mm512_reduce_max_ps(largest), DOC_LEVELS);
    let (scale_v, inverse_v) = (_mm512_set1_ps(scale), _mm512_set1_ps(inverse));
    let [mut norm, mut residual, mut stored] = [_mm512_setzero_ps(); 3];
    let mut sum = _mm512_setzero_si512();
    for i in 0..vectors {
        let v = load(i);
        // Rounds to nearest, ties to even (the default rounding mode).
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse_v));
        let kept = _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale_v);
        let r = _mm512_sub_ps(v, kept);
        norm = _mm512_fmadd_ps(v, v, norm);
        residual = _mm512_fmadd_ps(r, r, residual);
        stored = _mm512_fmadd_ps(kept, kept, stored);
        sum = _mm512_add_epi32(sum, q);
        // SAFETY: 16 bytes as four 4-byte quads, every bit pattern valid.
        let bytes =
            unsafe { std::mem::transmute::<__m128i, [[i8; 4]; 4]>(_mm512_cvtepi32_epi8(q)) };
        for (k, bytes) in bytes.into_iter().enumerate() {
            out.put(4 * i + k, bytes);
        }
    }
    let quantized = Quantized {
        scale,
        norm: _mm512_reduce_add_ps(norm).sqrt(),
        residual_norm: _mm512_reduce_add_ps(residual).sqrt(),
        stored_norm: _mm512_reduce_add_ps(stored).sqrt(),
    };
    (quantized, _mm512_reduce_add_epi32(sum))
}

/// [`quantize_document_avx512`] 8 components per vector, for the 256-bit kernels: the same
/// integers as the portable loops, which it replaced there at a third of their time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_document_avx2(
    x: &[f32],
    out: &mut DocumentBytes<'_>,
    grouped: bool,
) -> (Quantized, i32) {
    use std::arch::x86_64::*;
    let (chunks, tail) = x.as_chunks::<8>();
    // The tail zero-padded: zeros change no maximum, norm or sum.
    let mut last = [0f32; 8];
    last[..tail.len()].copy_from_slice(tail);
    // SAFETY: 8 f32 as one 256-bit vector, every bit pattern valid.
    let load = |i: usize| unsafe {
        std::mem::transmute::<[f32; 8], __m256>(*chunks.get(i).unwrap_or(&last))
    };
    let vectors = chunks.len() + usize::from(!tail.is_empty());
    let sign = _mm256_set1_ps(-0.0);
    // |x|, zero past the end.
    let abs = |i: usize| {
        if i < vectors {
            _mm256_andnot_ps(sign, load(i))
        } else {
            _mm256_setzero_ps()
        }
    };
    let mut largest = _mm256_setzero_ps();
    for i in 0..vectors {
        largest = _mm256_max_ps(largest, abs(i));
    }
    // SAFETY: a 256-bit vector is 8 f32.
    let lanes = |v: __m256| unsafe { std::mem::transmute::<__m256, [f32; 8]>(v) };
    let largest = lanes(largest).into_iter().fold(0.0, f32::max);
    // SAFETY: as this function, AVX2.
    let groups = grouped.then(|| unsafe { largest_group_avx2(abs, vectors) });
    let max = document_max(largest, groups);
    let (scale, inverse) = scale_of(max, DOC_LEVELS);
    let (scale_v, inverse_v) = (_mm256_set1_ps(scale), _mm256_set1_ps(inverse));
    let [mut norm, mut residual, mut stored] = [_mm256_setzero_ps(); 3];
    let mut sum = _mm256_setzero_si256();
    for i in 0..vectors {
        let v = load(i);
        // Rounds to nearest, ties to even (the default rounding mode).
        let q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse_v));
        let kept = _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale_v);
        let r = _mm256_sub_ps(v, kept);
        // Multiply and add (AVX2 does not imply FMA).
        norm = _mm256_add_ps(norm, _mm256_mul_ps(v, v));
        residual = _mm256_add_ps(residual, _mm256_mul_ps(r, r));
        stored = _mm256_add_ps(stored, _mm256_mul_ps(kept, kept));
        sum = _mm256_add_epi32(sum, q);
        // Narrowed within each 128-bit half (|q| ≤ 127: no saturation): components 0-3 are
        // bytes 0-3, components 4-7 bytes 16-19.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(q, q), q);
        let bytes = [
            _mm256_extract_epi32::<0>(packed),
            _mm256_extract_epi32::<4>(packed),
        ];
        for (k, bytes) in bytes.into_iter().enumerate() {
            out.put(2 * i + k, bytes.to_le_bytes().map(|b| b as i8));
        }
    }
    let total = |v: __m256| lanes(v).iter().sum::<f32>().sqrt();
    let quantized = Quantized {
        scale,
        norm: total(norm),
        residual_norm: total(residual),
        stored_norm: total(stored),
    };
    // SAFETY: as above.
    let sums = unsafe { std::mem::transmute::<__m256i, [i32; 8]>(sum) };
    (quantized, sums.iter().fold(0i32, |a, &v| a.wrapping_add(v)))
}

/// [`largest_group`] 24 components at a time, `abs(i)` being |x| of the i-th 8 (zero past
/// `vectors`): two lane groups of 3 groups of 4, summed in the same order, so the same sums.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn largest_group_avx2(
    abs: impl Fn(usize) -> std::arch::x86_64::__m256,
    vectors: usize,
) -> f32 {
    use std::arch::x86_64::*;
    const {
        assert!(
            LANE_QUADS == 3,
            "three groups of 4 per lane group: 24 components"
        );
    }
    // Adjacent pairs: lanes 0-3 hold the pairs of one group of 4 ([p₀, p₀, p₁, p₁]), lanes
    // 4-7 the next's.
    let pairs = |i: usize| {
        let a = abs(i);
        _mm256_add_ps(a, _mm256_permute_ps::<0b10_11_00_01>(a))
    };
    let swap = |v: __m256| _mm256_permute2f128_ps::<1>(v, v);
    let mut largest = _mm_setzero_ps();
    for first in (0..vectors).step_by(3) {
        // Groups A..F of 4 in three vectors [A B] [C D] [E F]: the low halves get (A + B) + C
        // and (D + E) + F.
        let [ab, cd, ef] = [pairs(first), pairs(first + 1), pairs(first + 2)];
        let abc = _mm256_add_ps(_mm256_add_ps(ab, swap(ab)), cd);
        let def = _mm256_add_ps(_mm256_add_ps(swap(cd), ef), swap(ef));
        let sums = _mm_max_ps(_mm256_castps256_ps128(abc), _mm256_castps256_ps128(def));
        largest = _mm_max_ps(largest, sums);
    }
    // SAFETY: a 128-bit vector is 4 f32.
    let lanes = unsafe { std::mem::transmute::<__m128, [f32; 4]>(largest) };
    lanes.into_iter().fold(0.0, f32::max)
}

/// One query, quantized: unsigned bytes for the kernel and the terms of its side of the bound.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QuantizedQuery {
    scale: f32,
    /// ‖q‖: infinite or NaN for a vector that is not finite (every document is then rescored).
    norm: f32,
    /// ‖r_q‖
    residual_norm: f32,
}

/// A query's fine code: components in [-levels, levels] as i16 (levels up to 32,767, fewer
/// where `dim` would overflow i32: [`fine_levels`]), zero-padded to [`FineQuery::len`], with
/// its side of the bound.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FineQuery<'a> {
    terms: QuantizedQuery,
    codes: &'a [i16],
}

/// Levels of a fine query code: |q̂ᵢ·d̂ᵢ| ≤ levels · 127 summed over `dim` stays in i32.
pub(crate) fn fine_levels(dim: usize) -> f32 {
    (i32::MAX as usize / (127 * dim.max(1))).min(i16::MAX as usize) as f32
}

impl<'a> FineQuery<'a> {
    /// Codes per query for documents of `dim` components, and bytes per document row: `dim`
    /// rounded up to 32 (the vector fine products read 32 at a time).
    pub fn len(dim: usize) -> usize {
        dim.div_ceil(32) * 32
    }

    /// Quantizes `x` into `codes` ([`FineQuery::len`] long).
    #[inline(always)]
    pub fn new(x: &[f32], codes: &'a mut [i16], scratch: &mut Vec<i32>) -> FineQuery<'a> {
        let terms = QuantizedQuery::code(x, fine_levels(x.len()), scratch);
        codes.fill(0);
        for (c, &q) in codes.iter_mut().zip(scratch.iter()) {
            // Within [-32767, 32767] (`fine_levels`).
            *c = q as i16;
        }
        FineQuery { terms, codes }
    }
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
        let terms = QuantizedQuery::code(x, f32::from(levels), scratch);
        bytes.fill([offset as u8; 4]);
        for (b, &q) in bytes.as_flattened_mut().iter_mut().zip(scratch.iter()) {
            *b = (q + offset) as u8;
        }
        terms
    }

    /// Quantizes `x` to `levels` against its largest component, the integers into `scratch`;
    /// returns the query's side of the bound.
    #[inline(always)]
    fn code(x: &[f32], levels: f32, scratch: &mut Vec<i32>) -> QuantizedQuery {
        scratch.resize(x.len(), 0);
        let v = quantize(x, max_abs(x), levels, scratch);
        QuantizedQuery {
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
    use crate::retrieval::kernel::dot;

    /// The coarse (kernel) and the fine bounds the search derives for one pair with `kernel`.
    fn bounds_of(kernel: Kernel, q: &[f32], d: &[f32]) -> [(f32, f32); 2] {
        let mut docs = QuantizedDocs::new(kernel, d.len());
        let vectors = Vectors {
            data: d,
            dim: d.len(),
        };
        docs.fill(vectors, 0..1);
        let mut bytes = vec![[0u8; 4]; docs.quads];
        let query = QuantizedQuery::new(q, kernel.query_levels(), &mut bytes, &mut Vec::new());
        let integer = kernel.panel([bytes.as_slice(); ROWS], &docs.panels[..docs.quads]);
        let mut codes = vec![0i16; FineQuery::len(d.len())];
        let fine = FineQuery::new(q, &mut codes, &mut Vec::new());
        [
            docs.bounds(0, 0, &query, integer[0][0]),
            docs.fine_bounds(0, 0, &fine),
        ]
    }

    /// The coarse and the fine bounds hold for random and for adversarial pairs, with every
    /// kernel's query code; the adversarial ones (an exactly quantized query along the
    /// document's rounding residual) come within 10% of the document term, so that term cannot
    /// be made smaller; on random pairs the fine bound is at most 0.6 of the coarse one's width.
    #[test]
    fn bounds_hold_and_the_document_term_is_reached() {
        for kernel in Kernel::available() {
            let levels = f32::from(kernel.query_levels());
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut tightest = 0f32;
            let (mut coarse_width, mut fine_width) = (0f64, 0f64);
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
                    let max = document_range(&d, kernel.lane_groups());
                    let v = quantize(&d, max, DOC_LEVELS, &mut ints);
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
                let [(lower, upper), fine] = bounds_of(kernel, &q, &d);
                for (lower, upper) in [(lower, upper), fine] {
                    assert!(
                        lower <= exact && exact <= upper,
                        "{kernel:?}, trial {trial}: {lower} {exact} {upper}"
                    );
                }
                if !adversarial {
                    coarse_width += f64::from((upper - lower) / (scale * dim as f32));
                    fine_width += f64::from((fine.1 - fine.0) / (scale * dim as f32));
                }
                if adversarial && residual_norm > 0.0 && max_abs(&q) > 0.0 {
                    let approx = (lower + upper) / 2.0;
                    let doc_term = dot(&q, &q).sqrt() * residual_norm;
                    tightest = tightest.max((exact - approx) / doc_term);
                }
            }
            assert!(tightest > 0.9, "{kernel:?}: closest approach {tightest}");
            let ratio = fine_width / coarse_width;
            assert!(
                ratio < 0.6,
                "{kernel:?}: fine bounds {ratio} of the coarse width"
            );
        }
    }

    #[test]
    fn reaching_marks_bounds_at_or_above_the_floor_and_nan() {
        let mut upper = [0.0f32; PANEL];
        upper[1] = 1.0;
        upper[2] = 2.0;
        upper[5] = f32::NAN;
        upper[15] = f32::INFINITY;
        upper[9] = f32::NEG_INFINITY;
        assert_eq!(reaching(&upper, 1.0), 0b1000_0000_0010_0110);
        assert_eq!(reaching(&upper, f32::NEG_INFINITY), 0xffff);
        assert_eq!(reaching(&upper, f32::INFINITY), 0b1000_0000_0010_0000);
    }

    /// The screen marks exactly the documents whose scalar lower or upper bound reaches each
    /// query's floor (NaN included), with every kernel, whole groups and a short one, floors set to
    /// bounds themselves (the equality edge) and around them.
    #[test]
    fn screen_marks_what_the_scalar_bounds_let_through() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let dim = 40;
        let rows = GROUP * PANEL;
        let mut data: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        data[7 * dim + 3] = f32::NAN;
        data[21 * dim] = f32::INFINITY;
        let docs = Vectors { data: &data, dim };
        for kernel in Kernel::available() {
            let mut quantized = QuantizedDocs::new(kernel, dim);
            quantized.fill(docs, 0..GROUP);
            let mut bytes = vec![[0u8; 4]; ROWS * quantized.quads];
            let mut queries = [QuantizedQuery::default(); ROWS];
            for (query, row) in queries
                .iter_mut()
                .zip(bytes.chunks_exact_mut(quantized.quads))
            {
                let x: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                *query = QuantizedQuery::new(&x, kernel.query_levels(), row, &mut Vec::new());
            }
            let rows: [&[[u8; 4]]; ROWS] =
                std::array::from_fn(|r| &bytes[r * quantized.quads..(r + 1) * quantized.quads]);
            let products: Vec<[[i32; PANEL]; ROWS]> = quantized
                .panels
                .chunks_exact(quantized.quads)
                .map(|panel| kernel.panel(rows, panel))
                .collect();
            let bound = |side: Side, p: usize, r: usize, j: usize| {
                let (lower, upper) = quantized.bounds(p, j, &queries[r], products[p][r][j]);
                side.of(lower, upper)
            };
            for trial in 0..40 {
                let side = [Side::Lower, Side::Upper][trial % 2];
                let floors: [f32; ROWS] = std::array::from_fn(|r| {
                    let (p, j) = (rng.random_range(0..GROUP), rng.random_range(0..PANEL));
                    // A floor is never NaN (NaN lower bounds are not offered).
                    let at = Some(bound(side, p, r, j))
                        .filter(|b| !b.is_nan())
                        .unwrap_or(0.5);
                    match trial / 2 % 3 {
                        0 => at,
                        1 => at + rng.random_range(-0.5..0.5),
                        _ => f32::NEG_INFINITY,
                    }
                });
                for panels in [GROUP, 1] {
                    let masks = quantized.screen(side, 0, &queries, &floors, &products[..panels]);
                    for (p, masks) in masks.iter().enumerate().take(panels) {
                        for (r, &mask) in masks.iter().enumerate() {
                            let expected = (0..PANEL).fold(0, |m, j| {
                                let b = bound(side, p, r, j);
                                m | (u32::from(b >= floors[r] || b.is_nan()) << j)
                            });
                            assert_eq!(mask, expected, "{kernel:?} {side:?}, panel {p}, query {r}");
                        }
                    }
                }
            }
        }
    }

    /// Whether every document's lane groups (components {0, 1} of [`LANE_QUADS`] consecutive
    /// groups of 4, and {2, 3}, which the AVX2 kernel adds in one 16-bit lane) are at most
    /// [`LANE_BYTES`] in magnitude, and some come within 4 of it (a group at the limit is
    /// tested, not only typical vectors).
    fn lane_groups_fit(docs: &QuantizedDocs) -> bool {
        let mut largest = 0;
        for panel in docs.panels.chunks_exact(docs.quads) {
            for doc in 0..PANEL {
                for lane in panel.chunks(LANE_QUADS) {
                    for pair in [0, 2] {
                        let bytes = lane
                            .iter()
                            .flat_map(|q| &q[doc * 4 + pair..doc * 4 + pair + 2]);
                        largest = largest.max(bytes.map(|&b| i32::from(b).abs()).sum());
                    }
                }
            }
        }
        (LANE_BYTES - 4..=LANE_BYTES).contains(&largest)
    }

    /// Each document's row holds its panel column's bytes, zeros past them.
    fn rows_match_panels(docs: &QuantizedDocs) -> bool {
        let len = FineQuery::len(docs.quads * 4);
        docs.panels
            .chunks_exact(docs.quads)
            .enumerate()
            .all(|(p, panel)| {
                (0..PANEL).all(|j| {
                    let row = &docs.rows[(p * PANEL + j) * len..(p * PANEL + j + 1) * len];
                    let column = panel.iter().flat_map(|q| &q[j * 4..j * 4 + 4]);
                    let column: Vec<i8> = column
                        .copied()
                        .chain(std::iter::repeat(0))
                        .take(len)
                        .collect();
                    row == column
                })
            })
    }

    /// Every kernel's document quantizer writes the portable one's bytes, scales and sums, and
    /// its norms to within rounding, for dimensions on and off the vector width, non-finite
    /// and subnormal vectors, vectors whose lane groups decide the scale, and panels refilled
    /// over older contents; no lane group exceeds what the AVX2 kernel's 16-bit sums hold;
    /// the rows hold the panels' bytes.
    #[test]
    fn document_quantizers_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for dim in [7, 40, 100, 384, 771] {
            let rows = 3 * PANEL + 5;
            let mut data: Vec<f32> = (0..rows * dim)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            data[3 * dim + 1] = f32::NAN;
            data[9 * dim] = f32::NEG_INFINITY;
            data[11 * dim..12 * dim]
                .iter_mut()
                .for_each(|v| *v *= 1e-39);
            data[12 * dim..13 * dim].fill(0.0);
            // Lane groups that decide the scale (their sums, not the largest component).
            for (i, v) in data[13 * dim..14 * dim].iter_mut().enumerate() {
                *v = [1.0, 1.0, 0.0, 0.0][i % 4];
            }
            data[14 * dim..15 * dim]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = -1.5 - (i % 8) as f32 * 1e-3);
            let docs = Vectors { data: &data, dim };
            let panels = rows.div_ceil(PANEL);
            for kernel in Kernel::available() {
                // The portable quantizer under the kernel's rule.
                let mut portable = QuantizedDocs::new(Kernel::Portable, dim);
                portable.grouped = kernel.lane_groups();
                portable.fill(docs, 0..panels);
                let mut quantized = QuantizedDocs::new(kernel, dim);
                // Older contents first: a refill must leave no trace of them.
                quantized.fill(docs, 1..panels);
                quantized.fill(docs, 0..panels);
                assert_eq!(quantized.panels, portable.panels, "{kernel:?}, dim {dim}");
                assert!(rows_match_panels(&quantized), "{kernel:?}, dim {dim}");
                if kernel.lane_groups() {
                    assert!(lane_groups_fit(&quantized), "{kernel:?}, dim {dim}");
                }
                if kernel.query_levels() != Kernel::Portable.query_levels() {
                    // Another query offset: other sums (the query code differs, not the
                    // documents').
                    continue;
                }
                for (a, b) in quantized.terms.iter().zip(&portable.terms) {
                    assert_eq!(a.scale, b.scale, "{kernel:?}, dim {dim}");
                    assert_eq!(a.offset_sum, b.offset_sum, "{kernel:?}, dim {dim}");
                    for (x, y) in [
                        (a.slack_norm, b.slack_norm),
                        (a.slack_residual, b.slack_residual),
                    ] {
                        for (x, y) in x.iter().zip(y) {
                            let close = x == &y || (x - y).abs() <= 1e-5 * y.abs();
                            assert!(close, "{kernel:?}, dim {dim}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }
}
