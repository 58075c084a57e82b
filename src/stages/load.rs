//! `load_queries`, `load_corpus`, `load_qrels`: read IR data files into tables.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, StringArray};
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;
use rand::SeedableRng;
use serde::Deserialize;

use crate::formats::{self, FormatError, Header, Row, Rows};
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::table::{self, TableWriter, columns};

const BATCH_ROWS: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Format {
    /// BEIR: JSON lines for queries and corpus, `query-id corpus-id score` TSV for qrels.
    Beir,
    /// Tab-separated `id<TAB>text` (MS MARCO queries and collection).
    Tsv,
    /// TREC topics (queries) or TREC qrels.
    Trec,
    Parquet,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    n: usize,
    seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadConfig {
    /// A file, or a BEIR dataset directory (queries.jsonl, corpus.jsonl, qrels/SPLIT.tsv).
    path: PathBuf,
    #[serde(default)]
    format: Option<Format>,
    /// qrels: which `qrels/SPLIT.tsv` of a BEIR directory; queries: keep only queries judged in
    /// that split.
    #[serde(default)]
    split: Option<String>,
    /// queries: keep only queries judged in this qrels file (instead of a BEIR split).
    #[serde(default)]
    qrels: Option<PathBuf>,
    /// Keep a seeded uniform sample of `n` rows (in file order).
    #[serde(default)]
    sample: Option<Sample>,
    /// Parquet: source column name for each table column, where they differ.
    #[serde(default)]
    columns: BTreeMap<String, String>,
    /// TREC topics: which section is the query text (`title`, `desc`, `narr`).
    #[serde(default = "default_topic_field")]
    topic_field: String,
}

fn default_topic_field() -> String {
    "title".to_string()
}

/// What distinguishes the three loaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Queries,
    Corpus,
    Qrels,
}

impl Target {
    fn kind(self) -> &'static str {
        match self {
            Target::Queries => "queries",
            Target::Corpus => "corpus",
            Target::Qrels => "qrels",
        }
    }

    fn beir_file(self, split: Option<&str>) -> PathBuf {
        match self {
            Target::Queries => PathBuf::from("queries.jsonl"),
            Target::Corpus => PathBuf::from("corpus.jsonl"),
            Target::Qrels => Path::new("qrels").join(format!("{}.tsv", split.unwrap_or("test"))),
        }
    }

    /// How many leading fields make a row's unique key.
    fn key_len(self) -> usize {
        match self {
            Target::Qrels => 2,
            _ => 1,
        }
    }
}

pub(crate) struct LoadQueries;
pub(crate) struct LoadCorpus;
pub(crate) struct LoadQrels;

const QRELS_INPUTS: &[InputRole] = &[
    InputRole {
        name: "queries",
        kind: Some("queries"),
        required: false,
    },
    InputRole {
        name: "corpus",
        kind: Some("corpus"),
        required: false,
    },
];

macro_rules! loader_kind {
    ($ty:ident, $target:expr, $name:literal, $inputs:expr) => {
        impl StageKind for $ty {
            fn kind(&self) -> &'static str {
                $name
            }
            fn inputs(&self) -> InputRoles {
                InputRoles::Fixed($inputs)
            }
            fn prepare(
                &self,
                config: &serde_json::Value,
                base_dir: &Path,
            ) -> Result<Box<dyn Stage>, ConfigError> {
                Ok(Box::new(Loader::new(
                    $target,
                    parse_config(config)?,
                    base_dir,
                )?))
            }
        }
    };
}

loader_kind!(LoadQueries, Target::Queries, "load_queries", &[]);
loader_kind!(LoadCorpus, Target::Corpus, "load_corpus", &[]);
loader_kind!(LoadQrels, Target::Qrels, "load_qrels", QRELS_INPUTS);

struct Loader {
    target: Target,
    config: LoadConfig,
    file: PathBuf,
    format: Format,
    /// Qrels whose query ids select the queries to keep (load_queries with a split).
    judged_by: Option<PathBuf>,
}

impl Loader {
    fn new(target: Target, config: LoadConfig, base_dir: &Path) -> Result<Loader, ConfigError> {
        let path = clean_path(&base_dir.join(&config.path));
        if !path.exists() {
            return Err(ConfigError::new(
                "path",
                format!("file `{}` does not exist", path.display()),
            ));
        }
        let is_dir = path.is_dir();
        let file = if is_dir {
            path.join(target.beir_file(config.split.as_deref()))
        } else {
            path.clone()
        };
        let format = match config.format {
            Some(f) => f,
            None if is_dir => Format::Beir,
            None => detect_format(target, &file),
        };
        if target == Target::Corpus && format == Format::Trec {
            return Err(ConfigError::new(
                "format",
                "a corpus cannot be read in `trec` format (use beir, tsv or parquet)",
            ));
        }
        if target != Target::Qrels && config.split.is_some() && config.qrels.is_some() {
            return Err(ConfigError::new(
                "qrels",
                "give either `split` or `qrels`, not both",
            ));
        }
        if target == Target::Qrels && config.qrels.is_some() {
            return Err(ConfigError::new(
                "qrels",
                "load_qrels reads `path`; `qrels` is for load_queries",
            ));
        }
        if target == Target::Qrels && config.split.is_some() && !is_dir {
            return Err(ConfigError::new(
                "split",
                "`split` selects qrels/SPLIT.tsv of a BEIR directory; `path` is a file",
            ));
        }
        if let Some(sample) = config.sample
            && sample.n == 0
        {
            return Err(ConfigError::new("sample", "`n` must be at least 1"));
        }
        let judged_by = match (target, &config.split, &config.qrels) {
            (Target::Queries, _, Some(q)) => Some(clean_path(&base_dir.join(q))),
            (Target::Queries, Some(split), None) if is_dir => {
                Some(path.join(Target::Qrels.beir_file(Some(split))))
            }
            (Target::Queries, Some(_), None) => {
                return Err(ConfigError::new(
                    "split",
                    "`split` needs `path` to be a BEIR directory; name a qrels file with `qrels` instead",
                ));
            }
            _ => None,
        };
        Ok(Loader {
            target,
            config,
            file,
            format,
            judged_by,
        })
    }

    fn rows(&self) -> Result<Rows, FormatError> {
        rows_of(self.target, self.format, &self.file, &self.config)
    }
}

const HEAD_BYTES: usize = 4096;

fn detect_format(target: Target, file: &Path) -> Format {
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "parquet" => return Format::Parquet,
        "jsonl" | "json" => return Format::Beir,
        _ => {}
    }
    // The first 4 KiB decide: never the whole file (a corpus can be gigabytes).
    let mut bytes = Vec::with_capacity(HEAD_BYTES);
    if let Ok(f) = std::fs::File::open(file) {
        let _ =
            std::io::Read::read_to_end(&mut std::io::Read::take(f, HEAD_BYTES as u64), &mut bytes);
    }
    let head = String::from_utf8_lossy(&bytes).into_owned();
    let first = head.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    match target {
        Target::Queries if head.contains("<top>") => Format::Trec,
        Target::Qrels if formats::is_trec_qrels_line(first) => Format::Trec,
        Target::Qrels => Format::Beir,
        _ => Format::Tsv,
    }
}

/// Rows of a source file, normalized to the table kind's column order (all as strings).
fn rows_of(
    target: Target,
    format: Format,
    file: &Path,
    config: &LoadConfig,
) -> Result<Rows, FormatError> {
    let kind = table::schema(target.kind()).expect("built-in kind");
    Ok(match (target, format) {
        (Target::Queries, Format::Beir) => formats::beir_jsonl(file, &["_id", "text"], &[])?,
        (Target::Corpus, Format::Beir) => {
            formats::beir_jsonl(file, &["_id", "title", "text"], &["title"])?
        }
        (Target::Qrels, Format::Beir) => formats::tsv(file, 3, Header::IfLastFieldNotNumeric)?,
        (Target::Queries, Format::Tsv) => formats::tsv(file, 2, Header::No)?,
        (Target::Corpus, Format::Tsv) => Box::new(formats::tsv(file, 2, Header::No)?.map(|row| {
            row.map(|mut r| {
                r.fields.insert(1, String::new());
                r
            })
        })),
        (Target::Qrels, Format::Tsv) => formats::tsv(file, 3, Header::IfLastFieldNotNumeric)?,
        (Target::Queries, Format::Trec) => formats::trec_topics(file, &config.topic_field)?,
        (Target::Qrels, Format::Trec) => formats::trec_qrels(file)?,
        (Target::Corpus, Format::Trec) => unreachable!("refused in prepare"),
        (_, Format::Parquet) => {
            let source = |name: &str| {
                config
                    .columns
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| name.to_string())
            };
            let columns: Vec<String> = kind.columns.iter().map(|c| source(&c.name)).collect();
            let optional: Vec<String> = if target == Target::Corpus {
                vec![source("title")]
            } else {
                vec![]
            };
            formats::parquet_rows(file, &columns, &optional)?
        }
    })
}

impl Stage for Loader {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl {
            name: self.target.kind().to_string(),
            kind: Some(self.target.kind()),
        }]
    }

    fn files(&self) -> Vec<NamedFile> {
        let mut files = vec![NamedFile::new("path", self.file.clone())];
        if let Some(q) = &self.judged_by {
            let field = if self.config.qrels.is_some() {
                "qrels"
            } else {
                "split"
            };
            files.push(NamedFile {
                field: field.to_string(),
                path: q.clone(),
            });
        }
        files
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.load(ctx))
    }
}

impl Loader {
    async fn load(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let keep = self.judged_queries()?;
        let known_queries = self.known_ids(ctx, "queries", "query_id").await?;
        let known_docs = self.known_ids(ctx, "corpus", "doc_id").await?;
        let references = [(0, "query", known_queries), (1, "document", known_docs)];

        // Pass 1 validates every row and counts those kept; with sampling, pass 2 writes the
        // chosen ones. Both stream, so memory stays bounded by the id sets.
        let bar = ctx.progress(None, "rows");
        let mut seen: HashMap<String, formats::Position> = HashMap::new();
        let mut kept = 0usize;
        let kind = table::schema(self.target.kind())?;
        let mut writer = match self.config.sample {
            None => Some(ctx.create_table(self.target.kind(), kind.arrow())?),
            Some(_) => None,
        };
        let mut pending: Vec<Row> = Vec::with_capacity(BATCH_ROWS);
        for row in self.rows()? {
            let row = row?;
            bar.inc(1);
            self.validate(&row, &mut seen)?;
            for (field, what, known) in &references {
                if let Some(known) = known
                    && !known.contains(&row.fields[*field])
                {
                    return Err(FormatError::record(
                        &self.file,
                        row.at,
                        format!(
                            "{what} id `{}` is not in input `{}`",
                            row.fields[*field],
                            if *field == 0 { "queries" } else { "corpus" }
                        ),
                    )
                    .into());
                }
            }
            if keep.as_ref().is_some_and(|k| !k.contains(&row.fields[0])) {
                continue;
            }
            kept += 1;
            if let Some(w) = writer.as_mut() {
                pending.push(row);
                if pending.len() == BATCH_ROWS {
                    w.write(&self.batch(&std::mem::take(&mut pending))?)?;
                }
            }
        }
        bar.finish_and_clear();

        if let Some(sample) = self.config.sample {
            let mut w = ctx.create_table(self.target.kind(), kind.arrow())?;
            self.write_sample(
                &mut w,
                &mut pending,
                &sample_indices(kept, sample),
                keep.as_ref(),
            )?;
            writer = Some(w);
            ctx.set_stat("sampled_from", kept as u64);
        }
        let mut w = writer.expect("a writer in either mode");
        if !pending.is_empty() {
            w.write(&self.batch(&pending)?)?;
        }
        ctx.finish_table(w)
    }

    /// The queries judged in the qrels file that `split`/`qrels` names, when one does.
    fn judged_queries(&self) -> Result<Option<HashSet<String>>, StageError> {
        let Some(qrels) = &self.judged_by else {
            return Ok(None);
        };
        let rows = match detect_format(Target::Qrels, qrels) {
            Format::Parquet => rows_of(Target::Qrels, Format::Parquet, qrels, &self.config)?,
            _ => formats::qrels(qrels)?,
        };
        Ok(Some(
            rows.map(|r| r.map(|r| r.fields[0].clone()))
                .collect::<Result<HashSet<_>, _>>()?,
        ))
    }

    /// The second pass of a sampled load: the rows at the `chosen` indices among those kept,
    /// in file order (the last partial batch stays in `pending`).
    fn write_sample(
        &self,
        w: &mut TableWriter,
        pending: &mut Vec<Row>,
        chosen: &[usize],
        keep: Option<&HashSet<String>>,
    ) -> Result<(), StageError> {
        let mut index = 0usize;
        let mut next = chosen.iter().peekable();
        for row in self.rows()? {
            let row = row?;
            if keep.is_some_and(|k| !k.contains(&row.fields[0])) {
                continue;
            }
            if next.peek() == Some(&&index) {
                next.next();
                pending.push(row);
                if pending.len() == BATCH_ROWS {
                    w.write(&self.batch(&std::mem::take(pending))?)?;
                }
            }
            index += 1;
        }
        Ok(())
    }

    fn validate(
        &self,
        row: &Row,
        seen: &mut HashMap<String, formats::Position>,
    ) -> Result<(), StageError> {
        let key_len = self.target.key_len();
        if let Some(i) = row.fields[..key_len]
            .iter()
            .position(|f| f.trim().is_empty())
        {
            let column = &table::schema(self.target.kind())?.columns[i].name;
            return Err(
                FormatError::record(&self.file, row.at, format!("empty `{column}`")).into(),
            );
        }
        let key = row.fields[..key_len].join("\u{1f}");
        if let Some(first) = seen.insert(key, row.at) {
            let what = match self.target {
                Target::Queries => format!("duplicate query id `{}`", row.fields[0]),
                Target::Corpus => format!("duplicate document id `{}`", row.fields[0]),
                Target::Qrels => format!(
                    "duplicate judgment for query `{}`, document `{}`",
                    row.fields[0], row.fields[1]
                ),
            };
            return Err(FormatError::record(
                &self.file,
                row.at,
                format!("{what} (first at {first})"),
            )
            .into());
        }
        Ok(())
    }

    /// The ids of an optional input table, to check references against.
    async fn known_ids(
        &self,
        ctx: &mut StageContext,
        role: &str,
        column: &str,
    ) -> Result<Option<HashSet<String>>, StageError> {
        if !ctx.has_input(role) {
            return Ok(None);
        }
        // Batch by batch: the set holds the ids, never the texts beside them.
        let mut ids = HashSet::new();
        let mut input = ctx.stream_input(role).await?;
        while let Some(batch) = input.next().await? {
            let array = columns::get::<StringArray>(&batch, column);
            ids.extend(array.iter().flatten().map(str::to_string));
        }
        Ok(Some(ids))
    }

    fn batch(&self, rows: &[Row]) -> Result<RecordBatch, StageError> {
        let kind = table::schema(self.target.kind())?;
        let columns = kind
            .columns
            .iter()
            .enumerate()
            .map(|(i, column)| -> Result<ArrayRef, StageError> {
                Ok(match column.data_type {
                    table::schema::ColumnType::Int32 => Arc::new(
                        rows.iter()
                            .map(|r| {
                                r.fields[i].trim().parse::<i32>().map_err(|_| {
                                    FormatError::record(
                                        &self.file,
                                        r.at,
                                        format!(
                                            "`{}` must be an integer, found `{}`",
                                            column.name, r.fields[i]
                                        ),
                                    )
                                })
                            })
                            .collect::<Result<Int32Array, _>>()?,
                    ),
                    _ => columns::utf8(rows.iter().map(|r| r.fields[i].as_str())),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(kind.arrow(), columns).expect("columns follow the kind"))
    }
}

/// A seeded uniform sample of `sample.n` of `len` indices, ascending. ChaCha8 is specified
/// bit for bit, so the same seed picks the same rows on every platform.
fn sample_indices(len: usize, sample: Sample) -> Vec<usize> {
    if sample.n >= len {
        return (0..len).collect();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sample.seed);
    let mut chosen = rand::seq::index::sample(&mut rng, len, sample.n).into_vec();
    chosen.sort_unstable();
    chosen
}
