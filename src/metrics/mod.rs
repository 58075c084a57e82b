//! trec_eval-compatible retrieval measures (trec_eval 9 semantics), engine- and table-free.
//!
//! Semantics that matter for exact agreement: a run is ranked by score descending, ties by
//! document id descending (byte order), whatever ranks the file states; unjudged documents are
//! not relevant; binary measures count a document relevant when its judgment is at least
//! `relevance_level`; nDCG uses the judgment itself as the (linear) gain; a query is evaluated
//! when it is both judged and in the run, unless `complete` (trec_eval `-c`) also scores judged
//! queries missing from the run, as zeros.

mod measure;

use std::collections::{BTreeMap, HashMap};

pub use measure::{Measure, MeasureError};

/// What `synthrank eval` and the `evaluate` stage report unless told otherwise: the paper's
/// nDCG@10 and recall@100, with MAP and MS MARCO's MRR@10.
pub const DEFAULT_MEASURES: &[&str] = &["ndcg_cut.10", "recall.100", "map", "mrr_cut.10"];

/// Judgments: query -> document -> relevance.
#[derive(Debug, Clone, Default)]
pub struct Qrels {
    judgments: HashMap<String, HashMap<String, i32>>,
}

impl Qrels {
    pub fn insert(&mut self, query: &str, doc: &str, relevance: i32) {
        self.judgments
            .entry(query.to_string())
            .or_default()
            .insert(doc.to_string(), relevance);
    }

    pub fn queries(&self) -> impl Iterator<Item = &str> {
        self.judgments.keys().map(String::as_str)
    }
}

/// Retrieved documents with scores, per query, in any order.
#[derive(Debug, Clone, Default)]
pub struct Run {
    results: HashMap<String, Vec<(String, f64)>>,
}

impl Run {
    pub fn insert(&mut self, query: &str, doc: &str, score: f64) {
        self.results
            .entry(query.to_string())
            .or_default()
            .push((doc.to_string(), score));
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
pub type PerQuery = BTreeMap<String, BTreeMap<String, f64>>;

/// Evaluates `run` against `qrels`.
pub fn evaluate(qrels: &Qrels, run: &Run, measures: &[Measure], options: EvalOptions) -> PerQuery {
    let empty = Vec::new();
    let mut out = PerQuery::new();
    for (query, judged) in &qrels.judgments {
        let retrieved = match run.results.get(query) {
            Some(r) => r,
            None if options.complete => &empty,
            None => continue,
        };
        let ranked = rank(retrieved);
        let gains: Vec<i32> = ranked
            .iter()
            .map(|doc| judged.get(*doc).copied().unwrap_or(0))
            .collect();
        let query_eval = QueryEval::new(&gains, judged, options.relevance_level);
        out.insert(
            query.clone(),
            measures
                .iter()
                .map(|m| (m.name(), query_eval.value(m)))
                .collect(),
        );
    }
    out
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

/// trec_eval's order: score descending, then document id descending.
fn rank(retrieved: &[(String, f64)]) -> Vec<&str> {
    let mut sorted: Vec<&(String, f64)> = retrieved.iter().collect();
    sorted.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
    });
    sorted.into_iter().map(|(d, _)| d.as_str()).collect()
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
    fn new(gains: &[i32], judged: &HashMap<String, i32>, level: i32) -> QueryEval {
        let mut ideal: Vec<i32> = judged.values().copied().filter(|&g| g > 0).collect();
        ideal.sort_unstable_by(|a, b| b.cmp(a));
        QueryEval {
            gains: gains.to_vec(),
            relevant: gains.iter().map(|&g| g >= level).collect(),
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
        gains
            .enumerate()
            .filter(|(_, g)| *g > 0)
            .map(|(i, g)| g as f64 / ((i + 2) as f64).log2())
            .sum()
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
