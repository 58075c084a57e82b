//! trec_eval-compatible retrieval measures (trec_eval 9 semantics), engine- and pipeline-free (a
//! run is Arrow columns, the form tables are read in).
//!
//! Semantics that matter for exact agreement: a run is ranked by score descending, ties by
//! document id descending (byte order), whatever ranks the file states; unjudged documents are
//! not relevant; binary measures count a document relevant when its judgment is at least
//! `relevance_level`; nDCG uses the judgment itself as the (linear) gain; a query is evaluated
//! when it is both judged and in the run, unless `complete` (trec_eval `-c`) also scores judged
//! queries missing from the run, as zeros.

mod measure;
mod significance;

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, Float64Array, StringArray, StringBuilder};
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

/// One query's retrieved documents and scores in insertion order: a stretch of rows of a
/// run's columns.
#[derive(Debug, Clone, Copy)]
struct Retrieved<'a> {
    docs: &'a StringArray,
    /// The stretch's first row in `docs`.
    first: usize,
    scores: &'a [f64],
}

impl Retrieved<'_> {
    fn len(&self) -> usize {
        self.scores.len()
    }

    #[inline]
    fn id(&self, entry: usize) -> &str {
        self.docs.value(self.first + entry)
    }

    /// The judgment of each document in insertion order (0 when unjudged).
    fn judgments<'s>(&'s self, judged: &'s Judged) -> impl Iterator<Item = i32> + 's {
        (0..self.len()).map(|entry| judged.get(self.id(entry)))
    }

    /// Entry indices in trec_eval's order: score descending, then document id descending (byte
    /// order). Sorted on integer keys (the scores' total order), ids compared only within runs
    /// of equal scores: most runs have few ties, and comparing strings dominated the sort.
    fn ranked(&self) -> Vec<u32> {
        let mut keyed: Vec<(u64, u32)> = self
            .scores
            .iter()
            .enumerate()
            .map(|(i, &score)| (!total_order_key(score), i as u32))
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
    fn ranked_gains(&self, judged: &Judged, level: i32) -> Vec<i32> {
        let placed: Vec<(usize, i32)> = self
            .judgments(judged)
            .enumerate()
            .filter(|&(_, gain)| gain != 0)
            .collect();
        if level <= 0 || placed.len() > FEW_JUDGED {
            let found: Vec<i32> = self.judgments(judged).collect();
            return self
                .ranked()
                .into_iter()
                .map(|i| found[i as usize])
                .collect();
        }
        let mut gains = vec![0; self.len()];
        if placed.is_empty() {
            return gains;
        }
        let keys: Vec<u64> = self.scores.iter().map(|&s| total_order_key(s)).collect();
        for &(e, gain) in &placed {
            let key = keys[e];
            let above = keys.iter().filter(|&&k| k > key).count();
            // Equal scores: ids descending, then (duplicate ids) insertion order.
            let tied_above = (0..keys.len())
                .filter(|&f| keys[f] == key && f != e)
                .filter(|&f| {
                    (self.id(f), std::cmp::Reverse(f)) > (self.id(e), std::cmp::Reverse(e))
                })
                .count();
            gains[above + tied_above] = gain;
        }
        gains
    }
}

/// A query's judgments, screened: a run is mostly unjudged documents, and looking each one up
/// in the hash map was half of evaluating. A 256-bit filter of the judged ids' digests (length
/// and last two bytes) answers most of them with one bit test; the rest are looked up.
struct Judged<'a> {
    map: &'a IdMap<i32>,
    filter: [u64; 4],
}

impl<'a> Judged<'a> {
    fn new(map: &'a IdMap<i32>) -> Judged<'a> {
        let mut filter = [0; 4];
        for id in map.keys() {
            let d = digest(id.as_bytes());
            filter[d >> 6] |= 1 << (d & 63);
        }
        Judged { map, filter }
    }

    #[inline]
    fn get(&self, id: &str) -> i32 {
        let d = digest(id.as_bytes());
        if self.filter[d >> 6] & 1 << (d & 63) == 0 {
            return 0;
        }
        self.map.get(id).copied().unwrap_or(0)
    }
}

/// 8 bits of an id from its length and last two bytes, where ids mostly differ (numbers,
/// hashes); ids alike there only pass the filter more often.
#[inline]
fn digest(id: &[u8]) -> usize {
    let n = id.len();
    let last = id.last().map_or(0, |&b| b as usize);
    let before = if n >= 2 { id[n - 2] as usize } else { 0 };
    (last * 31 + before * 7 + n * 131) & 255
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
///
/// A run is its rows' Arrow columns, shared with whoever read them (a `runs` table's batches
/// as the `evaluate` stage reads them), never copied: each query owns stretches of rows, one
/// when the run comes grouped by query, as run files and the `search` stage's tables do. A
/// run holds millions of documents, and copying one into the run's own buffers had been most
/// of evaluating it: writing fresh memory, whose page faults this VM makes dear.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Query -> its index in `stretches`.
    queries: IdMap<usize>,
    /// Each query's stretches, in insertion order.
    stretches: Vec<Vec<Stretch>>,
    /// Every appended batch's document ids and scores.
    parts: Vec<Part>,
}

/// One appended batch's columns, and the row of the run its first row is.
#[derive(Debug, Clone)]
struct Part {
    docs: StringArray,
    scores: Float64Array,
    first_row: usize,
}

/// Rows `first..first + len` of one of a run's parts.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    part: usize,
    first: usize,
    len: usize,
}

impl Run {
    /// Adds rows given as columns (query ids, document ids, scores), as a `runs` table's
    /// batch holds them: shared, not copied. Nulls are not expected (the table's kind
    /// forbids them).
    pub fn append(&mut self, queries: &StringArray, docs: &StringArray, scores: &Float64Array) {
        assert!(
            queries.len() == docs.len() && docs.len() == scores.len(),
            "a run's columns have one value per row"
        );
        let part = self.parts.len();
        let first_row = self.parts.last().map_or(0, |p| p.first_row + p.docs.len());
        self.parts.push(Part {
            docs: docs.clone(),
            scores: scores.clone(),
            first_row,
        });
        let mut first = 0;
        for row in 1..=queries.len() {
            if row == queries.len() || queries.value(row) != queries.value(first) {
                let len = row - first;
                self.add_stretch(queries.value(first), Stretch { part, first, len });
                first = row;
            }
        }
    }

    fn add_stretch(&mut self, query: &str, stretch: Stretch) {
        let index = match self.queries.get(query) {
            Some(&index) => index,
            None => {
                self.queries.insert(query.into(), self.stretches.len());
                self.stretches.push(Vec::new());
                self.stretches.len() - 1
            }
        };
        self.stretches[index].push(stretch);
    }

    /// The first row (counted over the appended parts in order) that retrieves again a
    /// document its query retrieved in an earlier row, with that query and document. Queries
    /// are checked in parallel, each thread one query's documents at a time, so memory stays
    /// within one query's run per thread.
    pub fn first_repeat(&self) -> Option<Repeat> {
        let queries: Vec<(&str, usize)> = self.queries.iter().map(|(q, &i)| (&**q, i)).collect();
        queries
            .par_iter()
            .map_init(
                || HashSet::with_hasher(foldhash::fast::RandomState::default()),
                |seen, &(query, index)| {
                    seen.clear();
                    self.rows_of(index)
                        .find(|&(_, doc, _)| !seen.insert(doc))
                        .map(|(row, doc, _)| (row, query, doc))
                },
            )
            .flatten()
            .min_by_key(|&(row, _, _)| row)
            .map(|(row, query, doc)| Repeat {
                row,
                query: query.to_string(),
                doc: doc.to_string(),
            })
    }

    /// A query's rows in insertion order: (row of the run, document id, score).
    fn rows_of(&self, index: usize) -> impl Iterator<Item = (usize, &str, f64)> {
        self.stretches[index].iter().flat_map(move |stretch| {
            let part = &self.parts[stretch.part];
            (stretch.first..stretch.first + stretch.len).map(move |row| {
                (
                    part.first_row + row,
                    part.docs.value(row),
                    part.scores.value(row),
                )
            })
        })
    }

    fn view(&self, stretch: Stretch) -> Retrieved<'_> {
        let part = &self.parts[stretch.part];
        Retrieved {
            docs: &part.docs,
            first: stretch.first,
            scores: &part.scores.values()[stretch.first..stretch.first + stretch.len],
        }
    }

    /// A query's documents in one piece: its only stretch, or its stretches copied together.
    fn retrieved(&self, index: usize) -> Documents<'_> {
        match *self.stretches[index].as_slice() {
            [one] => Documents::Borrowed(self.view(one)),
            _ => {
                let mut docs = StringBuilder::new();
                let mut scores = Vec::new();
                for (_, doc, score) in self.rows_of(index) {
                    docs.append_value(doc);
                    scores.push(score);
                }
                Documents::Gathered(docs.finish(), scores)
            }
        }
    }
}

/// A row that retrieves a document its query already retrieved ([`Run::first_repeat`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeat {
    pub row: usize,
    pub query: String,
    pub doc: String,
}

/// What was repeated, as an error message says it (the row is the caller's to place).
impl std::fmt::Display for Repeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "document `{}` appears twice for query `{}`",
            self.doc, self.query
        )
    }
}

/// Builds a run row by row (run files, tests) into the Arrow columns a run is made of.
#[derive(Default)]
pub struct RunBuilder {
    queries: StringBuilder,
    docs: StringBuilder,
    scores: Vec<f64>,
}

impl RunBuilder {
    pub fn insert(&mut self, query: &str, doc: &str, score: f64) {
        self.queries.append_value(query);
        self.docs.append_value(doc);
        self.scores.push(score);
    }

    pub fn finish(mut self) -> Run {
        let mut run = Run::default();
        run.append(
            &self.queries.finish(),
            &self.docs.finish(),
            &Float64Array::from(self.scores),
        );
        run
    }
}

/// A query's documents, ready to rank.
enum Documents<'a> {
    Borrowed(Retrieved<'a>),
    Gathered(StringArray, Vec<f64>),
}

impl Documents<'_> {
    fn view(&self) -> Retrieved<'_> {
        match self {
            Documents::Borrowed(view) => *view,
            Documents::Gathered(docs, scores) => Retrieved {
                docs,
                first: 0,
                scores,
            },
        }
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
    let names: Vec<String> = measures.iter().map(Measure::name).collect();
    let work: Vec<(&str, &IdMap<i32>, Option<usize>)> = qrels
        .judgments
        .iter()
        .filter_map(|(query, judged)| match run.queries.get(query) {
            Some(&index) => Some((query.as_ref(), judged, Some(index))),
            None if options.complete => Some((query.as_ref(), judged, None)),
            None => None,
        })
        .collect();
    work.par_iter()
        .map(|&(query, judged, index)| {
            let gains = match index.map(|i| run.retrieved(i)) {
                Some(documents) => documents
                    .view()
                    .ranked_gains(&Judged::new(judged), options.relevance_level),
                None => Vec::new(),
            };
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
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// Placing the few judged documents by counting gives exactly the sorted order's gains,
    /// through score ties, equal ids and judgments of 0 and below.
    #[test]
    fn counted_places_match_the_sorted_run() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let n = rng.random_range(1..60);
            let (mut docs, mut scores) = (StringBuilder::new(), Vec::new());
            let mut judged = IdMap::default();
            for _ in 0..n {
                let id = format!("d{}", rng.random_range(0..40));
                docs.append_value(&id);
                scores.push(f64::from(rng.random_range(-3..4)) / 2.0);
                if rng.random_bool(0.2) {
                    judged.insert(id.into(), rng.random_range(-1..4));
                }
            }
            let docs = docs.finish();
            let retrieved = Retrieved {
                docs: &docs,
                first: 0,
                scores: &scores,
            };
            let sorted: Vec<i32> = retrieved
                .ranked()
                .into_iter()
                .map(|i| judged.get(retrieved.id(i as usize)).copied().unwrap_or(0))
                .collect();
            assert_eq!(retrieved.ranked_gains(&Judged::new(&judged), 1), sorted);
        }
    }

    /// A run inserted with its queries interleaved (several stretches per query, gathered to
    /// evaluate), or appended in batches that split queries, scores exactly as the same run
    /// grouped by query in one batch.
    #[test]
    fn interleaved_runs_score_as_grouped_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut qrels = Qrels::default();
        let mut rows = Vec::new();
        for q in 0..20 {
            let query = format!("q{q}");
            for _ in 0..8 {
                qrels.insert(
                    &query,
                    &format!("d{}", rng.random_range(0..50)),
                    rng.random_range(0..4),
                );
            }
            for d in 0..rng.random_range(1..40) {
                rows.push((
                    query.clone(),
                    format!("d{d}"),
                    f64::from(rng.random_range(0..10)),
                ));
            }
        }
        let measures: Vec<Measure> = ["ndcg_cut.10", "map", "recip_rank", "P.5"]
            .iter()
            .flat_map(|m| Measure::parse_list(m).unwrap())
            .collect();
        let built = |rows: &[(String, String, f64)]| {
            let mut run = RunBuilder::default();
            for (q, d, s) in rows {
                run.insert(q, d, *s);
            }
            run.finish()
        };
        let grouped = evaluate(&qrels, &built(&rows), &measures, EvalOptions::default());
        let mut batched = Run::default();
        for batch in rows.chunks(7) {
            batched.append(
                &StringArray::from_iter_values(batch.iter().map(|(q, _, _)| q)),
                &StringArray::from_iter_values(batch.iter().map(|(_, d, _)| d)),
                &Float64Array::from_iter_values(batch.iter().map(|&(_, _, s)| s)),
            );
        }
        assert!(batched.stretches.iter().any(|s| s.len() > 1));
        assert_eq!(
            evaluate(&qrels, &batched, &measures, EvalOptions::default()),
            grouped
        );
        rows.shuffle(&mut rng);
        let interleaved = built(&rows);
        assert!(interleaved.stretches.iter().any(|s| s.len() > 1));
        assert_eq!(
            evaluate(&qrels, &interleaved, &measures, EvalOptions::default()),
            grouped
        );
    }

    /// The first row repeating its query's document is found across batches and stretches,
    /// the earliest of several; the same documents under other queries are no repeat.
    #[test]
    fn the_first_repeat_is_found_across_batches() {
        let batches: [&[(&str, &str)]; 2] = [
            &[("q1", "a"), ("q2", "a"), ("q1", "b")],
            &[("q1", "c"), ("q2", "b"), ("q2", "a"), ("q1", "a")],
        ];
        let mut run = Run::default();
        for rows in batches {
            run.append(
                &StringArray::from_iter_values(rows.iter().map(|r| r.0)),
                &StringArray::from_iter_values(rows.iter().map(|r| r.1)),
                &Float64Array::from_iter_values(rows.iter().map(|_| 1.0)),
            );
        }
        let repeat = Repeat {
            row: 5,
            query: "q2".into(),
            doc: "a".into(),
        };
        assert_eq!(run.first_repeat(), Some(repeat));
        let mut distinct = RunBuilder::default();
        for (q, d) in batches[0] {
            distinct.insert(q, d, 0.0);
        }
        assert_eq!(distinct.finish().first_repeat(), None);
    }

    /// The filter never hides a judgment: screened lookups equal the map's, for ids of every
    /// length (empty and one byte included) and judged sets small and large.
    #[test]
    fn screened_judgments_equal_the_map() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let id = |rng: &mut rand_chacha::ChaCha8Rng| -> String {
            let len = rng.random_range(0..6);
            (0..len).map(|_| rng.random_range('a'..='h')).collect()
        };
        for judged_count in [0, 1, 20, 300] {
            let mut map = IdMap::default();
            for _ in 0..judged_count {
                map.insert(id(&mut rng).into(), rng.random_range(-1..4));
            }
            let judged = Judged::new(&map);
            for _ in 0..2000 {
                let doc = id(&mut rng);
                assert_eq!(
                    judged.get(&doc),
                    map.get(doc.as_str()).copied().unwrap_or(0)
                );
            }
        }
    }
}
