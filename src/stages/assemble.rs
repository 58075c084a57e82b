//! `assemble`: graded passages (+ real qrels, + sampled negatives) -> training lists (`groups`),
//! following the reference implementation's semantics: per-source score filters and transforms,
//! per-source random subsets, one record per document id across sources (the later source
//! wins), `random` (shuffle, cycle when short) or `top` selection, a binary mode for InfoNCE,
//! and the random draws made anew for every epoch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use arrow::array::{Int32Array, RecordBatch, StringArray};
use futures::future::BoxFuture;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use crate::pipeline::{
    ConfigError, InputRole, InputRoles, OutputDecl, Stage, StageContext, StageError, StageKind,
    parse_config,
};
use crate::table::{self, columns};

pub struct Assemble;

const INPUTS: &[InputRole] = &[
    InputRole {
        name: "graded",
        kind: Some("graded_docs"),
        required: false,
    },
    InputRole {
        name: "qrels",
        kind: Some("qrels"),
        required: false,
    },
    InputRole {
        name: "negatives",
        kind: Some("qrels"),
        required: false,
    },
    InputRole {
        name: "corpus",
        kind: Some("corpus"),
        required: false,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Selection {
    /// Shuffle the candidates, cycling through them again when there are fewer than the group.
    Random,
    /// The highest labels first (ties by doc id), cycling when short.
    Top,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    /// The input role the passages come from: graded, qrels or negatives.
    input: String,
    /// Keep passages whose score is >= this.
    #[serde(default)]
    min_score: Option<f64>,
    /// Keep passages whose score is < this.
    #[serde(default)]
    max_score: Option<f64>,
    /// Replace every kept passage's score by this label (e.g. 3 for real positives).
    #[serde(default)]
    score_transform: Option<f64>,
    /// Take this many of the source's passages per query, at random.
    #[serde(default)]
    group_random_k: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BinaryConfig {
    /// Labels >= this are positives, the rest negatives.
    threshold: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    group_size: usize,
    #[serde(default = "default_selection")]
    selection: Selection,
    sources: Vec<SourceConfig>,
    /// InfoNCE lists: one positive first (label 1), negatives after (label 0).
    #[serde(default)]
    binary: Option<BinaryConfig>,
    #[serde(default)]
    seed: u64,
    /// Draw this many epochs of lists (random subsets and selections anew each time, as the
    /// reference's data loader does each time it visits a query).
    #[serde(default = "one_epoch")]
    epochs: usize,
}

fn one_epoch() -> usize {
    1
}

fn default_selection() -> Selection {
    Selection::Random
}

impl StageKind for Assemble {
    fn kind(&self) -> &'static str {
        "assemble"
    }
    /// 2: one record per document across sources; an `epoch` column.
    fn version(&self) -> u32 {
        2
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Fixed(INPUTS)
    }
    fn prepare(&self, config: &serde_json::Value, _: &Path) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        if config.group_size == 0 {
            return Err(ConfigError::new("group_size", "must be at least 1"));
        }
        if config.binary.is_some() && config.group_size < 2 {
            return Err(ConfigError::new(
                "group_size",
                "binary lists need a positive and at least one negative",
            ));
        }
        if config.epochs == 0 {
            return Err(ConfigError::new("epochs", "must be at least 1"));
        }
        if config.sources.is_empty() {
            return Err(ConfigError::new("sources", "name at least one source"));
        }
        for (i, s) in config.sources.iter().enumerate() {
            if !matches!(s.input.as_str(), "graded" | "qrels" | "negatives") {
                return Err(ConfigError::new(
                    format!("sources[{i}].input"),
                    format!("`{}` is not graded, qrels or negatives", s.input),
                ));
            }
            if s.group_random_k == Some(0) {
                return Err(ConfigError::new(
                    format!("sources[{i}].group_random_k"),
                    "must be at least 1",
                ));
            }
        }
        Ok(Box::new(Prepared { config }))
    }
}

struct Prepared {
    config: Config,
}

impl Stage for Prepared {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("groups")]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.assemble(ctx))
    }
}

#[derive(Debug, Clone)]
struct Candidate {
    doc_id: String,
    label: f64,
    source: String,
    title: String,
    text: String,
}

/// One source's passages by query, in [`canonical_order`].
type ByQuery = BTreeMap<String, Vec<Candidate>>;

/// Passages ordered by content, not by table row: a table's row order is not part of its
/// content (a SQL stage's join may emit rows in any order), and the seeded shuffles must give
/// the same lists for the same rows.
fn canonical_order(mut by_query: ByQuery) -> ByQuery {
    for list in by_query.values_mut() {
        list.sort_by(|a, b| {
            (&a.doc_id, &a.title, &a.text)
                .cmp(&(&b.doc_id, &b.title, &b.text))
                .then(a.label.total_cmp(&b.label))
        });
    }
    by_query
}

impl Prepared {
    async fn read_source(
        &self,
        ctx: &mut StageContext,
        role: &str,
        corpus: &mut Option<HashMap<String, (String, String)>>,
    ) -> Result<ByQuery, StageError> {
        if !ctx.has_input(role) {
            return Err(StageError::Invalid(format!(
                "a source reads `{role}`, but the stage has no input `{role}`"
            )));
        }
        let mut out = ByQuery::new();
        if role == "graded" {
            for batch in ctx.read_input(role).await? {
                let q = columns::get::<StringArray>(&batch, "query_id");
                let d = columns::get::<StringArray>(&batch, "doc_id");
                let l = columns::get::<Int32Array>(&batch, "level");
                let t = columns::get::<StringArray>(&batch, "title");
                let x = columns::get::<StringArray>(&batch, "text");
                for i in 0..batch.num_rows() {
                    out.entry(q.value(i).to_string())
                        .or_default()
                        .push(Candidate {
                            doc_id: d.value(i).to_string(),
                            label: f64::from(l.value(i)),
                            source: role.to_string(),
                            title: t.value(i).to_string(),
                            text: x.value(i).to_string(),
                        });
                }
            }
            return Ok(canonical_order(out));
        }
        if corpus.is_none() {
            if !ctx.has_input("corpus") {
                return Err(StageError::Invalid(format!(
                    "source `{role}` names documents by id: bind the input `corpus` for their text"
                )));
            }
            let mut docs = HashMap::new();
            for batch in ctx.read_input("corpus").await? {
                let d = columns::get::<StringArray>(&batch, "doc_id");
                let t = columns::get::<StringArray>(&batch, "title");
                let x = columns::get::<StringArray>(&batch, "text");
                for i in 0..batch.num_rows() {
                    docs.insert(
                        d.value(i).to_string(),
                        (t.value(i).to_string(), x.value(i).to_string()),
                    );
                }
            }
            *corpus = Some(docs);
        }
        let docs = corpus.as_ref().expect("loaded above");
        for batch in ctx.read_input(role).await? {
            let q = columns::get::<StringArray>(&batch, "query_id");
            let d = columns::get::<StringArray>(&batch, "doc_id");
            let r = columns::get::<Int32Array>(&batch, "relevance");
            for i in 0..batch.num_rows() {
                let Some((title, text)) = docs.get(d.value(i)) else {
                    return Err(StageError::Invalid(format!(
                        "input `{role}` row {}: document `{}` is not in the corpus",
                        i + 1,
                        d.value(i)
                    )));
                };
                out.entry(q.value(i).to_string())
                    .or_default()
                    .push(Candidate {
                        doc_id: d.value(i).to_string(),
                        label: f64::from(r.value(i)),
                        source: role.to_string(),
                        title: title.clone(),
                        text: text.clone(),
                    });
            }
        }
        Ok(canonical_order(out))
    }

    async fn assemble(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut corpus = None;
        let mut sources = Vec::new();
        for s in &self.config.sources {
            sources.push((s, self.read_source(ctx, &s.input, &mut corpus).await?));
        }
        let mut queries: Vec<&String> = sources.iter().flat_map(|(_, m)| m.keys()).collect();
        queries.sort();
        queries.dedup();

        let mut rows: Vec<(String, Candidate, i32, i32)> = Vec::new();
        let mut skipped = 0u64;
        for epoch in 0..self.config.epochs {
            // Epoch 0 draws from stream 0: the lists of a one-epoch table.
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(epoch as u64);
            for &query in &queries {
                let candidates = self.candidates(&sources, query, &mut rng);
                let group = match &self.config.binary {
                    None => self.select(candidates, self.config.group_size, &mut rng),
                    Some(b) => self.binary_group(candidates, b.threshold, &mut rng),
                };
                match group {
                    Some(list) => rows.extend(
                        list.into_iter()
                            .enumerate()
                            .map(|(i, c)| (query.clone(), c, epoch as i32, i as i32)),
                    ),
                    None if epoch == 0 => skipped += 1,
                    None => {}
                }
            }
        }

        let schema = table::schema("groups")?.arrow();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(rows.iter().map(|r| r.0.as_str())),
                columns::int32(rows.iter().map(|r| r.2)),
                columns::int32(rows.iter().map(|r| r.3)),
                columns::utf8(rows.iter().map(|r| r.1.doc_id.as_str())),
                columns::float64(rows.iter().map(|r| r.1.label)),
                columns::utf8(rows.iter().map(|r| r.1.source.as_str())),
                columns::utf8(rows.iter().map(|r| r.1.title.as_str())),
                columns::utf8(rows.iter().map(|r| r.1.text.as_str())),
            ],
        )
        .expect("columns follow the groups kind");
        let groups = rows.iter().filter(|r| r.3 == 0).count() as u64;
        ctx.set_stat("groups", groups);
        ctx.set_stat("epochs", self.config.epochs as u64);
        ctx.set_stat("queries_skipped", skipped);
        ctx.write_table("groups", schema, &[batch])
    }

    /// A query's passages from every source: each source filtered, subsampled and relabelled,
    /// then one record per document id, the later source's where two name the same document
    /// (at the earlier one's place, as a Python dict update keeps it).
    fn candidates(
        &self,
        sources: &[(&SourceConfig, ByQuery)],
        query: &str,
        rng: &mut ChaCha8Rng,
    ) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (source, by_query) in sources {
            let mut kept: Vec<Candidate> = by_query
                .get(query)
                .into_iter()
                .flatten()
                .filter(|c| source.min_score.is_none_or(|m| c.label >= m))
                .filter(|c| source.max_score.is_none_or(|m| c.label < m))
                .cloned()
                .map(|mut c| {
                    if let Some(label) = source.score_transform {
                        c.label = label;
                    }
                    c
                })
                .collect();
            if let Some(k) = source.group_random_k {
                kept.shuffle(rng);
                kept.truncate(k);
            }
            for c in kept {
                match index.get(&c.doc_id) {
                    Some(&at) => candidates[at] = c,
                    None => {
                        index.insert(c.doc_id.clone(), candidates.len());
                        candidates.push(c);
                    }
                }
            }
        }
        candidates
    }

    /// `size` passages from the candidates, highest label first; None when there are none.
    fn select(
        &self,
        mut candidates: Vec<Candidate>,
        size: usize,
        rng: &mut ChaCha8Rng,
    ) -> Option<Vec<Candidate>> {
        if candidates.is_empty() {
            return None;
        }
        match self.config.selection {
            Selection::Random => candidates.shuffle(rng),
            Selection::Top => sort_by_label(&mut candidates),
        }
        let mut list: Vec<Candidate> = candidates.iter().cycle().take(size).cloned().collect();
        sort_by_label(&mut list);
        Some(list)
    }

    /// One positive (label >= threshold) then negatives, labels 1 and 0; None without both.
    fn binary_group(
        &self,
        candidates: Vec<Candidate>,
        threshold: f64,
        rng: &mut ChaCha8Rng,
    ) -> Option<Vec<Candidate>> {
        let (positives, negatives): (Vec<Candidate>, Vec<Candidate>) =
            candidates.into_iter().partition(|c| c.label >= threshold);
        let mut positive = self.select(positives, 1, rng)?;
        let mut negatives = self.select(negatives, self.config.group_size - 1, rng)?;
        positive[0].label = 1.0;
        negatives.iter_mut().for_each(|c| c.label = 0.0);
        positive.extend(negatives);
        Some(positive)
    }
}

fn sort_by_label(list: &mut [Candidate]) {
    list.sort_by(|a, b| {
        b.label
            .total_cmp(&a.label)
            .then_with(|| a.doc_id.cmp(&b.doc_id))
    });
}
