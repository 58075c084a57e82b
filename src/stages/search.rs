//! `search`: exact inner-product top-k of query embeddings over corpus embeddings -> runs.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::pipeline::{
    ConfigError, InputRole, InputRoles, OutputDecl, Stage, StageContext, StageError, StageKind,
    parse_config,
};
use crate::retrieval::{self, SearchOptions, Vectors};
use crate::stages::blocking;
use crate::stages::spill_vec::SpillVec;
use crate::table::{self, columns};

pub(crate) struct Search;

const INPUTS: &[InputRole] = &[
    InputRole {
        name: "queries",
        kind: Some("embeddings"),
        required: true,
    },
    InputRole {
        name: "corpus",
        kind: Some("embeddings"),
        required: true,
    },
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Documents kept per query.
    #[serde(default = "default_k")]
    k: usize,
    /// Never retrieve a document whose id equals the query's (BEIR's ArguAna and Quora).
    #[serde(default)]
    exclude_self: bool,
    /// Worker threads (default: all cores).
    #[serde(default)]
    threads: Option<usize>,
    /// Corpus vectors up to this many MiB are held in memory; larger ones are written to an
    /// unlinked file in the stage's state directory and mapped (`spill_vec`).
    #[serde(default = "default_corpus_in_memory_mb")]
    corpus_in_memory_mb: u64,
}

fn default_corpus_in_memory_mb() -> u64 {
    4096
}

fn default_k() -> usize {
    100
}

impl StageKind for Search {
    fn kind(&self) -> &'static str {
        "search"
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Fixed(INPUTS)
    }
    fn prepare(&self, config: &serde_json::Value, _: &Path) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        if config.k == 0 {
            return Err(ConfigError::new("k", "must be at least 1"));
        }
        if config.threads == Some(0) {
            return Err(ConfigError::new("threads", "must be at least 1"));
        }
        Ok(Box::new(SearchStage { config }))
    }
}

struct SearchStage {
    config: Config,
}

impl Stage for SearchStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("runs")]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.search(ctx))
    }
}

/// Ids and row-major vectors of an embeddings table.
struct Embeddings {
    ids: Vec<String>,
    vectors: SpillVec<f32>,
    dim: usize,
}

impl Embeddings {
    /// The input bound to `role`, read batch by batch: memory holds the vectors once, or up
    /// to `memory_limit` bytes of them before they go to a mapped file.
    async fn read(
        ctx: &mut StageContext,
        role: &str,
        memory_limit: u64,
    ) -> Result<Embeddings, StageError> {
        // Made only if the vectors go to a file.
        let state = ctx.state_path().to_path_buf();
        let mut out = Embeddings {
            ids: Vec::new(),
            vectors: SpillVec::new(memory_limit, &state),
            dim: 0,
        };
        if let Some(rows) = ctx.input_rows(role) {
            out.ids.reserve(rows as usize);
        }
        let mut input = ctx.stream_input(role).await?;
        while let Some(batch) = input.next().await? {
            let ids = columns::get::<StringArray>(&batch, "id");
            let vectors = columns::get::<FixedSizeListArray>(&batch, "vector");
            let dim = vectors.value_length() as usize;
            if out.ids.is_empty() {
                out.dim = dim;
                out.vectors
                    .reserve(out.ids.capacity() * dim)
                    .map_err(StageError::io(&state))?;
            } else if dim != out.dim {
                return Err(StageError::data(
                    role,
                    Some(out.ids.len() + 1),
                    format!("mixes dimensions {} and {dim}", out.dim),
                ));
            }
            let values = vectors
                .values()
                .as_any()
                .downcast_ref::<Float32Array>()
                .expect("conformed");
            let start = vectors.value_offset(0) as usize;
            out.vectors
                .extend(&values.values()[start..start + vectors.len() * dim])
                .map_err(StageError::io(&state))?;
            out.ids
                .extend(ids.iter().map(|s| s.unwrap_or_default().to_string()));
        }
        out.vectors = out.vectors.finish().map_err(StageError::io(&state))?;
        Ok(out)
    }
}

impl SearchStage {
    async fn search(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let queries = Embeddings::read(ctx, "queries", u64::MAX).await?;
        let corpus_limit = self.config.corpus_in_memory_mb.saturating_mul(1 << 20);
        let corpus = Embeddings::read(ctx, "corpus", corpus_limit).await?;
        if !queries.ids.is_empty() && !corpus.ids.is_empty() && queries.dim != corpus.dim {
            return Err(StageError::data(
                "queries",
                None,
                format!(
                    "query embeddings have dimension {}, corpus embeddings {}: were they made by the same model?",
                    queries.dim, corpus.dim
                ),
            ));
        }
        let exclude = self.exclusions(&queries, &corpus);
        let mut options = SearchOptions {
            k: self.config.k,
            ..SearchOptions::default()
        };
        if let Some(t) = self.config.threads {
            options.threads = t;
        }
        let bar = ctx.progress(Some(queries.ids.len() as u64), "queries");
        let ranks = retrieval::id_ranks(&corpus.ids);
        let dim = queries.dim.max(corpus.dim);
        let progress = bar.clone();
        let (hits, queries, corpus) = blocking(move || {
            let hits = retrieval::search_with_progress(
                Vectors {
                    data: queries.vectors.as_slice(),
                    dim,
                },
                Vectors {
                    data: corpus.vectors.as_slice(),
                    dim,
                },
                &ranks,
                &exclude,
                options,
                &|n| progress.inc(n as u64),
            )?;
            Ok((hits, queries, corpus))
        })
        .await?;
        bar.finish_and_clear();
        ctx.set_stat("queries", queries.ids.len() as u64);
        ctx.set_stat("documents", corpus.ids.len() as u64);
        ctx.set_stat("corpus_mapped_bytes", corpus.vectors.mapped_bytes());
        write_runs(ctx, &queries.ids, &corpus.ids, &hits)
    }

    /// Per query, the document with the query's id when `exclude_self` drops it.
    fn exclusions(&self, queries: &Embeddings, corpus: &Embeddings) -> Vec<Option<u32>> {
        if !self.config.exclude_self {
            return Vec::new();
        }
        let index: HashMap<&str, u32> = corpus
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i as u32))
            .collect();
        queries
            .ids
            .iter()
            .map(|q| index.get(q.as_str()).copied())
            .collect()
    }
}

/// The `runs` table, 1,024 queries' hits per batch.
fn write_runs(
    ctx: &mut StageContext,
    queries: &[String],
    docs: &[String],
    hits: &[Vec<retrieval::Hit>],
) -> Result<(), StageError> {
    let schema = table::schema("runs")?.arrow();
    let mut writer = ctx.create_table("runs", schema.clone())?;
    for (chunk_queries, chunk_hits) in queries.chunks(1024).zip(hits.chunks(1024)) {
        let rows: Vec<(&str, &str, i32, f64)> = chunk_queries
            .iter()
            .zip(chunk_hits)
            .flat_map(|(q, hits)| {
                hits.iter().enumerate().map(|(rank, h)| {
                    (
                        q.as_str(),
                        docs[h.doc as usize].as_str(),
                        rank as i32 + 1,
                        f64::from(h.score),
                    )
                })
            })
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(rows.iter().map(|r| r.0)),
                columns::utf8(rows.iter().map(|r| r.1)),
                columns::int32(rows.iter().map(|r| r.2)),
                columns::float64(rows.iter().map(|r| r.3)),
            ],
        )
        .expect("columns follow the runs kind");
        writer.write(&batch)?;
    }
    ctx.finish_table(writer)
}
