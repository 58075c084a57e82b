//! trec_eval-compatible retrieval measures (trec_eval 9 semantics), engine- and table-free.
//!
//! Semantics that matter for exact agreement: a run is ranked by score descending, ties by
//! document id descending (byte order), whatever ranks the file states; unjudged documents are
//! not relevant; binary measures count a document relevant when its judgment is at least
//! `relevance_level`; nDCG uses the judgment itself as the (linear) gain; a query is evaluated
//! when it is both judged and in the run, unless `complete` (trec_eval `-c`) also scores judged
//! queries missing from the run, as zeros.

mod measure;
mod significance;

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

pub use measure::{Measure, MeasureError};
pub use significance::PairedTest;
pub use significance::paired_test;

/// What `synthrank eval` and the `evaluate` stage report unless told otherwise: the paper's
/// nDCG@10 and recall@100, with MAP and MS MARCO's MRR@10.
pub(crate) const DEFAULT_MEASURES: &[&str] = &["ndcg_cut.10", "recall.100", "map", "mrr_cut.10"];

/// Hash maps keyed by string ids: foldhash, several times faster than SipHash on short keys.
type IdMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Judgments: query -> document -> relevance.
#[derive(Debug, Clone, Default)]
pub struct Qrels {
    judgments: IdMap<IdMap<i32>>,
}

impl Qrels {
    pub fn insert(&mut self, query: &str, doc: &str, relevance: i32) {
        let docs = match self.judgments.get_mut(query) {
            Some(docs) => docs,
            None => self.judgments.entry(query.into()).or_default(),
        };
        docs.insert(doc.into(), relevance);
    }
}

/// One query's retrieved documents and scores, in insertion order. The ids share one string
/// (a span per document): a run holds millions of ids, and a heap string each made inserting
/// the run cost more than evaluating it.
#[derive(Debug, Clone, Default)]
struct Retrieved {
    ids: String,
    /// (start, end) of the id in `ids`, and the score.
    entries: Vec<(u32, u32, f64)>,
}

impl Retrieved {
    fn id(&self, entry: usize) -> &str {
        let (start, end, _) = self.entries[entry];
        &self.ids[start as usize..end as usize]
    }

    /// Entry indices in trec_eval's order: score descending, then document id descending (byte
    /// order). Sorted on integer keys (the scores' total order), ids compared only within runs
    /// of equal scores: most runs have few ties, and comparing strings dominated the sort.
    fn ranked(&self) -> Vec<u32> {
        let mut keyed: Vec<(u64, u32)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (!total_order_key(e.2), i as u32))
            .collect();
        keyed.sort_unstable_by_key(|&(key, _)| key);
        let mut order: Vec<u32> = keyed.iter().map(|&(_, i)| i).collect();
        let mut start = 0;
        for end in 1..=keyed.len() {
            if end == keyed.len() || keyed[end].0 != keyed[start].0 {
                if end - start > 1 {
                    order[start..end]
                        .sort_unstable_by(|&a, &b| self.id(b as usize).cmp(self.id(a as usize)));
                }
                start = end;
            }
        }
        order
    }

    /// The judgment of the document at each rank of trec_eval's order (0 when unjudged). A
    /// run is mostly unjudged documents, whose places do not matter: when few are judged,
    /// each judged one is placed by counting the entries ranked above it, and the rest is
    /// never sorted. Documents at or above a `level` of 0 or less all matter: sorted then.
    fn ranked_gains(&self, judged: &IdMap<i32>, level: i32) -> Vec<i32> {
        let found: Vec<i32> = (0..self.entries.len())
            .map(|i| judged.get(self.id(i)).copied().unwrap_or(0))
            .collect();
        let placed: Vec<usize> = (0..found.len()).filter(|&i| found[i] != 0).collect();
        if level <= 0 || placed.len() > FEW_JUDGED {
            return self
                .ranked()
                .into_iter()
                .map(|i| found[i as usize])
                .collect();
        }
        let keys: Vec<u64> = self.entries.iter().map(|e| total_order_key(e.2)).collect();
        let mut gains = vec![0; found.len()];
        for &e in &placed {
            let key = keys[e];
            let above = keys.iter().filter(|&&k| k > key).count();
            // Equal scores: ids descending, then (duplicate ids) insertion order.
            let tied_above = (0..keys.len())
                .filter(|&f| keys[f] == key && f != e)
                .filter(|&f| {
                    (self.id(f), std::cmp::Reverse(f)) > (self.id(e), std::cmp::Reverse(e))
                })
                .count();
            gains[above + tied_above] = found[e];
        }
        gains
    }
}

/// Up to this many judged documents in a query's run are placed by counting instead of
/// sorting the run (a count is one pass of integer compares per judged document).
const FEW_JUDGED: usize = 32;

/// A key whose unsigned order is `f64::total_cmp`'s order.
fn total_order_key(score: f64) -> u64 {
    let bits = score.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// Retrieved documents with scores, per query, in any order.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Query -> its index in `retrieved`.
    queries: IdMap<usize>,
    retrieved: Vec<Retrieved>,
    /// The query of the last insert: run files come grouped by query, so most inserts skip
    /// the hash lookup.
    last: Option<(Box<str>, usize)>,
}

impl Run {
    pub fn insert(&mut self, query: &str, doc: &str, score: f64) {
        let index = match &self.last {
            Some((last, index)) if **last == *query => *index,
            _ => {
                let next = self.retrieved.len();
                let index = *self.queries.entry(query.into()).or_insert(next);
                if index == next {
                    // Sized as the previous query's: runs have one depth, mostly, and growing
                    // from empty copied and first touched each buffer twice.
                    let like = self
                        .retrieved
                        .last()
                        .map_or((0, 0), |r| (r.entries.len(), r.ids.len()));
                    self.retrieved.push(Retrieved {
                        ids: String::with_capacity(like.1),
                        entries: Vec::with_capacity(like.0),
                    });
                }
                self.last = Some((query.into(), index));
                index
            }
        };
        let docs = &mut self.retrieved[index];
        let start = docs.ids.len();
        docs.ids.push_str(doc);
        let span = u32::try_from(start)
            .ok()
            .zip(u32::try_from(docs.ids.len()).ok());
        let (start, end) = span.expect("one query's retrieved ids exceed 4 GiB");
        docs.entries.push((start, end, score));
    }

    fn get(&self, query: &str) -> Option<&Retrieved> {
        self.queries.get(query).map(|&i| &self.retrieved[i])
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Judgments at or above this level are relevant for binary measures (trec_eval `-l`).
    pub relevance_level: i32,
    /// Score judged queries that are absent from the run as zeros (trec_eval `-c`).
    pub complete: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            relevance_level: 1,
            complete: false,
        }
    }
}

/// Per-query values: query -> measure name (pytrec_eval style, e.g. `ndcg_cut_10`) -> value.
pub(crate) type PerQuery = BTreeMap<String, BTreeMap<String, f64>>;

/// Evaluates `run` against `qrels`, queries in parallel.
pub fn evaluate(qrels: &Qrels, run: &Run, measures: &[Measure], options: EvalOptions) -> PerQuery {
    let empty = Retrieved::default();
    let names: Vec<String> = measures.iter().map(Measure::name).collect();
    let work: Vec<(&str, &IdMap<i32>, &Retrieved)> = qrels
        .judgments
        .iter()
        .filter_map(|(query, judged)| match run.get(query) {
            Some(r) => Some((query.as_ref(), judged, r)),
            None if options.complete => Some((query.as_ref(), judged, &empty)),
            None => None,
        })
        .collect();
    work.par_iter()
        .map(|(query, judged, retrieved)| {
            let gains = retrieved.ranked_gains(judged, options.relevance_level);
            let query_eval = QueryEval::new(gains, judged, options.relevance_level);
            let values = names
                .iter()
                .zip(measures)
                .map(|(name, m)| (name.clone(), query_eval.value(m)))
                .collect();
            (query.to_string(), values)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// Arithmetic mean of each measure over the evaluated queries.
pub fn mean(per_query: &PerQuery) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for values in per_query.values() {
        for (name, v) in values {
            *sums.entry(name.clone()).or_default() += v;
        }
    }
    let n = per_query.len().max(1) as f64;
    sums.into_iter().map(|(k, v)| (k, v / n)).collect()
}

/// One query's ranked judgments and the counts every measure needs.
struct QueryEval {
    /// Judgment of the document at each rank (0 when unjudged).
    gains: Vec<i32>,
    /// Whether the document at each rank is relevant at the relevance level.
    relevant: Vec<bool>,
    /// Number of judged documents at or above the relevance level.
    num_rel: usize,
    /// Judgments of all judged documents, best first (the ideal ranking for nDCG).
    ideal: Vec<i32>,
}

impl QueryEval {
    fn new(gains: Vec<i32>, judged: &IdMap<i32>, level: i32) -> QueryEval {
        let mut ideal: Vec<i32> = judged.values().copied().filter(|&g| g > 0).collect();
        ideal.sort_unstable_by(|a, b| b.cmp(a));
        QueryEval {
            relevant: gains.iter().map(|&g| g >= level).collect(),
            gains,
            num_rel: judged.values().filter(|&&g| g >= level).count(),
            ideal,
        }
    }

    fn relevant_in_top(&self, k: usize) -> usize {
        self.relevant.iter().take(k).filter(|&&r| r).count()
    }

    fn average_precision(&self, cutoff: usize) -> f64 {
        if self.num_rel == 0 {
            return 0.0;
        }
        let mut found = 0usize;
        let mut sum = 0.0;
        for (i, &rel) in self.relevant.iter().take(cutoff).enumerate() {
            if rel {
                found += 1;
                sum += found as f64 / (i + 1) as f64;
            }
        }
        sum / self.num_rel as f64
    }

    fn dcg(gains: impl Iterator<Item = i32>) -> f64 {
        // Folded from +0.0: `Sum` for floats starts at -0.0, and trec_eval prints an empty
        // DCG as 0.0000, not -0.0000.
        gains
            .enumerate()
            .filter(|(_, g)| *g > 0)
            .map(|(i, g)| g as f64 / ((i + 2) as f64).log2())
            .fold(0.0, |sum, x| sum + x)
    }

    fn ndcg(&self, cutoff: usize) -> f64 {
        let ideal = Self::dcg(self.ideal.iter().copied().take(cutoff));
        if ideal == 0.0 {
            return 0.0;
        }
        Self::dcg(self.gains.iter().copied().take(cutoff)) / ideal
    }

    fn reciprocal_rank(&self, cutoff: usize) -> f64 {
        self.relevant
            .iter()
            .take(cutoff)
            .position(|&r| r)
            .map_or(0.0, |i| 1.0 / (i + 1) as f64)
    }

    fn value(&self, measure: &Measure) -> f64 {
        match *measure {
            Measure::Ndcg => self.ndcg(usize::MAX),
            Measure::NdcgCut(k) => self.ndcg(k),
            Measure::Map => self.average_precision(usize::MAX),
            Measure::MapCut(k) => self.average_precision(k),
            Measure::RecipRank => self.reciprocal_rank(usize::MAX),
            Measure::MrrCut(k) => self.reciprocal_rank(k),
            Measure::Precision(k) => self.relevant_in_top(k) as f64 / k as f64,
            Measure::Recall(k) => match self.num_rel {
                0 => 0.0,
                n => self.relevant_in_top(k) as f64 / n as f64,
            },
            Measure::Success(k) => f64::from(u8::from(self.relevant_in_top(k) > 0)),
            Measure::Rprec => match self.num_rel {
                0 => 0.0,
                n => self.relevant_in_top(n) as f64 / n as f64,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Placing the few judged documents by counting gives exactly the sorted order's gains,
    /// through score ties, equal ids and judgments of 0 and below.
    #[test]
    fn counted_places_match_the_sorted_run() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let n = rng.random_range(1..60);
            let mut retrieved = Retrieved::default();
            let mut judged = IdMap::default();
            for _ in 0..n {
                let id = format!("d{}", rng.random_range(0..40));
                let start = retrieved.ids.len() as u32;
                retrieved.ids.push_str(&id);
                let score = f64::from(rng.random_range(-3..4)) / 2.0;
                retrieved
                    .entries
                    .push((start, retrieved.ids.len() as u32, score));
                if rng.random_bool(0.2) {
                    judged.insert(id.into(), rng.random_range(-1..4));
                }
            }
            let sorted: Vec<i32> = retrieved
                .ranked()
                .into_iter()
                .map(|i| judged.get(retrieved.id(i as usize)).copied().unwrap_or(0))
                .collect();
            assert_eq!(retrieved.ranked_gains(&judged, 1), sorted);
        }
    }
}
