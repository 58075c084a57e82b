//! A bounded min-heap keeping the k best (score, id rank) pairs seen.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{Hit, hit_order};

#[derive(Debug, Clone, Copy, PartialEq)]
struct Key {
    score: f32,
    id_rank: u32,
    doc: u32,
}

impl Eq for Key {}

impl Ord for Key {
    /// Better keys compare greater: higher score, then larger id.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        hit_order((other.score, other.id_rank), (self.score, self.id_rank))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Key>>,
    /// The worst score kept once full: most candidates fail this one comparison.
    floor: f32,
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
            floor: f32::NEG_INFINITY,
        }
    }

    /// Offers document `doc` (`id_ranks` holds every document's id rank: it is read only for
    /// a score that reaches the floor, most candidates sparing that scattered load).
    #[inline]
    pub(crate) fn offer(&mut self, score: f32, doc: u32, id_ranks: &[u32]) {
        // -0.0 and 0.0 are one score (trec_eval compares with `>`), not two.
        let score = score + 0.0;
        if self.k == 0 || (self.heap.len() == self.k && score < self.floor) || score.is_nan() {
            return;
        }
        let key = Key {
            score,
            id_rank: id_ranks[doc as usize],
            doc,
        };
        if self.heap.len() < self.k {
            self.heap.push(Reverse(key));
        } else if key > self.heap.peek().expect("full").0 {
            // One sift down in place of a pop and a push.
            *self.heap.peek_mut().expect("full") = Reverse(key);
        } else {
            return;
        }
        if self.heap.len() == self.k {
            self.floor = self.heap.peek().expect("full").0.score;
        }
    }

    /// The score a hit must reach to be kept: the k-th best so far once k are kept.
    pub(crate) fn floor(&self) -> f32 {
        if self.k == 0 {
            f32::INFINITY
        } else {
            self.floor
        }
    }

    /// The kept hits, best first.
    pub(crate) fn into_sorted(self) -> Vec<Hit> {
        let mut keys: Vec<Key> = self.heap.into_iter().map(|r| r.0).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        keys.into_iter()
            .map(|k| Hit {
                doc: k.doc,
                score: k.score,
            })
            .collect()
    }
}
