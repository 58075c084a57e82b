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
    fn id(&self, entry: &(u32, u32, f64)) -> &str {
        &self.ids[entry.0 as usize..entry.1 as usize]
    }

    /// Ids in trec_eval's order: score descending, then document id descending (byte order).
    fn ranked(&self) -> Vec<&str> {
        let mut sorted = self.entries.clone();
        sorted.sort_unstable_by(|a, b| {
            b.2.total_cmp(&a.2)
                .then_with(|| self.id(b).as_bytes().cmp(self.id(a).as_bytes()))
        });
        sorted.iter().map(|e| self.id(e)).collect()
    }
}

/// Retrieved documents with scores, per query, in any order.
#[derive(Debug, Clone, Default)]
pub struct Run {
    results: IdMap<Retrieved>,
}

impl Run {
    pub fn insert(&mut self, query: &str, doc: &str, score: f64) {
        let docs = match self.results.get_mut(query) {
            Some(docs) => docs,
            None => self.results.entry(query.into()).or_default(),
        };
        let start = docs.ids.len();
        docs.ids.push_str(doc);
        let span = u32::try_from(start)
            .ok()
            .zip(u32::try_from(docs.ids.len()).ok());
        let (start, end) = span.expect("one query's retrieved ids exceed 4 GiB");
        docs.entries.push((start, end, score));
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
        .filter_map(|(query, judged)| match run.results.get(query) {
            Some(r) => Some((query.as_ref(), judged, r)),
            None if options.complete => Some((query.as_ref(), judged, &empty)),
            None => None,
        })
        .collect();
    work.par_iter()
        .map(|(query, judged, retrieved)| {
            let gains: Vec<i32> = retrieved
                .ranked()
                .iter()
                .map(|doc| judged.get(*doc).copied().unwrap_or(0))
                .collect();
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
