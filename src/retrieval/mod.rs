//! Exact maximum-inner-product search: every query against every document, in blocks (never
//! the full score matrix), keeping a top-k per query. Engine- and table-free.
//!
//! Ranking follows trec_eval: score descending, ties by document id descending. Ids are
//! compared as ranks (`id_rank`, the position of each document id in byte order), so the
//! selection itself never touches strings.

mod candidates;
mod kernel;
mod phases;
mod quantize;
#[cfg(test)]
mod tests;
mod topk;

use std::cmp::Ordering;
use std::sync::RwLock;

pub use kernel::dot;
pub(crate) use topk::TopK;

use candidates::{Candidates, Pass};
use kernel::{GROUP, Kernel, PanelQuad, ROWS};
use phases::Phases;
use quantize::{FineQuery, PANEL, QuantizedDocs, QuantizedQuery};

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
    /// Queries searched together in one pass over the corpus (the corpus is quantized once per
    /// pass, and the pass's candidates, a few k per query, are held together).
    pub query_block: usize,
    /// Documents quantized at a time, shared by the threads (0: about 4 MiB of bytes). The
    /// quantized corpus never exists whole.
    pub chunk_docs: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 100,
            threads: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            query_block: 4096,
            chunk_docs: 0,
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
    #[error("SYNTHRANK_SEARCH_KERNEL={name}: not a kernel this CPU runs (it runs {available})")]
    Kernel { name: String, available: String },
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

/// [`search`], calling `done(n)` as work worth `n` queries is finished (from any thread): each
/// thread reports its queries by the share of the corpus it has passed, the rest when they
/// are done.
pub(crate) fn search_with_progress(
    queries: Vectors<'_>,
    docs: Vectors<'_>,
    id_rank: &[u32],
    exclude: &[Option<u32>],
    options: SearchOptions,
    done: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<Hit>>, SearchError> {
    let kernel = Kernel::detect()?;
    search_with_kernel(kernel, queries, docs, id_rank, exclude, options, done)
}

/// [`search_with_progress`] with the byte products on `kernel` (one of [`Kernel::available`]).
fn search_with_kernel(
    kernel: Kernel,
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
    let threads = options.threads.clamp(1, nq.max(1));
    let quads = docs.dim.div_ceil(4);
    // Each thread quantizes one part of every chunk: whole groups of panels.
    let chunk_panels = match options.chunk_docs {
        0 => (CHUNK_BYTES / (quads.max(1) * 4 * PANEL)).max(1),
        docs => docs.div_ceil(PANEL),
    };
    let part_panels = chunk_panels.div_ceil(threads).div_ceil(GROUP) * GROUP;
    let corpus = Corpus {
        vectors: docs,
        id_rank,
        kernel,
        parts: &(0..threads)
            .map(|_| RwLock::new(QuantizedDocs::new(kernel, docs.dim)))
            .collect::<Vec<_>>(),
        part_panels,
        phases: &Phases::new(threads),
    };
    let mut results: Vec<Vec<Hit>> = vec![Vec::new(); nq];
    // Every thread takes part in every pass (with no queries, if need be): all quantize.
    let per_pass = options.query_block.max(1);
    let mut shares: Vec<Vec<PassShare<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    for (pass, out) in results.chunks_mut(per_pass).enumerate() {
        let per_thread = out.len().div_ceil(threads);
        let mut slices = out.chunks_mut(per_thread);
        for (t, share) in shares.iter_mut().enumerate() {
            let first = pass * per_pass + t * per_thread;
            share.push((first, slices.next().unwrap_or_default()));
        }
    }
    std::thread::scope(|scope| {
        for (thread, passes) in shares.into_iter().enumerate() {
            let corpus = &corpus;
            scope.spawn(move || {
                // A failed thread releases the others from their wait.
                let _guard = corpus.phases.guard();
                for (first, out) in passes {
                    let rows = Vectors {
                        data: &queries.data[first * queries.dim..(first + out.len()) * queries.dim],
                        dim: queries.dim,
                    };
                    let exclude = exclude_slice(exclude, first, out.len());
                    // Compiled for the kernel's instruction set: the bounds and the query
                    // quantizer go wider.
                    kernel.vectorized(
                        #[inline(always)]
                        || search_pass(thread, rows, corpus, &exclude, options, out, done),
                    );
                }
            });
        }
    });
    Ok(results)
}

/// A thread's queries in one pass: the index of the first, and where their hits go.
type PassShare<'a> = (usize, &'a mut [Vec<Hit>]);

/// Bytes of quantized documents per chunk of the corpus, all threads' parts together: small
/// enough to stay in L3 while every thread reads it.
const CHUNK_BYTES: usize = 4 << 20;

fn exclude_slice(exclude: &[Option<u32>], start: usize, len: usize) -> Vec<Option<u32>> {
    (start..start + len)
        .map(|q| exclude.get(q).copied().flatten())
        .collect()
}

/// One thread's queries of a pass against all documents. The corpus goes by in chunks: the
/// threads quantize a part of each and then all read every part. The integer pass scores
/// every pair on 8-bit codes; the few whose coarse upper bound reaches the k-th best lower
/// bound so far get fine bounds (a 16-bit query code against the document's bytes), and the
/// query keeps those whose fine upper bound still reaches it: those alone are scored exactly.
/// Inlined into the code compiled for the corpus's kernel.
#[inline(always)]
fn search_pass(
    thread: usize,
    queries: Vectors<'_>,
    corpus: &Corpus<'_>,
    exclude: &[Option<u32>],
    options: SearchOptions,
    out: &mut [Vec<Hit>],
    done: &(dyn Fn(usize) + Sync),
) {
    let Corpus {
        vectors: docs,
        id_rank,
        kernel,
        parts,
        part_panels,
        phases,
    } = *corpus;
    let (dim, quads) = (queries.dim, docs.dim.div_ceil(4));
    let (nq, nd) = (queries.rows(), docs.rows());
    let query = |i: usize| &queries.data[i * dim..(i + 1) * dim];
    // Rows past the last query keep zero bytes: their scores are never read.
    let mut bytes = vec![[0u8; 4]; nq.div_ceil(ROWS) * ROWS * quads];
    let mut scratch = Vec::new();
    let terms: Vec<QuantizedQuery> = bytes
        .chunks_exact_mut(quads)
        .take(nq)
        .enumerate()
        .map(|(i, row)| QuantizedQuery::new(query(i), kernel.query_levels(), row, &mut scratch))
        .collect();
    let mut codes = vec![0i16; nq * FineQuery::len(dim)];
    let fine: Vec<FineQuery> = codes
        .chunks_exact_mut(FineQuery::len(dim).max(1))
        .take(nq)
        .enumerate()
        .map(|(i, codes)| FineQuery::new(query(i), codes, &mut scratch))
        .collect();
    let coded = Coded {
        bytes: &bytes,
        terms: &terms,
        fine: &fine,
    };
    let mut candidates: Vec<Candidates> = (0..nq)
        .map(|i| Candidates::new(options.k, exclude[i]))
        .collect();
    let total_panels = nd.div_ceil(PANEL);
    let chunk_panels = part_panels * parts.len();
    let chunks = total_panels.div_ceil(chunk_panels);
    // The first chunk is the sample (`Pass`), read again last; a corpus of one chunk is read
    // once.
    let order = (0..chunks).map(|chunk| match chunk {
        0 if chunks > 1 => (0, Pass::Sample),
        _ => (chunk, Pass::Whole),
    });
    let order = order.chain((chunks > 1).then_some((0, Pass::Resample)));
    let steps = chunks + usize::from(chunks > 1);
    let mut reported = 0;
    for (step, (chunk, pass)) in order.enumerate() {
        let start = (chunk * chunk_panels + thread * part_panels).min(total_panels);
        let end = (start + part_panels).min(total_panels);
        parts[thread]
            .write()
            .expect("a search thread failed")
            .fill(docs, start..end);
        phases.wait();
        for part in parts {
            let part = part.read().expect("a search thread failed");
            scan(&part, pass, &coded, &mut candidates, kernel, nd);
        }
        phases.wait();
        // Progress by the share of the corpus passed; the last share after the exact pass.
        if step + 1 < steps {
            let passed = nq * (step + 1) / steps;
            done(passed - reported);
            reported = passed;
        }
    }
    for (i, kept) in candidates.into_iter().enumerate() {
        out[i] = kept.into_hits(query(i), docs, id_rank);
    }
    done(nq - reported);
}

/// A thread's queries in one pass, coded: their bytes for the kernel ([`ROWS`] rows at a time,
/// zero rows past the last query), their side of the coarse bound, and their fine codes.
struct Coded<'a> {
    bytes: &'a [[u8; 4]],
    terms: &'a [QuantizedQuery],
    fine: &'a [FineQuery<'a>],
}

/// Offers the documents of `part` to every query: a group of panels at a time, its documents
/// staying in L1 while every query meets them.
#[inline(always)]
fn scan(
    part: &QuantizedDocs,
    pass: Pass,
    queries: &Coded<'_>,
    candidates: &mut [Candidates],
    kernel: Kernel,
    nd: usize,
) {
    let Coded { bytes, terms, fine } = *queries;
    let (quads, nq) = (part.quads, terms.len());
    let panels: Vec<&[PanelQuad]> = part.panels.chunks_exact(quads).collect();
    for (first_panel, group) in (0..panels.len()).step_by(GROUP).zip(panels.chunks(GROUP)) {
        for (g, queries) in bytes.chunks_exact(ROWS * quads).enumerate() {
            let rows = std::array::from_fn(|r| &queries[r * quads..(r + 1) * quads]);
            // Built in place (assigning a returned 1 KiB array into a variable copied it).
            let products = match <[&[PanelQuad]; GROUP]>::try_from(group) {
                Ok(whole) => kernel.panels(rows, whole),
                Err(_) => {
                    let mut products = [[[0; PANEL]; ROWS]; GROUP];
                    for (out, panel) in products.iter_mut().zip(group) {
                        *out = kernel.panel(rows, panel);
                    }
                    products
                }
            };
            // The bound's query terms and floors of this group's rows; rows past the last
            // query get no floor to reach.
            let mut floors = [f32::INFINITY; ROWS];
            let mut row_terms = [QuantizedQuery::default(); ROWS];
            for r in 0..ROWS.min(nq - g * ROWS) {
                floors[r] = candidates[g * ROWS + r].floor();
                row_terms[r] = terms[g * ROWS + r];
            }
            let products = &products[..group.len()];
            let masks = part.screen(pass.side(), first_panel, &row_terms, &floors, products);
            // What passes the screen is admitted on its fine bounds (`fine_bounds`).
            for (p, masks) in (first_panel..).zip(&masks[..group.len()]) {
                let first_doc = (part.first + p) * PANEL;
                let rows = candidates[g * ROWS..].iter_mut().zip(&fine[g * ROWS..]);
                for ((kept, query), &mask) in rows.zip(masks) {
                    if mask != 0 {
                        kept.admit(pass, first_doc, nd - first_doc, mask, |j| {
                            part.fine_bounds(p, j, query)
                        });
                    }
                }
            }
        }
    }
}

/// The documents of a search: their vectors, id ranks, the kernel they are scored with, and
/// the parts of the chunk being searched (one per thread, `part_panels` each).
#[derive(Clone, Copy)]
struct Corpus<'a> {
    vectors: Vectors<'a>,
    id_rank: &'a [u32],
    kernel: Kernel,
    parts: &'a [RwLock<QuantizedDocs>],
    part_panels: usize,
    phases: &'a Phases,
}

/// trec_eval's order of two hits: higher score first, then larger id.
pub(crate) fn hit_order(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(b.1.cmp(&a.1))
}
