//! Exact maximum-inner-product search: every query against every document, in blocks (never
//! the full score matrix), keeping a top-k per query. Engine- and table-free.
//!
//! Ranking follows trec_eval: score descending, ties by document id descending. Ids are
//! compared as ranks (`id_rank`, the position of each document id in byte order), so the
//! selection itself never touches strings.

mod candidates;
mod kernel;
mod quantize;
mod topk;

use std::cmp::Ordering;

pub use kernel::dot;
pub(crate) use topk::TopK;

use candidates::Candidates;
use kernel::{GROUP, Kernel, PanelQuad, ROWS};
use quantize::{PANEL, QuantizedDocs, QuantizedQuery};

/// Row-major vectors, `data.len() == rows * dim`.
#[derive(Debug, Clone, Copy)]
pub struct Vectors<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl Vectors<'_> {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SearchOptions {
    pub k: usize,
    pub threads: usize,
    /// Queries scored together (rounded up to the kernel's 4 rows).
    pub query_block: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 100,
            threads: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            query_block: 128,
        }
    }
}

/// One retrieved document: its index among the documents, and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub doc: u32,
    pub score: f32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SearchError {
    #[error("queries have dimension {queries}, documents {docs}")]
    Dimension { queries: usize, docs: usize },
    #[error("{0} document id ranks for {1} documents")]
    IdRanks(usize, usize),
    #[error("dimension {0} is beyond the {MAX_DIM} whose byte products sum exactly in 32 bits")]
    TooManyDimensions(usize),
}

/// The largest dimension searched: sums of `dim` products of a byte (≤ 255) and a signed byte
/// (≤ 127 in magnitude) stay inside i32 up to 66,311.
pub const MAX_DIM: usize = 65_536;

/// The rank of each id in byte order: the tie-breaker trec_eval uses (larger id first).
pub fn id_ranks<S: AsRef<str>>(ids: &[S]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        ids[a as usize]
            .as_ref()
            .as_bytes()
            .cmp(ids[b as usize].as_ref().as_bytes())
    });
    let mut ranks = vec![0u32; ids.len()];
    for (rank, &i) in order.iter().enumerate() {
        ranks[i as usize] = rank as u32;
    }
    ranks
}

/// The top `options.k` documents for every query, best first. `exclude[q]` names a document
/// that query `q` must not retrieve (BEIR drops a document whose id equals the query's).
pub fn search(
    queries: Vectors<'_>,
    docs: Vectors<'_>,
    id_rank: &[u32],
    exclude: &[Option<u32>],
    options: SearchOptions,
) -> Result<Vec<Vec<Hit>>, SearchError> {
    search_with_progress(queries, docs, id_rank, exclude, options, &|_| {})
}

/// [`search`], calling `done(n)` as each block of `n` queries is finished (from any thread).
pub(crate) fn search_with_progress(
    queries: Vectors<'_>,
    docs: Vectors<'_>,
    id_rank: &[u32],
    exclude: &[Option<u32>],
    options: SearchOptions,
    done: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<Hit>>, SearchError> {
    if queries.dim != docs.dim {
        return Err(SearchError::Dimension {
            queries: queries.dim,
            docs: docs.dim,
        });
    }
    if docs.dim > MAX_DIM {
        return Err(SearchError::TooManyDimensions(docs.dim));
    }
    if id_rank.len() != docs.rows() {
        return Err(SearchError::IdRanks(id_rank.len(), docs.rows()));
    }
    let nq = queries.rows();
    let kernel = Kernel::detect();
    let corpus = Corpus {
        vectors: docs,
        quantized: &QuantizedDocs::new(docs, kernel, options.threads),
        id_rank,
        kernel,
    };
    let threads = options.threads.clamp(1, nq.max(1));
    let per_thread = nq.div_ceil(threads).max(1);
    let mut results: Vec<Vec<Hit>> = vec![Vec::new(); nq];
    std::thread::scope(|scope| {
        for (chunk, out) in results.chunks_mut(per_thread).enumerate() {
            let start = chunk * per_thread;
            scope.spawn(move || {
                let rows = Vectors {
                    data: &queries.data[start * queries.dim..(start + out.len()) * queries.dim],
                    dim: queries.dim,
                };
                let exclude = exclude_slice(exclude, start, out.len());
                // Compiled for the kernel's instruction set: the bounds and the quantizer go
                // wider.
                kernel.vectorized(
                    #[inline(always)]
                    || search_block(rows, &corpus, &exclude, options, out, done),
                );
            });
        }
    });
    Ok(results)
}

fn exclude_slice(exclude: &[Option<u32>], start: usize, len: usize) -> Vec<Option<u32>> {
    (start..start + len)
        .map(|q| exclude.get(q).copied().flatten())
        .collect()
}

/// One thread's share: its queries against all documents, a block of queries at a time. The
/// integer pass scores every pair and keeps, per query, the documents whose upper bound
/// reaches the k-th best lower bound so far; those alone are scored exactly. Inlined into the
/// code compiled for the corpus's kernel.
#[inline(always)]
fn search_block(
    queries: Vectors<'_>,
    corpus: &Corpus<'_>,
    exclude: &[Option<u32>],
    options: SearchOptions,
    out: &mut [Vec<Hit>],
    done: &(dyn Fn(usize) + Sync),
) {
    let Corpus {
        vectors: docs,
        quantized,
        id_rank,
        kernel,
    } = *corpus;
    let levels = kernel.query_levels();
    let (dim, quads) = (queries.dim, quantized.quads);
    let (nq, nd) = (queries.rows(), docs.rows());
    let query_block = options.query_block.max(1).div_ceil(ROWS) * ROWS;
    // Rows past the last query of a block keep stale bytes: their scores are never read.
    let mut bytes = vec![[0u8; 4]; query_block * quads];
    let mut scratch = Vec::new();
    for q0 in (0..nq).step_by(query_block) {
        let qn = query_block.min(nq - q0);
        let query = |i: usize| &queries.data[(q0 + i) * dim..(q0 + i + 1) * dim];
        let terms: Vec<QuantizedQuery> = bytes
            .chunks_exact_mut(quads)
            .take(qn)
            .enumerate()
            .map(|(i, row)| QuantizedQuery::new(query(i), levels, row, &mut scratch))
            .collect();
        let groups = &bytes[..qn.div_ceil(ROWS) * ROWS * quads];
        let mut candidates: Vec<Candidates> = (0..qn)
            .map(|i| Candidates::new(options.k, exclude[q0 + i]))
            .collect();
        // A group of panels at a time: its documents stay in L1 while every query meets them.
        let panels: Vec<&[PanelQuad]> = quantized.panels.chunks_exact(quads).collect();
        for (first_panel, group) in (0..panels.len()).step_by(GROUP).zip(panels.chunks(GROUP)) {
            for (g, queries) in groups.chunks_exact(ROWS * quads).enumerate() {
                let rows = std::array::from_fn(|r| &queries[r * quads..(r + 1) * quads]);
                let mut products = [[[0; PANEL]; ROWS]; GROUP];
                match <[&[PanelQuad]; GROUP]>::try_from(group) {
                    Ok(whole) => products = kernel.panels(rows, whole),
                    Err(_) => {
                        for (out, panel) in products.iter_mut().zip(group) {
                            *out = kernel.panel(rows, panel);
                        }
                    }
                }
                for (p, integer) in (first_panel..).zip(&products[..group.len()]) {
                    let first_doc = p * PANEL;
                    // Rows past the last query (stale bytes) have no candidates: never read.
                    let rows = candidates[g * ROWS..].iter_mut().zip(&terms[g * ROWS..]);
                    for ((kept, terms), integer) in rows.zip(integer) {
                        let bounds = quantized.bounds(p, terms, integer);
                        kept.admit(first_doc, nd - first_doc, &bounds);
                    }
                }
            }
        }
        for (i, kept) in candidates.into_iter().enumerate() {
            out[q0 + i] = kept.into_hits(query(i), docs, id_rank);
        }
        done(qn);
    }
}

/// The documents of a search: their vectors, quantized copies, id ranks, and the kernel the
/// copies are scored with.
#[derive(Clone, Copy)]
struct Corpus<'a> {
    vectors: Vectors<'a>,
    quantized: &'a QuantizedDocs,
    id_rank: &'a [u32],
    kernel: Kernel,
}

/// trec_eval's order of two hits: higher score first, then larger id.
pub(crate) fn hit_order(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(b.1.cmp(&a.1))
}
