//! The pipeline engine: binds a spec to stage kinds, orders stages, decides what is stale, runs
//! stages into atomically replaced output directories, and answers SQL over their tables.

mod fingerprint;
mod input;
mod lock;
mod plan;
mod progress;
mod query;
mod run;
pub mod stage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use input::InputStream;
pub use plan::{Assessment, StageState};
pub use query::{QueryError, query_session, read_only_sql};
pub use run::{RunOptions, RunSummary, Selection};
pub use stage::{
    BoundInput, ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext,
    StageError, StageKind, parse_config,
};

use crate::spec::{InputRef, PipelineSpec, SpecError, SpecErrorKind, SqlSource, StageSpec};
use crate::table::{MANIFEST_FILE, Manifest, TableError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("stage `{stage}` failed: {source}")]
    Stage {
        stage: String,
        source: Box<StageError>,
    },
    #[error("unknown stage `{name}` (stages: {known})")]
    UnknownStage { name: String, known: String },
    #[error("unknown table `{name}` (built tables: {known})")]
    UnknownTable { name: String, known: String },
    #[error(
        "stage `{stage}` needs input `{input}`, which has not been built: run stage `{input}` first"
    )]
    InputNotBuilt { stage: String, input: String },
    #[error("table `{table}` has not been built: run stage `{stage}` first")]
    TableNotBuilt { table: String, stage: String },
    #[error(
        "{}: the work directory is in use by {holder}; wait for it (or run with --wait)",
        path.display()
    )]
    Locked { path: PathBuf, holder: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PipelineError {
    /// The spec or the request is wrong (exit 2), rather than the work (exit 1).
    pub(crate) fn is_usage(&self) -> bool {
        match self {
            PipelineError::Spec(_)
            | PipelineError::UnknownStage { .. }
            | PipelineError::UnknownTable { .. }
            | PipelineError::InputNotBuilt { .. }
            | PipelineError::TableNotBuilt { .. }
            | PipelineError::Locked { .. } => true,
            PipelineError::Table(e) => e.is_usage(),
            PipelineError::Stage { source, .. } => source.is_usage(),
            PipelineError::Io { .. } => false,
        }
    }
}

/// The stage kinds a pipeline may use.
pub struct Registry {
    kinds: Vec<Box<dyn StageKind>>,
}

impl Registry {
    pub fn new(kinds: Vec<Box<dyn StageKind>>) -> Registry {
        Registry { kinds }
    }

    pub fn get(&self, kind: &str) -> Option<&dyn StageKind> {
        self.kinds.iter().find(|k| k.kind() == kind).map(|k| &**k)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &dyn StageKind> {
        self.kinds.iter().map(|k| &**k)
    }
}

/// One input of a planned stage, resolved to the table that feeds it.
#[derive(Debug, Clone)]
pub struct ResolvedInput {
    pub role: String,
    pub stage: String,
    pub table: String,
    pub kind: Option<&'static str>,
    pub filter: Option<(String, Option<PathBuf>)>,
}

/// A stage bound to its kind, with resolved inputs, outputs and files.
pub struct PlannedStage {
    pub spec: StageSpec,
    /// The stage kind's version (`StageKind::version`).
    pub kind_version: u32,
    pub stage: Box<dyn Stage>,
    pub inputs: Vec<ResolvedInput>,
    pub outputs: Vec<OutputDecl>,
    pub files: Vec<NamedFile>,
    pub dir: PathBuf,
}

impl PlannedStage {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn manifest(&self) -> Option<Manifest> {
        let path = self.dir.join(MANIFEST_FILE);
        path.exists().then(|| Manifest::read(&path).ok()).flatten()
    }
}

/// A validated pipeline: stages in dependency order, ready to assess and run.
pub struct Pipeline {
    pub spec: PipelineSpec,
    pub stages: Vec<PlannedStage>,
}

impl Pipeline {
    /// Loads and fully validates a spec against the registry's stage kinds.
    pub fn load(
        path: &Path,
        registry: &Registry,
        workdir: Option<&Path>,
    ) -> Result<Pipeline, PipelineError> {
        let mut spec = PipelineSpec::load(path)?;
        if let Some(w) = workdir {
            spec.workdir = w.to_path_buf();
        }
        Self::bind(spec, registry)
    }

    /// Validates a parsed spec against the registry's stage kinds.
    pub fn bind(spec: PipelineSpec, registry: &Registry) -> Result<Pipeline, PipelineError> {
        let err = |line: u64, kind: SpecErrorKind| SpecError::new(&spec.path, Some(line), kind);
        let mut bound: BTreeMap<String, Vec<OutputDecl>> = BTreeMap::new();
        let mut planned = Vec::new();

        for stage_spec in topological_order(&spec) {
            let kind = registry.get(&stage_spec.kind).ok_or_else(|| {
                err(
                    stage_spec.kind_line,
                    SpecErrorKind::UnknownKind {
                        stage: stage_spec.name.clone(),
                        kind: stage_spec.kind.clone(),
                        known: registry
                            .kinds()
                            .map(StageKind::kind)
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                )
            })?;
            let stage = kind
                .prepare(&stage_spec.config, &spec.base_dir)
                .map_err(|e| {
                    err(
                        spec.config_field_line(stage_spec, &e.field),
                        SpecErrorKind::Config {
                            stage: stage_spec.name.clone(),
                            field: e.field,
                            message: e.message,
                        },
                    )
                })?;
            let files = stage.files();
            for file in &files {
                if !file.path.exists() {
                    return Err(err(
                        spec.config_field_line(stage_spec, &file.field),
                        SpecErrorKind::MissingFile {
                            stage: stage_spec.name.clone(),
                            field: file.field.clone(),
                            path: file.path.clone(),
                        },
                    )
                    .into());
                }
            }
            let inputs = resolve_inputs(&spec, stage_spec, kind, &bound)?;
            let outputs = stage.outputs();
            bound.insert(stage_spec.name.clone(), outputs.clone());
            planned.push(PlannedStage {
                dir: spec.workdir.join(&stage_spec.name),
                spec: stage_spec.clone(),
                kind_version: kind.version(),
                stage,
                inputs,
                outputs,
                files,
            });
        }
        Ok(Pipeline {
            spec,
            stages: planned,
        })
    }

    pub fn workdir(&self) -> &Path {
        &self.spec.workdir
    }

    /// Each stage's note on its resumable state, for `status`.
    pub(crate) fn state_summaries(&self) -> Vec<(String, String)> {
        self.stages
            .iter()
            .filter_map(|stage| Some((stage.name().to_string(), self.state_summary(stage)?)))
            .collect()
    }

    /// A stage's note on its resumable state (a journal's answered and pending requests, what
    /// they cost and what the rest would), given the rows its built inputs have now.
    pub(crate) fn state_summary(&self, stage: &PlannedStage) -> Option<String> {
        let input_rows = stage
            .inputs
            .iter()
            .filter_map(|i| {
                self.stage(&i.stage)
                    .ok()?
                    .manifest()?
                    .tables
                    .get(&i.table)
                    .map(|t| t.rows)
            })
            .sum();
        stage
            .stage
            .state_summary(&self.state_dir(stage.name()), input_rows)
    }

    /// Where a stage keeps what must survive its failed runs (journals, checkpoints).
    pub(crate) fn state_dir(&self, stage: &str) -> PathBuf {
        self.spec.workdir.join(".state").join(stage)
    }

    pub fn stage(&self, name: &str) -> Result<&PlannedStage, PipelineError> {
        self.stages
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| PipelineError::UnknownStage {
                name: name.to_string(),
                known: self.stage_names().join(", "),
            })
    }

    pub(crate) fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(PlannedStage::name).collect()
    }

    /// `stage` and every stage that depends on it, directly or not.
    pub(crate) fn downstream_of(&self, name: &str) -> Vec<String> {
        let mut set = vec![name.to_string()];
        for stage in &self.stages {
            if stage.inputs.iter().any(|i| set.contains(&i.stage))
                && !set.iter().any(|s| s == stage.name())
            {
                set.push(stage.name().to_string());
            }
        }
        set
    }

    /// The Parquet file of a built table, `stage` (its primary table) or `stage.table`.
    pub(crate) fn table_path(&self, reference: &str) -> Result<PathBuf, PipelineError> {
        let (stage_name, table) = match reference.split_once('.') {
            Some((s, t)) => (s, Some(t)),
            None => (reference, None),
        };
        let stage = self.stage(stage_name)?;
        let table = match table {
            Some(t) => stage.outputs.iter().find(|o| o.name == t).ok_or_else(|| {
                PipelineError::UnknownTable {
                    name: reference.to_string(),
                    known: stage
                        .outputs
                        .iter()
                        .map(|o| format!("{stage_name}.{}", o.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?,
            None => &stage.outputs[0],
        };
        let path = stage.dir.join(format!("{}.parquet", table.name));
        if !path.exists() {
            return Err(PipelineError::TableNotBuilt {
                table: format!("{stage_name}.{}", table.name),
                stage: stage_name.to_string(),
            });
        }
        Ok(path)
    }
}

/// Stages ordered so that every stage comes after its inputs; ties keep spec order.
fn topological_order(spec: &PipelineSpec) -> Vec<&StageSpec> {
    let mut done: Vec<&str> = Vec::new();
    let mut order = Vec::new();
    while order.len() < spec.stages.len() {
        let next = spec
            .stages
            .iter()
            .find(|s| {
                !done.contains(&s.name.as_str())
                    && s.inputs.iter().all(|i| done.contains(&i.stage.as_str()))
            })
            .expect("the spec was checked for cycles");
        done.push(&next.name);
        order.push(next);
    }
    order
}

fn resolve_inputs(
    spec: &PipelineSpec,
    stage: &StageSpec,
    kind: &dyn StageKind,
    bound: &BTreeMap<String, Vec<OutputDecl>>,
) -> Result<Vec<ResolvedInput>, SpecError> {
    let resolver = InputResolver { spec, stage, kind };
    let mut resolved: Vec<ResolvedInput> = Vec::new();
    for input in &stage.inputs {
        let output = resolver.output(input, &bound[&input.stage])?;
        let role = resolver.role(input, output);
        if resolved.iter().any(|r| r.role == role) {
            return Err(resolver.error(
                input.line,
                format!(
                    "two inputs are bound to `{role}`; name the roles (`inputs: {{role: stage}}`)"
                ),
            ));
        }
        resolved.push(ResolvedInput {
            kind: resolver.role_kind(input, &role, output)?,
            role,
            stage: input.stage.clone(),
            table: output.name.clone(),
            filter: None,
        });
    }
    resolver.check_required(&resolved)?;
    resolver.attach_filters(&mut resolved)?;
    Ok(resolved)
}

/// Binds one stage's `inputs:` and `sql:` to roles of its kind, with errors at spec lines.
struct InputResolver<'a> {
    spec: &'a PipelineSpec,
    stage: &'a StageSpec,
    kind: &'a dyn StageKind,
}

impl InputResolver<'_> {
    fn error(&self, line: u64, message: String) -> SpecError {
        SpecError::new(
            &self.spec.path,
            Some(line),
            SpecErrorKind::Inputs {
                stage: self.stage.name.clone(),
                kind: self.stage.kind.clone(),
                message,
            },
        )
    }

    fn sql_error(&self, line: u64, message: String) -> SpecError {
        SpecError::new(
            &self.spec.path,
            Some(line),
            SpecErrorKind::Sql {
                stage: self.stage.name.clone(),
                message,
            },
        )
    }

    /// The table an input names: `stage.table`, or the stage's primary table.
    fn output<'o>(
        &self,
        input: &InputRef,
        outputs: &'o [OutputDecl],
    ) -> Result<&'o OutputDecl, SpecError> {
        let Some(t) = &input.table else {
            return Ok(&outputs[0]);
        };
        outputs.iter().find(|o| &o.name == t).ok_or_else(|| {
            SpecError::new(
                &self.spec.path,
                Some(input.line),
                SpecErrorKind::UnknownInputTable {
                    stage: self.stage.name.clone(),
                    target: input.stage.clone(),
                    table: t.clone(),
                    known: outputs
                        .iter()
                        .map(|o| o.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            )
        })
    }

    /// The role an input fills: named, else the table's kind (or, for kinds that take any
    /// table, the stage's name).
    fn role(&self, input: &InputRef, output: &OutputDecl) -> String {
        match (&input.role, self.kind.inputs()) {
            (Some(role), _) => role.clone(),
            (None, InputRoles::Any) => match &input.table {
                Some(t) => format!("{}_{t}", input.stage),
                None => input.stage.clone(),
            },
            (None, InputRoles::Fixed(_)) => output
                .kind
                .map(str::to_string)
                .unwrap_or_else(|| input.stage.clone()),
        }
    }

    /// The table kind the role requires, checked against the table bound to it.
    fn role_kind(
        &self,
        input: &InputRef,
        role: &str,
        output: &OutputDecl,
    ) -> Result<Option<&'static str>, SpecError> {
        let InputRoles::Fixed(roles) = self.kind.inputs() else {
            return Ok(output.kind);
        };
        let expected = roles.iter().find(|r| r.name == role).ok_or_else(|| {
            let message = match &input.role {
                Some(_) => format!(
                    "no input role `{role}` (it takes: {})",
                    describe_roles(roles)
                ),
                None => format!(
                    "input `{}` fills no role by its kind `{role}`; name the roles (it takes: {})",
                    input.stage,
                    describe_roles(roles)
                ),
            };
            self.error(input.line, message)
        })?;
        if let Some(want) = expected.kind
            && output.kind != Some(want)
        {
            return Err(self.error(
                input.line,
                format!(
                    "input `{role}` needs a table of kind `{want}`, but `{}.{}` is {}",
                    input.stage,
                    output.name,
                    output
                        .kind
                        .map_or("free-form".to_string(), |k| format!("of kind `{k}`"))
                ),
            ));
        }
        Ok(expected.kind)
    }

    fn check_required(&self, resolved: &[ResolvedInput]) -> Result<(), SpecError> {
        let InputRoles::Fixed(roles) = self.kind.inputs() else {
            return Ok(());
        };
        match roles
            .iter()
            .find(|role| role.required && !resolved.iter().any(|r| r.role == role.name))
        {
            Some(role) => Err(self.error(
                self.stage.line,
                format!(
                    "missing input `{}` (it takes: {})",
                    role.name,
                    describe_roles(roles)
                ),
            )),
            None => Ok(()),
        }
    }

    /// Attaches each `sql:` filter to the input it replaces, reading SQL files.
    fn attach_filters(&self, resolved: &mut [ResolvedInput]) -> Result<(), SpecError> {
        for filter in &self.stage.sql {
            let several = resolved.len() > 1;
            let target = match &filter.role {
                Some(role) => resolved.iter_mut().find(|r| &r.role == role),
                None if !several => resolved.first_mut(),
                None => {
                    return Err(self.sql_error(
                        filter.line,
                        "the stage has several inputs: give one query per input role (`sql: {role: SELECT ...}`)".to_string(),
                    ));
                }
            };
            let Some(target) = target else {
                return Err(self.sql_error(
                    filter.line,
                    format!(
                        "filters input `{}`, which the stage does not have",
                        filter.role.as_deref().unwrap_or("")
                    ),
                ));
            };
            target.filter = Some(match &filter.source {
                SqlSource::Inline(text) => (text.clone(), None),
                SqlSource::File(file) => {
                    let path = self.spec.resolve(file);
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        self.sql_error(
                            filter.line,
                            format!("cannot read `{}`: {e}", path.display()),
                        )
                    })?;
                    (text, Some(path))
                }
            });
        }
        Ok(())
    }
}

fn describe_roles(roles: &[InputRole]) -> String {
    roles
        .iter()
        .map(|r| {
            let kind = r
                .kind
                .map_or("any kind".to_string(), |k| format!("kind `{k}`"));
            let optional = if r.required { "" } else { ", optional" };
            format!("`{}` ({kind}{optional})", r.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
