//! The integer products of the first pass, 4 queries by one panel of 16 documents at a time,
//! and the f32 inner product of the exact pass.
//!
//! On x86-64 with AVX-512 VNNI the byte products run as `vpdpbusd`: 64 multiply-adds in one
//! instruction, a whole panel of documents in one register. With AVX2 alone they run as
//! `vpmaddubsw` + `vpmaddwd` + `vpaddd`, and pairs of products sum in 16 bits, so queries get
//! fewer levels than 8 bits hold ([`Kernel::query_levels`]); three groups' pair sums add in 16
//! bits too before `vpmaddwd` (documents are quantized to allow it), four multiplies per 96
//! products.
//! AVX2 CPUs with AVX-VNNI (Intel's since Alder Lake, among them the E-core Xeons without
//! AVX-512) run the 256-bit `vpdpbusd`: 32 multiply-adds in one instruction, 8 query bits.
//! Elsewhere a portable loop computes the same integers. The integers are exact and the bound
//! covers any query code, so the search returns the same hits on any CPU.

use super::SearchError;
use super::quantize::PANEL;

/// Queries per kernel call.
pub(crate) const ROWS: usize = 4;
/// Groups of 4 components whose byte-pair sums the AVX2 kernel adds in one 16-bit lane before
/// widening them (`vpmaddwd`): components {0, 1} of each, and {2, 3}, share a lane.
pub(crate) const LANE_QUADS: usize = 3;
/// The AVX2 kernel's query levels ([`Kernel::query_levels`]): its bytes reach 2·75 + 1 = 151,
/// so that a lane of 16 bits holds them against document bytes summing to [`LANE_BYTES`] in
/// magnitude. The documents are quantized within that (`quantize::document_max`); 75
/// balances the query's rounding against theirs (their bound is narrowest there).
pub(crate) const AVX2_QUERY_LEVELS: u8 = 75;
/// The magnitudes of the document bytes that meet in one of the AVX2 kernel's 16-bit lanes sum
/// to at most this (217): against query bytes of at most 2·[`AVX2_QUERY_LEVELS`] + 1 the lane
/// holds (151 · 217 = 32,767).
pub(crate) const LANE_BYTES: i32 = i16::MAX as i32 / (2 * AVX2_QUERY_LEVELS as i32 + 1);
/// Panels of documents per [`Kernel::panels`] call.
pub(crate) const GROUP: usize = 4;

/// One group of 4 components of the [`PANEL`] documents of a panel, document-major.
pub(crate) type PanelQuad = [i8; 4 * PANEL];

/// The instructions the byte products run on, the fastest this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU has, or the one `SYNTHRANK_SEARCH_KERNEL` names
    /// (`portable`, `avx2`, `avx-vnni`, `avx512-vnni`): a narrower class's code path can then be
    /// measured on a wider CPU (BENCHMARKS.md). Results are the same either way. A name this
    /// CPU cannot run is an error, not a silent fallback that would mislabel a measurement.
    pub(crate) fn detect() -> Result<Kernel, SearchError> {
        let named = std::env::var("SYNTHRANK_SEARCH_KERNEL").ok();
        Kernel::choose(&Kernel::available(), named.as_deref())
    }

    /// The kernel called `name` among `available` (slowest first), or the fastest unnamed.
    fn choose(available: &[Kernel], name: Option<&str>) -> Result<Kernel, SearchError> {
        match name {
            None => Ok(*available.last().expect("the portable kernel")),
            Some(name) => available
                .iter()
                .find(|k| k.name() == name)
                .copied()
                .ok_or_else(|| SearchError::Kernel {
                    name: name.to_string(),
                    available: available
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avx-vnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub(crate) fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                kernels.push(Kernel::Avx2);
                if has!("avxvnni") {
                    kernels.push(Kernel::AvxVnni);
                }
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                kernels.push(Kernel::Avx512Vnni);
            }
        }
        kernels
    }

    /// Query components are quantized to [-levels, levels] and stored as unsigned bytes in
    /// [1, 2·levels + 1]. `vpmaddubsw` sums pairs of byte products in 16 bits, so under AVX2
    /// the bytes are held to [`AVX2_QUERY_LEVELS`]; the others take the whole byte.
    pub(crate) fn query_levels(self) -> u8 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => AVX2_QUERY_LEVELS,
            _ => 127,
        }
    }

    /// Whether the kernel adds several groups' byte-pair sums in one 16-bit lane (AVX2), so its
    /// documents are quantized within the groups' limit (`quantize::document_max`).
    pub(crate) fn lane_groups(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2 {
            return true;
        }
        false
    }

    /// Runs `work` inside a function compiled for this kernel's instruction set, so that what
    /// `work` inlines is vectorized as wide as the kernel. `work` and what it calls must be
    /// `#[inline(always)]` (LLVM inlines bottom-up: a large closure would stay outside). The
    /// results stay the same: Rust neither reassociates nor fuses f32 arithmetic, so wider
    /// vectors do the same operations in the same order.
    pub(crate) fn vectorized<R>(self, work: impl FnOnce() -> R) -> R {
        match self {
            // SAFETY: the features were detected at run time (`available`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { with_avx512(work) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::AvxVnni => unsafe { with_avx2(work) },
            Kernel::Portable => work(),
        }
    }

    /// `rows` are [`ROWS`] queries as unsigned bytes, one group of 4 per element; `panel` is
    /// the same groups of [`PANEL`] documents. Row r of the result holds query r's products.
    pub(crate) fn panel(
        self,
        rows: [&[[u8; 4]]; ROWS],
        panel: &[PanelQuad],
    ) -> [[i32; PANEL]; ROWS] {
        let mut out = [[0; PANEL]; ROWS];
        self.panel_into(rows, panel, &mut out);
        out
    }

    /// [`Kernel::panel`] written into `out`: the 256-bit kernels' results were copied (a
    /// `memmove` per panel, 6% of the search) when returned and gathered by value.
    fn panel_into(
        self,
        rows: [&[[u8; 4]]; ROWS],
        panel: &[PanelQuad],
        out: &mut [[i32; PANEL]; ROWS],
    ) {
        assert!(rows.iter().all(|r| r.len() == panel.len()));
        match self {
            // SAFETY: the features were detected at run time (`available`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => *out = unsafe { panel_avx512_vnni(rows, panel) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { panel_avx_vnni(rows, panel, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { panel_avx2(rows, panel, out) },
            Kernel::Portable => *out = panel_portable(rows, panel),
        }
    }
}

impl Kernel {
    /// [`Kernel::panel`] for [`GROUP`] panels at once: element g is panel g's products. Under
    /// AVX-512 VNNI each step loads the queries' bytes once for all the panels and each panel
    /// once for all the queries: 8 loads per 16 `vpdpbusd` where one panel takes 5 per 4 (the
    /// loads, not the products, bounded that kernel).
    pub(crate) fn panels(
        self,
        rows: [&[[u8; 4]]; ROWS],
        panels: [&[PanelQuad]; GROUP],
    ) -> [[[i32; PANEL]; ROWS]; GROUP] {
        assert!(
            panels
                .iter()
                .all(|p| rows.iter().all(|r| r.len() == p.len()))
        );
        match self {
            // SAFETY: the features were detected at run time (`available`).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { panels_avx512_vnni(rows, panels) },
            _ => {
                let mut out = [[[0; PANEL]; ROWS]; GROUP];
                for (out, panel) in out.iter_mut().zip(panels) {
                    self.panel_into(rows, panel, out);
                }
                out
            }
        }
    }
}

/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn panels_avx512_vnni(
    rows: [&[[u8; 4]]; ROWS],
    panels: [&[PanelQuad]; GROUP],
) -> [[[i32; PANEL]; ROWS]; GROUP] {
    use std::arch::x86_64::*;
    let n = panels[0].len();
    // Sliced to one length, the loop needs no bounds checks; plain loops over the constant
    // sizes keep the 16 accumulators in registers (`array::map` is a call in the dev profile).
    let mut row_quads: [&[[u8; 4]]; ROWS] = [&[]; ROWS];
    for (quads, row) in row_quads.iter_mut().zip(rows) {
        *quads = &row[..n];
    }
    let mut panel_quads: [&[PanelQuad]; GROUP] = [&[]; GROUP];
    for (quads, panel) in panel_quads.iter_mut().zip(panels) {
        *quads = &panel[..n];
    }
    let mut acc = [[_mm512_setzero_si512(); ROWS]; GROUP];
    for q in 0..n {
        let mut x = [_mm512_setzero_si512(); ROWS];
        for r in 0..ROWS {
            x[r] = _mm512_set1_epi32(i32::from_le_bytes(row_quads[r][q]));
        }
        for g in 0..GROUP {
            // SAFETY: 64 bytes as one 512-bit vector, every bit pattern valid.
            let b = unsafe { std::mem::transmute::<PanelQuad, __m512i>(panel_quads[g][q]) };
            for r in 0..ROWS {
                acc[g][r] = _mm512_dpbusd_epi32(acc[g][r], x[r], b);
            }
        }
    }
    let mut out = [[[0; PANEL]; ROWS]; GROUP];
    for g in 0..GROUP {
        for r in 0..ROWS {
            // SAFETY: a 512-bit vector is 16 i32.
            out[g][r] = unsafe { std::mem::transmute::<__m512i, [i32; PANEL]>(acc[g][r]) };
        }
    }
    out
}

/// # Safety
/// The CPU must support AVX-512F, BW, VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn with_avx512<R>(work: impl FnOnce() -> R) -> R {
    work()
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(work: impl FnOnce() -> R) -> R {
    work()
}

fn panel_portable(rows: [&[[u8; 4]]; ROWS], panel: &[PanelQuad]) -> [[i32; PANEL]; ROWS] {
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

/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn panel_avx512_vnni(rows: [&[[u8; 4]]; ROWS], panel: &[PanelQuad]) -> [[i32; PANEL]; ROWS] {
    use std::arch::x86_64::*;
    // Even and odd groups accumulate apart: 8 independent chains keep both multiply pipes
    // busy through the instruction's latency, where 4 would leave them half idle.
    let (mut even, mut odd) = (
        [_mm512_setzero_si512(); ROWS],
        [_mm512_setzero_si512(); ROWS],
    );
    // The query's 4 unsigned bytes against 4 signed bytes of each of the 16 documents, summed
    // into 32 bits with no intermediate rounding or saturation.
    let step = |acc: &mut [__m512i; ROWS], quads: [[u8; 4]; ROWS], docs: &PanelQuad| {
        // SAFETY: 64 bytes as one 512-bit vector, every bit pattern valid.
        let b = unsafe { std::mem::transmute::<PanelQuad, __m512i>(*docs) };
        for (acc, quad) in acc.iter_mut().zip(quads) {
            let x = _mm512_set1_epi32(i32::from_le_bytes(quad));
            *acc = _mm512_dpbusd_epi32(*acc, x, b);
        }
    };
    let (pairs, last) = panel.as_chunks::<2>();
    let n = pairs.len();
    // Sliced to the length of `pairs`, the rows need no bounds checks inside the loop (they
    // were half its instructions). Plain loops here, not `array::map`/`from_fn`: those are
    // calls in the dev profile, once per panel.
    let mut row_pairs: [&[[[u8; 4]; 2]]; ROWS] = [&[]; ROWS];
    for (pairs, row) in row_pairs.iter_mut().zip(rows) {
        *pairs = &row.as_chunks::<2>().0[..n];
    }
    for (p, docs) in pairs.iter().enumerate() {
        step(&mut even, row_pairs.map(|row| row[p][0]), &docs[0]);
        step(&mut odd, row_pairs.map(|row| row[p][1]), &docs[1]);
    }
    if let [last] = last {
        step(&mut even, rows.map(|row| row[2 * n]), last);
    }
    let mut out = [[0; PANEL]; ROWS];
    for (out, (even, odd)) in out.iter_mut().zip(even.iter().zip(&odd)) {
        // SAFETY: a 512-bit vector is 16 i32.
        *out =
            unsafe { std::mem::transmute::<__m512i, [i32; PANEL]>(_mm512_add_epi32(*even, *odd)) };
    }
    out
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn panel_avx2(
    rows: [&[[u8; 4]]; ROWS],
    panel: &[PanelQuad],
    out: &mut [[i32; PANEL]; ROWS],
) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let broadcast = |quad: [u8; 4]| _mm256_set1_epi32(i32::from_le_bytes(quad));
    let (lanes, last) = panel.as_chunks::<LANE_QUADS>();
    let n = lanes.len();
    // Sliced to the length of `lanes`, the rows need no bounds checks inside the loop.
    let mut row_lanes: [&[[[u8; 4]; LANE_QUADS]]; ROWS] = [&[]; ROWS];
    for (lanes, row) in row_lanes.iter_mut().zip(rows) {
        *lanes = &row.as_chunks::<LANE_QUADS>().0[..n];
    }
    let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
    // Plain loads through slices and `transmute`, no pointer reads: in the dev profile the
    // standard library's pointer-read checks would cost more than the arithmetic.
    for (p, docs) in lanes.iter().enumerate() {
        let mut d = [[_mm256_setzero_si256(); 2]; LANE_QUADS];
        for i in 0..LANE_QUADS {
            // SAFETY: 64 bytes as two 256-bit vectors, every bit pattern valid.
            d[i] = unsafe { std::mem::transmute::<PanelQuad, [__m256i; 2]>(docs[i]) };
        }
        for (acc, row) in acc.iter_mut().zip(&row_lanes) {
            // The byte products sum in pairs (`vpmaddubsw`, 16 bits, no saturation), the
            // pair sums of `LANE_QUADS` groups of 4 components add in one 16-bit lane (within
            // i16 by the documents' quantization, `quantize::document_max`), then pairs of
            // lanes sum into 32 bits: 4 multiplies per 96 products where one group at a time
            // took 6.
            // Index loops: iterator adapters stayed calls here in the dev profile.
            let x = broadcast(row[p][0]);
            let mut low = _mm256_maddubs_epi16(x, d[0][0]);
            let mut high = _mm256_maddubs_epi16(x, d[0][1]);
            for i in 1..LANE_QUADS {
                let x = broadcast(row[p][i]);
                low = _mm256_add_epi16(low, _mm256_maddubs_epi16(x, d[i][0]));
                high = _mm256_add_epi16(high, _mm256_maddubs_epi16(x, d[i][1]));
            }
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(low, ones));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(high, ones));
        }
    }
    for (i, docs) in last.iter().enumerate() {
        // SAFETY: as above.
        let [b0, b1] = unsafe { std::mem::transmute::<PanelQuad, [__m256i; 2]>(*docs) };
        for (acc, row) in acc.iter_mut().zip(rows) {
            let x = broadcast(row[LANE_QUADS * n + i]);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b0), ones));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, b1), ones));
        }
    }
    store_rows(acc, out);
}

/// Writes the 256-bit kernels' accumulators, two vectors per row, into `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn store_rows(acc: [[std::arch::x86_64::__m256i; 2]; ROWS], out: &mut [[i32; PANEL]; ROWS]) {
    for (out, acc) in out.iter_mut().zip(acc) {
        // SAFETY: two 256-bit vectors are 16 i32, every bit pattern valid.
        *out = unsafe { std::mem::transmute::<[std::arch::x86_64::__m256i; 2], [i32; PANEL]>(acc) };
    }
}

/// # Safety
/// The CPU must support AVX2 and AVX-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn panel_avx_vnni(
    rows: [&[[u8; 4]]; ROWS],
    panel: &[PanelQuad],
    out: &mut [[i32; PANEL]; ROWS],
) {
    use std::arch::x86_64::*;
    let n = panel.len();
    // Sliced to one length, the loop needs no bounds checks.
    let mut row_quads: [&[[u8; 4]]; ROWS] = [&[]; ROWS];
    for (quads, row) in row_quads.iter_mut().zip(rows) {
        *quads = &row[..n];
    }
    let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
    for (q, docs) in panel.iter().enumerate() {
        // SAFETY: 64 bytes as two 256-bit vectors, every bit pattern valid.
        let [b0, b1] = unsafe { std::mem::transmute::<PanelQuad, [__m256i; 2]>(*docs) };
        for (acc, row) in acc.iter_mut().zip(&row_quads) {
            // The query's 4 bytes against each of 8 documents' 4, summed into 32 bits with
            // no intermediate rounding or saturation.
            let x = _mm256_set1_epi32(i32::from_le_bytes(row[q]));
            acc[0] = _mm256_dpbusd_avx_epi32(acc[0], x, b0);
            acc[1] = _mm256_dpbusd_avx_epi32(acc[1], x, b1);
        }
    }
    store_rows(acc, out);
}

impl Kernel {
    /// The product of a document's bytes (`row`) with a query's fine code
    /// ([`super::quantize::FineQuery`], of the same length, a multiple of 32): exact in i32,
    /// the code's levels being chosen so.
    pub(crate) fn fine_product(self, row: &[i8], codes: &[i16]) -> i32 {
        assert!(row.len() == codes.len() && row.len().is_multiple_of(32));
        match self {
            Kernel::Portable => fine_product_portable(row, codes),
            // SAFETY: every other kernel's features include AVX2 (AVX-512F implies it).
            #[cfg(target_arch = "x86_64")]
            _ => unsafe { fine_product_avx2(row, codes) },
        }
    }
}

fn fine_product_portable(row: &[i8], codes: &[i16]) -> i32 {
    row.iter()
        .zip(codes)
        .map(|(&d, &c)| i32::from(d) * i32::from(c))
        .sum()
}

/// [`fine_product_portable`] 32 components at a time: the bytes widen to 16 bits and
/// multiply-add with the code in pairs (`vpmaddwd`).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fine_product_avx2(row: &[i8], codes: &[i16]) -> i32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_si256();
    for (bytes, code) in row
        .as_chunks::<32>()
        .0
        .iter()
        .zip(codes.as_chunks::<32>().0)
    {
        // SAFETY: 32 bytes as one 256-bit vector, 32 i16 as two, every bit pattern valid.
        let (bytes, [low, high]) = unsafe {
            (
                std::mem::transmute::<[i8; 32], __m256i>(*bytes),
                std::mem::transmute::<[i16; 32], [__m256i; 2]>(*code),
            )
        };
        let docs_low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes));
        let docs_high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(bytes));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(docs_low, low));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(docs_high, high));
    }
    // SAFETY: a 256-bit vector is 8 i32.
    let lanes = unsafe { std::mem::transmute::<__m256i, [i32; 8]>(acc) };
    lanes.iter().sum()
}

/// Asks the CPU to start loading `row` into cache (a hint; nothing on other architectures).
pub(crate) fn prefetch(row: &[f32]) {
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

    /// A panel's bytes as the document quantizer writes them: every lane group (components
    /// {0, 1} of [`LANE_QUADS`] consecutive groups of 4, and {2, 3}) at most [`LANE_BYTES`] in
    /// magnitude, and documents 0 and 1 at that limit (127 and 90, then zeros), positive and
    /// negative.
    fn documents(rng: &mut impl Rng, quads: usize) -> Vec<PanelQuad> {
        let most = (LANE_BYTES / (2 * LANE_QUADS as i32)) as i8;
        let mut panel: Vec<PanelQuad> = (0..quads)
            .map(|_| [0; 4 * PANEL].map(|_| rng.random_range(-most..=most)))
            .collect();
        let limit = [127, (LANE_BYTES - 127) as i8];
        for (q, quad) in panel.iter_mut().enumerate() {
            let [a, b] = if q % LANE_QUADS == 0 { limit } else { [0, 0] };
            quad[..2].copy_from_slice(&[a, b]);
            quad[4..6].copy_from_slice(&[-a, -b]);
        }
        panel
    }

    /// Every kernel this CPU has computes the same integers as the portable loop over its own
    /// query range, at the extremes of both operands' ranges too (the AVX2 kernel's 16-bit
    /// lanes at 151 · 217 = 32,767, the most they hold), whole lane groups and partial ones.
    #[test]
    fn kernels_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let cases = Kernel::available()
            .into_iter()
            .flat_map(|k| [(k, 1), (k, 3), (k, 5), (k, 96)]);
        for (kernel, quads) in cases {
            let top = 2 * kernel.query_levels() + 1;
            let rows: Vec<Vec<[u8; 4]>> = (0..ROWS)
                .map(|r| {
                    (0..quads)
                        .map(|_| {
                            [0; 4].map(|_| {
                                if r == 0 {
                                    top
                                } else {
                                    rng.random_range(1..=top)
                                }
                            })
                        })
                        .collect()
                })
                .collect();
            let panel = documents(&mut rng, quads);
            let rows = std::array::from_fn(|r| rows[r].as_slice());
            let portable = Kernel::Portable.panel(rows, &panel);
            assert_eq!(
                kernel.panel(rows, &panel),
                portable,
                "{kernel:?}, quads {quads}"
            );
            let others: Vec<Vec<PanelQuad>> =
                (0..GROUP).map(|_| documents(&mut rng, quads)).collect();
            let group = std::array::from_fn(|g| others[g].as_slice());
            assert_eq!(
                kernel.panels(rows, group),
                group.map(|panel| Kernel::Portable.panel(rows, panel)),
                "{kernel:?} x {GROUP} panels, quads {quads}"
            );
            let expected: i32 = (0..quads * 4)
                .map(|i| i32::from(top) * i32::from(panel[i / 4][i % 4]))
                .sum();
            assert_eq!(portable[0][0], expected);
        }
    }

    /// Every kernel's fine products equal the portable loop's and the exact sum, at the extremes
    /// of the fine code's levels and the bytes' range ([`super::super::quantize::FineQuery`]).
    #[test]
    fn fine_products_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for kernel in Kernel::available() {
            for len in [32, 384, 800] {
                let levels = super::super::quantize::fine_levels(len) as i16;
                for extreme in [false, true] {
                    let row: Vec<i8> = (0..len)
                        .map(|_| {
                            if extreme {
                                -127
                            } else {
                                rng.random_range(-127..=127)
                            }
                        })
                        .collect();
                    let codes: Vec<i16> = (0..len)
                        .map(|_| {
                            if extreme {
                                levels
                            } else {
                                rng.random_range(-levels..=levels)
                            }
                        })
                        .collect();
                    let exact: i64 = row
                        .iter()
                        .zip(&codes)
                        .map(|(&d, &c)| i64::from(d) * i64::from(c))
                        .sum();
                    assert_eq!(
                        i64::from(kernel.fine_product(&row, &codes)),
                        exact,
                        "{kernel:?}, {len}"
                    );
                }
            }
        }
    }

    /// A named kernel is chosen where the CPU has it, any other name is an error; unnamed, the
    /// fastest.
    #[test]
    fn a_named_kernel_is_chosen_where_available() {
        let all = Kernel::available();
        let fastest = *all.last().unwrap();
        for kernel in &all {
            assert_eq!(Kernel::choose(&all, Some(kernel.name())), Ok(*kernel));
        }
        assert_eq!(Kernel::choose(&all, None), Ok(fastest));
        assert!(Kernel::choose(&all, Some("sse9")).is_err());
        let missing = Kernel::choose(&[Kernel::Portable], Some("avx2")).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "SYNTHRANK_SEARCH_KERNEL=avx2: not a kernel this CPU runs (it runs portable)"
        );
    }
}
