//! `sql`: any query over the stage's inputs, registered under their names, becomes a table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::pipeline::{
    ConfigError, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError, StageKind,
    parse_config,
};
use crate::spec::clean_path;
use crate::table::{self, TableError};

pub(crate) struct SqlStage;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A `.sql` file (relative to the spec) ...
    #[serde(default)]
    file: Option<PathBuf>,
    /// ... or the query itself.
    #[serde(default)]
    query: Option<String>,
    /// The table kind the result must have (and is cast to), so downstream stages can take it
    /// as, say, `queries`. Without it the result is a free-form table.
    #[serde(default)]
    schema: Option<String>,
}

impl StageKind for SqlStage {
    fn kind(&self) -> &'static str {
        "sql"
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Any
    }
    fn prepare(
        &self,
        config: &serde_json::Value,
        base_dir: &Path,
    ) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        let kind: Option<&'static str> = config
            .schema
            .as_deref()
            .map(|k| table::schema(k).map(|s| s.kind.as_str()))
            .transpose()
            .map_err(|e| ConfigError::new("schema", e.to_string()))?;
        let query = match (&config.file, &config.query) {
            (Some(file), None) => Query::File(clean_path(&base_dir.join(file))),
            (None, Some(text)) => Query::Inline(text.clone()),
            _ => {
                return Err(ConfigError::new(
                    "query",
                    "give exactly one of `file` and `query`",
                ));
            }
        };
        Ok(Box::new(SqlQuery { kind, query }))
    }
}

enum Query {
    File(PathBuf),
    Inline(String),
}

struct SqlQuery {
    kind: Option<&'static str>,
    query: Query,
}

impl Stage for SqlQuery {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl {
            name: self.kind.unwrap_or("result").to_string(),
            kind: self.kind,
        }]
    }

    fn files(&self) -> Vec<NamedFile> {
        match &self.query {
            Query::File(path) => vec![NamedFile::new("file", path.clone())],
            Query::Inline(_) => Vec::new(),
        }
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.execute(ctx))
    }
}

impl SqlQuery {
    async fn execute(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let text = match &self.query {
            Query::File(path) => std::fs::read_to_string(path).map_err(StageError::io(path))?,
            Query::Inline(text) => text.clone(),
        };
        let frame = ctx.sql(&text).await?;
        let frame_schema = frame.schema().as_arrow().clone();
        let kind = self.kind.map(table::schema).transpose()?;
        let name = self.outputs().remove(0).name;
        let mut stream = frame.execute_stream().await?;
        // The writer is made from the first conformed batch: a vector column's dimension is
        // only known from the data.
        let mut writer = None;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let batch = match kind {
                Some(k) => k
                    .conform(&batch)
                    .map_err(|problem| TableError::SchemaMismatch {
                        table: name.clone(),
                        kind: k.kind.clone(),
                        problem,
                    })?,
                None => batch,
            };
            if writer.is_none() {
                writer = Some(ctx.create_table(&name, batch.schema())?);
            }
            writer.as_mut().expect("just made").write(&batch)?;
        }
        let writer = match writer {
            Some(w) => w,
            None => {
                let schema = match kind {
                    Some(k) => k.arrow_with_dim(Some(0)),
                    None => Arc::new(frame_schema),
                };
                ctx.create_table(&name, schema)?
            }
        };
        ctx.finish_table(writer)
    }
}
