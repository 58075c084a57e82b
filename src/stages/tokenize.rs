//! `tokenize`: training lists + query texts -> token ids with the model's tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::array::{RecordBatch, StringArray};
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::encoder::TextTokenizer;
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::table::{self, columns};

pub(crate) struct Tokenize;

const INPUTS: &[InputRole] = &[
    InputRole {
        name: "groups",
        kind: Some("groups"),
        required: true,
    },
    InputRole {
        name: "queries",
        kind: Some("queries"),
        required: true,
    },
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A model directory with tokenizer.json (or the tokenizer.json itself).
    model: String,
    #[serde(default = "default_query_len")]
    max_query_len: usize,
    #[serde(default = "default_passage_len")]
    max_passage_len: usize,
    /// Prepended to every query (e.g. "query: " for E5-style models).
    #[serde(default)]
    query_prefix: String,
    /// Prepended to every passage.
    #[serde(default)]
    passage_prefix: String,
}

fn default_query_len() -> usize {
    64
}
fn default_passage_len() -> usize {
    256
}

impl StageKind for Tokenize {
    fn kind(&self) -> &'static str {
        "tokenize"
    }
    /// 2: the `epoch` column.
    fn version(&self) -> u32 {
        2
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Fixed(INPUTS)
    }
    fn prepare(
        &self,
        config: &serde_json::Value,
        base_dir: &Path,
    ) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        for (field, len) in [
            ("max_query_len", config.max_query_len),
            ("max_passage_len", config.max_passage_len),
        ] {
            if len < 2 {
                return Err(ConfigError::new(
                    field,
                    "must leave room for the special tokens (>= 2)",
                ));
            }
        }
        let path = clean_path(&base_dir.join(&config.model));
        let tokenizer = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path
        };
        Ok(Box::new(TokenizeStage { config, tokenizer }))
    }
}

struct TokenizeStage {
    config: Config,
    tokenizer: PathBuf,
}

impl Stage for TokenizeStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("tokens")]
    }

    fn files(&self) -> Vec<NamedFile> {
        vec![NamedFile::new("model", self.tokenizer.clone())]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.tokenize(ctx))
    }
}

/// The text a passage is encoded from, as sentence-transformers and BEIR join them.
pub(crate) fn passage_text(title: &str, text: &str) -> String {
    format!("{title} {text}").trim().to_string()
}

impl TokenizeStage {
    async fn tokenize(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut tokenizer = TextTokenizer::from_file(&self.tokenizer)?;
        let mut query_text = HashMap::new();
        for batch in ctx.read_input("queries").await? {
            let ids = columns::get::<StringArray>(&batch, "query_id");
            let texts = columns::get::<StringArray>(&batch, "text");
            for i in 0..batch.num_rows() {
                query_text.insert(ids.value(i).to_string(), texts.value(i).to_string());
            }
        }
        let c = &self.config;
        let mut query_tokens: HashMap<String, Vec<u32>> = HashMap::new();
        let schema = table::schema("tokens")?.arrow();
        let mut writer = ctx.create_table("tokens", schema.clone())?;
        let groups = ctx.read_input("groups").await?;
        let total: usize = groups.iter().map(RecordBatch::num_rows).sum();
        let bar = ctx.progress(Some(total as u64), "passages");
        let mut rows_before = 0;
        for batch in &groups {
            let q = columns::get::<StringArray>(batch, "query_id");
            let titles = columns::get::<StringArray>(batch, "title");
            let texts = columns::get::<StringArray>(batch, "text");
            for i in 0..batch.num_rows() {
                let id = q.value(i);
                if query_tokens.contains_key(id) {
                    continue;
                }
                let text = query_text.get(id).ok_or_else(|| {
                    StageError::data(
                        "groups",
                        Some(rows_before + i + 1),
                        format!("query `{id}` is not in input `queries`"),
                    )
                })?;
                let ids = tokenizer
                    .encode_batch(&[&format!("{}{text}", c.query_prefix)], c.max_query_len)?;
                query_tokens.insert(id.to_string(), ids.into_iter().next().unwrap_or_default());
            }
            let passages: Vec<String> = (0..batch.num_rows())
                .map(|i| {
                    format!(
                        "{}{}",
                        c.passage_prefix,
                        passage_text(titles.value(i), texts.value(i))
                    )
                })
                .collect();
            let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
            let passage_ids = tokenizer.encode_batch(&refs, c.max_passage_len)?;
            let out = RecordBatch::try_new(
                schema.clone(),
                vec![
                    batch.column_by_name("query_id").expect("conformed").clone(),
                    batch.column_by_name("epoch").expect("conformed").clone(),
                    batch.column_by_name("position").expect("conformed").clone(),
                    batch.column_by_name("doc_id").expect("conformed").clone(),
                    batch.column_by_name("label").expect("conformed").clone(),
                    columns::tokens(
                        (0..batch.num_rows()).map(|i| query_tokens[q.value(i)].as_slice()),
                    ),
                    columns::tokens(passage_ids.iter().map(Vec::as_slice)),
                ],
            )
            .expect("columns follow the tokens kind");
            writer.write(&out)?;
            bar.inc(batch.num_rows() as u64);
            rows_before += batch.num_rows();
        }
        bar.finish_and_clear();
        ctx.set_stat("queries", query_tokens.len() as u64);
        ctx.finish_table(writer)
    }
}
