//! One query's two passes. The first collects every document whose upper bound reaches the
//! k-th best lower bound seen so far (k documents are certainly at least that good); the
//! second scores the survivors exactly, best bound first, and stops at the first bound below
//! the k-th exact score.
//!
//! The k-th best lower bound over the whole corpus is within the bound's width of the final
//! k-th score, so the exact pass scores little more than the documents whose bound reaches
//! the final k-th score, instead of every document that beat a k-th score still rising.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::quantize::{PANEL, Side};
use super::{Hit, TopK, Vectors, kernel};

/// Rows fetched ahead of the exact pass's dot products (they are scattered over the corpus).
const PREFETCH: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// Its upper bound, +∞ for NaN (a vector that is not finite: always scored).
    upper: f32,
    doc: u32,
}

/// How a pass over part of the corpus treats the documents it offers. Early in a pass the
/// floor is low and most documents' upper bounds reach it: a query keeps about
/// 4.4·k·ln(n / k) of n documents, the gap between the bounds being about half a standard
/// deviation of the scores. A sample read first for its lower bounds alone (those reach a
/// floor of lower bounds about k·ln(n / k) times, and are cheap to offer) raises the floor
/// before anything is kept; the sample is read again at the end to keep its own documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Lower bounds offered, nothing kept (screened on the lower bound).
    Sample,
    /// Lower bounds offered, documents kept (screened on the upper bound).
    Whole,
    /// The sample again: documents kept, their lower bounds already offered.
    Resample,
}

impl Pass {
    /// The bound a document's is screened on against the floor.
    pub(crate) fn side(self) -> Side {
        match self {
            Pass::Sample => Side::Lower,
            Pass::Whole | Pass::Resample => Side::Upper,
        }
    }
}

pub(crate) struct Candidates {
    /// The best lower bounds: `floor()` is a score k documents certainly reach.
    lower: LowerBounds,
    kept: Vec<Candidate>,
    exclude: Option<u32>,
}

impl Candidates {
    pub fn new(k: usize, exclude: Option<u32>) -> Candidates {
        Candidates {
            lower: LowerBounds::new(k),
            kept: Vec::new(),
            exclude,
        }
    }

    /// The score an upper bound must reach to be kept.
    pub(crate) fn floor(&self) -> f32 {
        self.lower.floor
    }

    /// Offers the documents of a panel, `first..` (at most `live` of them), marked in
    /// `reaching` by [`super::quantize::QuantizedDocs::screen`] (on [`Pass::side`]);
    /// `bounds(j)` is document j's (lower, upper) bound.
    #[inline(always)]
    pub(crate) fn admit(
        &mut self,
        pass: Pass,
        first: usize,
        live: usize,
        mut reaching: u32,
        bounds: impl Fn(usize) -> (f32, f32),
    ) {
        if live < PANEL {
            reaching &= (1 << live) - 1;
        }
        while reaching != 0 {
            let j = reaching.trailing_zeros() as usize;
            reaching &= reaching - 1;
            let doc = (first + j) as u32;
            if self.exclude == Some(doc) {
                continue;
            }
            let (lower, upper) = bounds(j);
            if pass != Pass::Resample {
                self.lower.offer(lower);
            }
            // The floor may have risen since the mask was taken.
            if pass == Pass::Sample || upper < self.floor() {
                continue;
            }
            self.kept.push(Candidate {
                upper: if upper.is_nan() { f32::INFINITY } else { upper },
                doc,
            });
        }
    }

    /// The exact pass: the top k of the kept documents by exact score, best first.
    pub(crate) fn into_hits(
        mut self,
        query: &[f32],
        docs: Vectors<'_>,
        id_rank: &[u32],
    ) -> Vec<Hit> {
        let floor = self.lower.floor;
        self.kept.retain(|c| c.upper >= floor);
        self.kept
            .sort_unstable_by(|a, b| b.upper.total_cmp(&a.upper));
        let dim = docs.dim;
        let row = |c: &Candidate| &docs.data[c.doc as usize * dim..(c.doc as usize + 1) * dim];
        self.kept
            .iter()
            .take(PREFETCH)
            .for_each(|c| kernel::prefetch(row(c)));
        let mut top = TopK::new(self.lower.k);
        for (n, c) in self.kept.iter().enumerate() {
            // Sorted by bound: no later document can reach the k-th exact score either.
            if c.upper < top.floor() {
                break;
            }
            if let Some(ahead) = self.kept.get(n + PREFETCH) {
                kernel::prefetch(row(ahead));
            }
            top.offer(kernel::dot(query, row(c)), c.doc, id_rank);
        }
        top.into_sorted()
    }
}

/// The k best lower bounds offered, in a min-heap: `floor` is exactly the k-th best (−∞
/// below k). Only a bound above the floor enters, a sift of log k steps: about k·ln(n / k) of
/// n offered bounds do. (Cutting a loose list back to k every k entries let the floor lag far
/// behind: it rose only after k more bounds had passed it.)
struct LowerBounds {
    k: usize,
    best: BinaryHeap<Reverse<Bound>>,
    floor: f32,
}

/// A finite-or-infinite lower bound, ordered as a number (NaN never enters).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound(f32);

impl Eq for Bound {}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl LowerBounds {
    fn new(k: usize) -> LowerBounds {
        LowerBounds {
            k,
            best: BinaryHeap::with_capacity(k + 1),
            // Nothing reaches the top 0.
            floor: if k == 0 {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            },
        }
    }

    #[inline]
    fn offer(&mut self, lower: f32) {
        // NaN (a vector that is not finite) proves nothing; a bound at the floor adds nothing.
        if lower.is_nan()
            || lower < self.floor
            || (self.best.len() == self.k && lower == self.floor)
        {
            return;
        }
        if self.best.len() < self.k {
            self.best.push(Reverse(Bound(lower)));
        } else {
            *self.best.peek_mut().expect("full") = Reverse(Bound(lower));
        }
        if self.best.len() == self.k {
            self.floor = self.best.peek().expect("full").0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor is the k-th best lower bound offered so far after every offer, for k of 0, 1,
    /// a few and more than are offered, NaN and ties among them.
    #[test]
    fn lower_bounds_floor_is_the_kth_best_offered() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for k in [0, 1, 3, 100, 5000] {
            let mut lower = LowerBounds::new(k);
            let mut offered: Vec<f32> = Vec::new();
            let kth_best = |offered: &[f32]| {
                let mut sorted = offered.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                match k {
                    0 => f32::INFINITY,
                    _ => sorted.get(k - 1).copied().unwrap_or(f32::NEG_INFINITY),
                }
            };
            for n in 0..2000 {
                let value = if n % 97 == 0 {
                    f32::NAN
                } else {
                    rng.random_range(-50.0..50.0f32).round()
                };
                lower.offer(value);
                if !value.is_nan() {
                    offered.push(value);
                }
                assert_eq!(lower.floor, kth_best(&offered), "k {k}, after {n}");
            }
        }
    }

    /// The bounds decide what is scored: given bounds that (falsely) rule a document out, it is
    /// never scored, however good it is; the exact pass stops at the first bound below the k-th
    /// exact score, and an excluded document is never kept.
    #[test]
    fn only_documents_whose_bound_can_reach_are_scored() {
        // Exact scores against the query (1): 5, 4, 100, 50, 9. The bounds of docs 2 and 3 lie.
        let data = [5.0, 4.0, 100.0, 50.0, 9.0];
        let docs = Vectors {
            data: &data,
            dim: 1,
        };
        let mut bounds = [(f32::NEG_INFINITY, f32::NEG_INFINITY); PANEL];
        // k = 2: after docs 0 and 1 the k-th best lower bound is 3.5. Doc 2's upper bound (1)
        // is below it: never kept. Doc 3's (3.9) is kept, but below the k-th exact score (4)
        // once docs 0 and 1 are scored: the exact pass stops before it. Doc 4 is excluded.
        for (j, (l, u)) in [(4.5, 5.5), (3.5, 4.5), (0.0, 1.0), (2.5, 3.9), (8.0, 10.0)]
            .into_iter()
            .enumerate()
        {
            bounds[j] = (l, u);
        }
        let mut kept = Candidates::new(2, Some(4));
        // Every document offered, as if the screen passed them all: the bounds still decide.
        kept.admit(Pass::Whole, 0, 5, u32::MAX, |j| bounds[j]);
        let hits = kept.into_hits(&[1.0], docs, &[0, 1, 2, 3, 4]);
        assert_eq!(
            hits,
            vec![Hit { doc: 0, score: 5.0 }, Hit { doc: 1, score: 4.0 }]
        );
    }

    /// A sample pass raises the floor and keeps nothing; the resample keeps what reaches the
    /// floor and leaves the floor alone (its lower bounds were offered once already).
    #[test]
    fn a_sample_raises_the_floor_and_its_resample_keeps() {
        let data = [1.0, 2.0, 3.0];
        let docs = Vectors {
            data: &data,
            dim: 1,
        };
        let bounds = [(0.9, 1.1), (1.9, 2.1), (2.9, 3.1)];
        let mut kept = Candidates::new(1, None);
        kept.admit(Pass::Sample, 0, 3, 0b111, |j| bounds[j]);
        assert!(kept.kept.is_empty());
        assert_eq!(kept.lower.floor, 2.9);
        // Offered again, these lower bounds would count twice toward k (with k = 2, the floor
        // would become 2.9).
        let mut two = Candidates::new(2, None);
        two.admit(Pass::Sample, 0, 3, 0b111, |j| bounds[j]);
        two.admit(Pass::Resample, 0, 3, 0b111, |j| bounds[j]);
        assert_eq!(two.lower.floor, 1.9);
        assert_eq!(two.kept.len(), 2);
        kept.admit(Pass::Resample, 0, 3, 0b111, |j| bounds[j]);
        let hits = kept.into_hits(&[1.0], docs, &[0, 1, 2]);
        assert_eq!(hits, vec![Hit { doc: 2, score: 3.0 }]);
    }
}
