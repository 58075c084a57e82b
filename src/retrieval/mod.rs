//! Exact maximum-inner-product search: every query against every document, in blocks (never
//! the full score matrix), keeping a top-k per query. Engine- and table-free.
//!
//! Ranking follows trec_eval: score descending, ties by document id descending. Ids are
//! compared as ranks (`id_rank`, the position of each document id in byte order), so the
//! selection itself never touches strings.

mod topk;

use std::cmp::Ordering;

pub use topk::TopK;

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
    /// Queries scored together (rows of one matrix product).
    pub query_block: usize,
    /// Documents scored together (columns of one matrix product).
    pub doc_block: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 100,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            query_block: 128,
            doc_block: 2048,
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
}

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
pub fn search_with_progress(
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
    if id_rank.len() != docs.rows() {
        return Err(SearchError::IdRanks(id_rank.len(), docs.rows()));
    }
    let nq = queries.rows();
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
                search_block(
                    rows,
                    docs,
                    id_rank,
                    &exclude_slice(exclude, start, out.len()),
                    options,
                    out,
                    done,
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

/// One thread's share: its queries against all documents, block by block.
fn search_block(
    queries: Vectors<'_>,
    docs: Vectors<'_>,
    id_rank: &[u32],
    exclude: &[Option<u32>],
    options: SearchOptions,
    out: &mut [Vec<Hit>],
    done: &(dyn Fn(usize) + Sync),
) {
    let dim = queries.dim;
    let (nq, nd) = (queries.rows(), docs.rows());
    let mut scores = vec![0f32; options.query_block * options.doc_block];
    for q0 in (0..nq).step_by(options.query_block) {
        let qn = options.query_block.min(nq - q0);
        let mut tops: Vec<TopK> = (0..qn).map(|_| TopK::new(options.k)).collect();
        for d0 in (0..nd).step_by(options.doc_block) {
            let dn = options.doc_block.min(nd - d0);
            let q = &queries.data[q0 * dim..(q0 + qn) * dim];
            let d = &docs.data[d0 * dim..(d0 + dn) * dim];
            matmul_transposed(q, d, qn, dn, dim, &mut scores[..qn * dn]);
            for (i, top) in tops.iter_mut().enumerate() {
                let skip = exclude[q0 + i];
                for (j, &score) in scores[i * dn..(i + 1) * dn].iter().enumerate() {
                    let doc = (d0 + j) as u32;
                    if skip != Some(doc) {
                        top.offer(score, id_rank[doc as usize], doc);
                    }
                }
            }
        }
        for (i, top) in tops.into_iter().enumerate() {
            out[q0 + i] = top.into_sorted();
        }
        done(qn);
    }
}

/// `out (m x n) = a (m x k) * b (n x k)^T`, all row-major.
fn matmul_transposed(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    debug_assert_eq!((a.len(), b.len(), out.len()), (m * k, n * k, m * n));
    // SAFETY: the strides describe exactly the slices checked above: `out` is m x n with row
    // stride n, `a` is m x k with row stride k, and b^T is k x n read from `b` (n x k) with
    // column stride k and row stride 1. No two of them alias (`out` is exclusively borrowed).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// trec_eval's order of two hits: higher score first, then larger id.
pub fn hit_order(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(b.1.cmp(&a.1))
}
