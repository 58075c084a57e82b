//! The contract between the pipeline engine and a stage kind.
//!
//! A stage kind validates its config once (`prepare`), declares the tables it writes and the
//! files it depends on, and then runs as a function from input tables to output tables through a
//! [`StageContext`]. It never sees paths of other stages, manifests or fingerprints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use futures::future::BoxFuture;
use indicatif::ProgressBar;
use serde::de::DeserializeOwned;

use crate::table::{self, TableError, TableSchema, TableWriter, WrittenTable};

use super::input::InputStream;
use super::progress;

/// An input a stage kind expects, under a role name.
#[derive(Debug, Clone, Copy)]
pub struct InputRole {
    pub name: &'static str,
    /// The table kind the role requires; `None` accepts any table.
    pub kind: Option<&'static str>,
    pub required: bool,
}

/// What inputs a stage kind takes.
#[derive(Debug, Clone, Copy)]
pub enum InputRoles {
    /// These roles, each bound to one table.
    Fixed(&'static [InputRole]),
    /// Any number of tables, each under its own name (the `sql` stage).
    Any,
}

/// A table a stage writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputDecl {
    pub name: String,
    /// The table kind (schema) it must have; `None` for free-form tables.
    pub kind: Option<&'static str>,
}

impl OutputDecl {
    /// The table of a built-in kind, named after the kind.
    pub fn of_kind(kind: &'static str) -> OutputDecl {
        OutputDecl {
            name: kind.to_string(),
            kind: Some(kind),
        }
    }
}

/// A file a stage's output depends on (a template, a SQL file, a data file, model weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// The config field that names it, for error messages.
    pub field: String,
    pub path: PathBuf,
}

impl NamedFile {
    pub fn new(field: &str, path: PathBuf) -> NamedFile {
        NamedFile {
            field: field.to_string(),
            path,
        }
    }
}

/// A config problem, reported by field so the pipeline can point at the spec line.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Deserializes a stage's `config:` block into its typed form, reporting the failing field.
pub fn parse_config<T: DeserializeOwned>(config: &serde_json::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(config).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde names unknown and missing fields only in the message.
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let field = match (path.as_str(), named) {
            (".", Some(name)) => name,
            (".", None) => "config".to_string(),
            (p, _) => p.to_string(),
        };
        ConfigError::new(field, message)
    })
}

/// Why a stage failed. [`StageError::is_usage`] separates what the spec or its environment got
/// wrong (exit 2) from work that failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("SQL: {0}")]
    Sql(#[source] Box<DataFusionError>),
    /// A stage's SQL tried to write, configure or read outside its inputs.
    #[error("stage SQL is read-only: {0}")]
    SqlNotReadOnly(String),
    /// A malformed record in an input file, located by line or row.
    #[error(transparent)]
    Format(#[from] crate::formats::FormatError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Encoder(#[from] crate::encoder::EncoderError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Llm(#[from] crate::llm::LlmError),
    #[error(transparent)]
    Journal(#[from] crate::llm::JournalError),
    #[error(transparent)]
    Search(#[from] crate::retrieval::SearchError),
    /// The config asks for what this run cannot give (a variable that is not set, an input
    /// that is not bound), found only when the stage runs.
    #[error("`{field}`: {message}")]
    Config { field: String, message: String },
    /// A prompt template that does not compile, or does not render for a query.
    #[error(
        "{}template {}{}: {message}",
        query.as_ref().map(|q| format!("query `{q}`: ")).unwrap_or_default(),
        path.display(),
        line.map(|l| format!(":{l}")).unwrap_or_default()
    )]
    Template {
        path: PathBuf,
        line: Option<usize>,
        query: Option<String>,
        message: String,
    },
    /// Input rows the stage cannot work with.
    #[error("input `{input}`{}: {message}", row.map(|r| format!(" row {r}")).unwrap_or_default())]
    Data {
        input: String,
        /// 1-based, in the order the stage reads the input.
        row: Option<usize>,
        message: String,
    },
    /// Some LLM requests failed for good; the answered ones are journaled.
    #[error(
        "{failed} of {total} requests failed; the {} answered are journaled in {} and a rerun sends only the rest. First failure: {first}",
        total - failed,
        journal.display()
    )]
    RequestsFailed {
        failed: usize,
        total: usize,
        journal: PathBuf,
        first: String,
    },
    /// Requests written to a batch file wait to be run offline; the stage finishes once their
    /// answers are in the output file.
    #[error(
        "{written} requests wait in {}: run them offline (vLLM: python -m \
         vllm.entrypoints.openai.run_batch -i {} -o {} --model {model}), then run this stage \
         again{}",
        input.display(),
        input.display(),
        output.display(),
        if *failed > 0 { format!(" ({failed} results in the output failed and are asked again; the first: {first_failure})") } else { String::new() }
    )]
    BatchPending {
        written: usize,
        input: PathBuf,
        output: PathBuf,
        model: String,
        failed: usize,
        first_failure: String,
    },
    /// A stage kind broke its contract with the engine: a bug in synthrank, not in the spec.
    #[error("internal: {0}")]
    Contract(String),
}

impl From<DataFusionError> for StageError {
    fn from(e: DataFusionError) -> StageError {
        StageError::Sql(Box::new(e))
    }
}

impl StageError {
    /// The spec, its config or its environment is wrong (exit 2), rather than the work.
    pub fn is_usage(&self) -> bool {
        match self {
            StageError::Config { .. }
            | StageError::SqlNotReadOnly(_)
            | StageError::Template { .. } => true,
            StageError::Sql(e) => super::query::is_plan_error(e),
            StageError::Encoder(e) => e.is_usage(),
            StageError::Train(e) => e.is_usage(),
            StageError::Llm(e) => matches!(e, crate::llm::LlmError::Config(_)),
            _ => false,
        }
    }

    pub fn config(field: &str, message: impl Into<String>) -> StageError {
        StageError::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn data(input: &str, row: Option<usize>, message: impl Into<String>) -> StageError {
        StageError::Data {
            input: input.to_string(),
            row,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StageError {
        let path = path.into();
        move |source| StageError::Io { path, source }
    }
}

pub trait StageKind: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Part of every fingerprint of this kind: raised whenever what the kind writes for the
    /// same config and inputs changes, so outputs of older builds go stale.
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> InputRoles;
    /// Validates the config; paths in it resolve against `base_dir` (the spec's directory).
    fn prepare(
        &self,
        config: &serde_json::Value,
        base_dir: &Path,
    ) -> Result<Box<dyn Stage>, ConfigError>;
}

pub trait Stage: Send + Sync {
    /// The tables it writes; the first is its primary table (what `stage` alone refers to).
    fn outputs(&self) -> Vec<OutputDecl>;
    /// The files its output depends on; their content is part of its fingerprint.
    fn files(&self) -> Vec<NamedFile> {
        Vec::new()
    }
    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>>;
    /// A line for `status` about work kept in the stage's state directory (a journal's answered
    /// and pending requests, say); `input_rows` counts the rows of its inputs.
    fn state_summary(&self, _state_dir: &Path, _input_rows: u64) -> Option<String> {
        None
    }
    /// Called once the stage's output is committed: drops what its state directory kept only
    /// so that an interrupted run could resume (a finished training run's checkpoints).
    fn release_state(&self, _state_dir: &Path) {}
}

/// An input table as a running stage sees it.
#[derive(Debug, Clone)]
pub struct BoundInput {
    pub role: String,
    pub stage: String,
    pub table: String,
    pub path: PathBuf,
    pub kind: Option<&'static str>,
    /// SQL that replaces this input's rows (the stage's `sql:` filter).
    pub filter: Option<String>,
}

/// Everything a running stage may touch: its inputs, its output writers, progress and stats.
pub struct StageContext {
    stage: String,
    inputs: BTreeMap<String, BoundInput>,
    outputs: Vec<OutputDecl>,
    staging: PathBuf,
    state: PathBuf,
    written: Vec<WrittenTable>,
    stats: serde_json::Map<String, serde_json::Value>,
    session: Option<SessionContext>,
}

impl StageContext {
    pub(super) fn new(
        stage: &str,
        inputs: Vec<BoundInput>,
        outputs: Vec<OutputDecl>,
        staging: &Path,
        state: &Path,
    ) -> StageContext {
        StageContext {
            stage: stage.to_string(),
            inputs: inputs.into_iter().map(|i| (i.role.clone(), i)).collect(),
            outputs,
            staging: staging.to_path_buf(),
            state: state.to_path_buf(),
            written: Vec::new(),
            stats: serde_json::Map::new(),
            session: None,
        }
    }

    pub fn inputs(&self) -> impl Iterator<Item = &BoundInput> {
        self.inputs.values()
    }

    pub fn has_input(&self, role: &str) -> bool {
        self.inputs.contains_key(role)
    }

    /// A SQL session in which every input is registered under its role name (and, where that
    /// differs, under its stage name).
    pub async fn session(&mut self) -> Result<&SessionContext, StageError> {
        if self.session.is_none() {
            let ctx = SessionContext::new();
            for input in self.inputs.values() {
                let path = input.path.to_string_lossy().into_owned();
                ctx.register_parquet(&input.role, &path, ParquetReadOptions::default())
                    .await?;
                if input.stage != input.role && !self.inputs.contains_key(&input.stage) {
                    ctx.register_parquet(&input.stage, &path, ParquetReadOptions::default())
                        .await?;
                }
            }
            self.session = Some(ctx);
        }
        Ok(self.session.as_ref().expect("just set"))
    }

    /// A read-only query over the inputs (as `synthrank sql`: nothing else is read or written).
    pub async fn sql(&mut self, query: &str) -> Result<DataFrame, StageError> {
        let ctx = self.session().await?;
        let plan = ctx.state().create_logical_plan(query).await?;
        super::query::verify_read_only(&plan).map_err(StageError::SqlNotReadOnly)?;
        Ok(ctx.execute_logical_plan(plan).await?)
    }

    /// The input bound to `role` batch by batch, after the stage's `sql:` filter if it has
    /// one, conformed to the role's table kind.
    pub async fn stream_input(&mut self, role: &str) -> Result<InputStream, StageError> {
        let input = self
            .inputs
            .get(role)
            .cloned()
            .ok_or_else(|| StageError::Contract(format!("stage has no input `{role}`")))?;
        let kind = input.kind.map(table::schema).transpose()?;
        match &input.filter {
            None => InputStream::file(role, &input.path, kind),
            Some(query) => Ok(InputStream::sql(
                role,
                self.sql(query).await?.execute_stream().await?,
                kind,
            )),
        }
    }

    /// All rows of the input bound to `role`, as [`StageContext::stream_input`] reads them.
    pub async fn read_input(&mut self, role: &str) -> Result<Vec<RecordBatch>, StageError> {
        self.stream_input(role).await?.collect().await
    }

    /// The rows of the input bound to `role`, when known without reading it (no `sql:` filter).
    pub fn input_rows(&self, role: &str) -> Option<u64> {
        let input = self.inputs.get(role)?;
        match input.filter {
            None => table::file_rows(&input.path),
            Some(_) => None,
        }
    }

    /// The counters (`stats`) of the stage that built the input bound to `role`, from the
    /// manifest beside its table: what that stage did as a whole, whatever `sql:` filters here.
    pub fn input_stats(
        &self,
        role: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, StageError> {
        let input = self
            .inputs
            .get(role)
            .ok_or_else(|| StageError::Contract(format!("stage has no input `{role}`")))?;
        let manifest = input.path.with_file_name(table::MANIFEST_FILE);
        Ok(table::Manifest::read(&manifest)?.stats)
    }

    /// A writer for the declared output table `name`.
    pub fn create_table(&self, name: &str, schema: SchemaRef) -> Result<TableWriter, StageError> {
        let decl = self
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| {
                StageError::Contract(format!("stage declares no output table `{name}`"))
            })?;
        let kind: Option<&'static TableSchema> = decl.kind.map(table::schema).transpose()?;
        let path = self.staging.join(format!("{name}.parquet"));
        Ok(TableWriter::create(name, kind, schema, &path)?)
    }

    pub fn finish_table(&mut self, writer: TableWriter) -> Result<(), StageError> {
        self.written.push(writer.finish()?);
        Ok(())
    }

    /// Writes a whole output table from batches (which may be empty: the schema is given).
    pub fn write_table(
        &mut self,
        name: &str,
        schema: SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<(), StageError> {
        let mut writer = self.create_table(name, schema)?;
        for batch in batches {
            writer.write(batch)?;
        }
        self.finish_table(writer)
    }

    /// A path in the stage's output directory for a file that is not a table (a report, a
    /// plot); it is replaced atomically together with the tables.
    pub fn output_path(&self, relative: &str) -> Result<PathBuf, StageError> {
        let path = self.staging.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(StageError::io(parent))?;
        }
        Ok(path)
    }

    /// A directory that survives failed and repeated runs of this stage (not replaced
    /// atomically, not part of its output): for journals and checkpoints that let work resume.
    pub fn state_dir(&self) -> Result<&Path, StageError> {
        std::fs::create_dir_all(&self.state).map_err(StageError::io(&self.state))?;
        Ok(&self.state)
    }

    /// Where [`StageContext::state_dir`] is, without making it: for work that may not need it.
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// A progress bar for this stage (hidden when stderr is not a terminal).
    pub fn progress(&self, total: Option<u64>, unit: &str) -> ProgressBar {
        progress::bar(&self.stage, total, unit)
    }

    pub fn set_stat(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.stats.insert(key.to_string(), value.into());
    }

    pub(super) fn into_results(
        self,
    ) -> (
        Vec<WrittenTable>,
        serde_json::Map<String, serde_json::Value>,
    ) {
        (self.written, self.stats)
    }
}
