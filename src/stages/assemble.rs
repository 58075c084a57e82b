//! `assemble`: graded passages (+ real qrels, + sampled negatives) -> training lists (`groups`),
//! following the reference implementation's semantics: per-source score filters and transforms,
//! per-source random subsets, one record per document id across sources (the later source
//! wins), `random` (shuffle, cycle when short) or `top` selection, a binary mode for InfoNCE,
//! and the random draws made anew for every epoch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

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
use crate::table::{self, TableWriter, columns};

pub(crate) struct Assemble;

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
        Ok(Box::new(AssembleStage { config }))
    }
}

struct AssembleStage {
    config: Config,
}

impl Stage for AssembleStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("groups")]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.assemble(ctx))
    }
}

/// A passage a source offers for a query. Text is shared, not copied, between the sources'
/// table, the lists of every epoch and the output batches.
#[derive(Debug, Clone)]
struct Candidate {
    doc_id: Arc<str>,
    label: f64,
    source: Arc<str>,
    title: Arc<str>,
    text: Arc<str>,
}

/// One source's passages by query, in [`canonical_order`].
type ByQuery = BTreeMap<String, Vec<Candidate>>;

/// Passages ordered by content, not by table row: a table's row order is not part of its
/// content (a SQL stage's join may emit rows in any order), and the seeded shuffles must give
/// the same lists for the same rows.
fn canonical_order(by_query: &mut ByQuery) {
    for list in by_query.values_mut() {
        list.sort_by(|a, b| {
            (&a.doc_id, &a.title, &a.text)
                .cmp(&(&b.doc_id, &b.title, &b.text))
                .then(a.label.total_cmp(&b.label))
        });
    }
}

/// Output rows written per batch: memory holds one batch of rows, not the table.
const ROWS_PER_BATCH: usize = 65_536;

/// The `groups` rows being written: (query, epoch, position, passage).
struct GroupsWriter {
    rows: Vec<(Arc<str>, i32, i32, Candidate)>,
    schema: arrow::datatypes::SchemaRef,
    writer: TableWriter,
}

impl GroupsWriter {
    fn push(&mut self, row: (Arc<str>, i32, i32, Candidate)) -> Result<(), StageError> {
        self.rows.push(row);
        if self.rows.len() >= ROWS_PER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StageError> {
        let rows = std::mem::take(&mut self.rows);
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                columns::utf8(rows.iter().map(|r| &*r.0)),
                columns::int32(rows.iter().map(|r| r.1)),
                columns::int32(rows.iter().map(|r| r.2)),
                columns::utf8(rows.iter().map(|r| &*r.3.doc_id)),
                columns::float64(rows.iter().map(|r| r.3.label)),
                columns::utf8(rows.iter().map(|r| &*r.3.source)),
                columns::utf8(rows.iter().map(|r| &*r.3.title)),
                columns::utf8(rows.iter().map(|r| &*r.3.text)),
            ],
        )
        .expect("columns follow the groups kind");
        Ok(self.writer.write(&batch)?)
    }
}

impl AssembleStage {
    /// A source's passages by query. Sources that name documents by id (qrels, negatives) get
    /// their texts from the corpus later, in [`AssembleStage::attach_texts`].
    async fn read_source(&self, ctx: &mut StageContext, role: &str) -> Result<ByQuery, StageError> {
        if !ctx.has_input(role) {
            return Err(StageError::config(
                "sources",
                format!("a source reads `{role}`, but the stage has no input `{role}`"),
            ));
        }
        let source: Arc<str> = Arc::from(role);
        let empty: Arc<str> = Arc::from("");
        let mut out = ByQuery::new();
        let mut input = ctx.stream_input(role).await?;
        while let Some(batch) = input.next().await? {
            let q = columns::get::<StringArray>(&batch, "query_id");
            let d = columns::get::<StringArray>(&batch, "doc_id");
            let graded = role == "graded";
            let label =
                columns::get::<Int32Array>(&batch, if graded { "level" } else { "relevance" });
            let texts = graded.then(|| {
                (
                    columns::get::<StringArray>(&batch, "title"),
                    columns::get::<StringArray>(&batch, "text"),
                )
            });
            for i in 0..batch.num_rows() {
                let (title, text) = match texts {
                    Some((t, x)) => (Arc::from(t.value(i)), Arc::from(x.value(i))),
                    None => (empty.clone(), empty.clone()),
                };
                out.entry(q.value(i).to_string())
                    .or_default()
                    .push(Candidate {
                        doc_id: Arc::from(d.value(i)),
                        label: f64::from(label.value(i)),
                        source: source.clone(),
                        title,
                        text,
                    });
            }
        }
        Ok(out)
    }

    /// Fills in the texts of documents named by id, in one pass over the corpus that keeps only
    /// the documents named (not the whole corpus).
    async fn attach_texts(
        &self,
        ctx: &mut StageContext,
        sources: &mut [(&SourceConfig, ByQuery)],
    ) -> Result<(), StageError> {
        let by_id = |s: &SourceConfig| s.input != "graded";
        let wanted: HashSet<Arc<str>> = sources
            .iter()
            .filter(|(s, _)| by_id(s))
            .flat_map(|(_, m)| m.values().flatten().map(|c| c.doc_id.clone()))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if !ctx.has_input("corpus") {
            let role = &sources
                .iter()
                .find(|(s, _)| by_id(s))
                .expect("wanted")
                .0
                .input;
            return Err(StageError::config(
                "inputs",
                format!(
                    "source `{role}` names documents by id: bind the input `corpus` for their text"
                ),
            ));
        }
        let mut docs: HashMap<Arc<str>, (Arc<str>, Arc<str>)> = HashMap::new();
        let mut corpus = ctx.stream_input("corpus").await?;
        while let Some(batch) = corpus.next().await? {
            let d = columns::get::<StringArray>(&batch, "doc_id");
            let t = columns::get::<StringArray>(&batch, "title");
            let x = columns::get::<StringArray>(&batch, "text");
            for i in 0..batch.num_rows() {
                if let Some(id) = wanted.get(d.value(i)) {
                    docs.insert(id.clone(), (Arc::from(t.value(i)), Arc::from(x.value(i))));
                }
            }
        }
        for (source, by_query) in sources.iter_mut().filter(|(s, _)| by_id(s)) {
            for (query, list) in by_query.iter_mut() {
                for c in list {
                    let Some((title, text)) = docs.get(&c.doc_id) else {
                        return Err(StageError::data(
                            &source.input,
                            None,
                            format!(
                                "query `{query}`: document `{}` is not in the corpus",
                                c.doc_id
                            ),
                        ));
                    };
                    (c.title, c.text) = (title.clone(), text.clone());
                }
            }
        }
        Ok(())
    }

    async fn assemble(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut sources = Vec::new();
        for s in &self.config.sources {
            sources.push((s, self.read_source(ctx, &s.input).await?));
        }
        self.attach_texts(ctx, &mut sources).await?;
        for (_, by_query) in &mut sources {
            canonical_order(by_query);
        }
        let mut queries: Vec<Arc<str>> = sources
            .iter()
            .flat_map(|(_, m)| m.keys().map(|q| Arc::from(q.as_str())))
            .collect();
        queries.sort();
        queries.dedup();

        let schema = table::schema("groups")?.arrow();
        let mut out = GroupsWriter {
            rows: Vec::new(),
            writer: ctx.create_table("groups", schema.clone())?,
            schema,
        };
        let (mut groups, mut skipped) = (0u64, 0u64);
        for epoch in 0..self.config.epochs {
            // Epoch 0 draws from stream 0: the lists of a one-epoch table.
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(epoch as u64);
            for query in &queries {
                let candidates = self.candidates(&sources, query, &mut rng);
                let group = match &self.config.binary {
                    None => self.select(candidates, self.config.group_size, &mut rng),
                    Some(b) => self.binary_group(candidates, b.threshold, &mut rng),
                };
                match group {
                    Some(list) => {
                        groups += u64::from(epoch == 0);
                        for (i, c) in list.into_iter().enumerate() {
                            out.push((query.clone(), epoch as i32, i as i32, c))?;
                        }
                    }
                    None if epoch == 0 => skipped += 1,
                    None => {}
                }
            }
        }
        out.flush()?;
        ctx.set_stat("groups", groups);
        ctx.set_stat("epochs", self.config.epochs as u64);
        ctx.set_stat("queries_skipped", skipped);
        ctx.finish_table(out.writer)
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
        let mut index: HashMap<Arc<str>, usize> = HashMap::new();
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
