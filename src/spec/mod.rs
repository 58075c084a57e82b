//! Pipeline specs: the YAML a user writes, parsed into typed values that remember the line each
//! came from, so that every later validation error can point at the file and line.

mod error;
mod lines;
mod raw;
mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use error::{SpecError, SpecErrorKind};
pub use lines::FieldLines;

/// A parsed, structurally valid pipeline spec. Stage-kind-specific checks (config fields, input
/// roles, named files) are made by the pipeline layer, which knows the stage kinds.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// The spec file.
    pub path: PathBuf,
    /// Directory relative paths in the spec are resolved against (the spec file's directory).
    pub base_dir: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub workdir: PathBuf,
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub line: u64,
    pub kind: String,
    pub kind_line: u64,
    pub inputs: Vec<InputRef>,
    /// SQL filters over the stage's inputs, keyed by the input role they replace (`None`: the
    /// stage's only input).
    pub sql: Vec<SqlFilter>,
    pub config: serde_json::Value,
    pub config_line: u64,
    /// Where each key of `config:` is, for config errors reported by field path.
    pub config_lines: FieldLines,
}

/// One input of a stage: the table `stage[.table]`, under an explicit role or (list form) under
/// the role its table kind implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    pub role: Option<String>,
    pub stage: String,
    pub table: Option<String>,
    pub line: u64,
}

#[derive(Debug, Clone)]
pub struct SqlFilter {
    pub role: Option<String>,
    pub source: SqlSource,
    pub line: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlSource {
    Inline(String),
    File(PathBuf),
}

/// Names that would collide with SQL schemas DataFusion defines.
const RESERVED_STAGE_NAMES: &[&str] = &["public", "information_schema", "datafusion"];

impl PipelineSpec {
    pub fn load(path: &Path) -> Result<PipelineSpec, SpecError> {
        Self::load_with_vars(path, &[])
    }

    /// Loads a spec with some of its `vars:` replaced (`NAME=VALUE`, VALUE read as YAML).
    pub(crate) fn load_with_vars(
        path: &Path,
        overrides: &[(String, String)],
    ) -> Result<PipelineSpec, SpecError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| SpecError::new(path, None, SpecErrorKind::Io(e)))?;
        Self::parse_with_vars(path, &source, overrides)
    }

    /// Parses spec text as if read from `path` (relative paths resolve against its directory).
    fn parse_with_vars(
        path: &Path,
        source: &str,
        overrides: &[(String, String)],
    ) -> Result<PipelineSpec, SpecError> {
        let raw = raw::parse(path, source)?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let err = |line: u64, kind: SpecErrorKind| SpecError::new(path, Some(line), kind);

        if !is_valid_pipeline_name(&raw.name.value) {
            return Err(err(
                raw.name.referenced.line(),
                SpecErrorKind::BadPipelineName(raw.name.value.clone()),
            ));
        }
        let (vars_line, declared) = match raw.vars {
            Some(v) => (v.referenced.line(), v.value),
            None => (raw.name.referenced.line(), BTreeMap::new()),
        };
        let vars_error = |message: String| err(vars_line, SpecErrorKind::Vars(message));
        let mut vars = template::Vars::new(declared).map_err(vars_error)?;
        vars.override_with(overrides).map_err(vars_error)?;
        let top = vars.scope(BTreeMap::new());
        let workdir = match &raw.workdir {
            Some(w) => clean_path(
                &base_dir.join(
                    top.string(&w.value)
                        .map_err(|m| err(w.referenced.line(), SpecErrorKind::Vars(m)))?,
                ),
            ),
            None => base_dir.join("work").join(&raw.name.value),
        };

        let mut stages: Vec<StageSpec> = Vec::with_capacity(raw.stages.len());
        let mut first_line: BTreeMap<String, u64> = BTreeMap::new();
        for raw_stage in &raw.stages {
            for stage in expand_stage(raw_stage, &vars, &err)? {
                if let Some(first) = first_line.insert(stage.name.clone(), stage.line) {
                    return Err(err(
                        stage.line,
                        SpecErrorKind::DuplicateStage {
                            name: stage.name,
                            first,
                        },
                    ));
                }
                stages.push(stage);
            }
        }

        // Input references must name stages of this pipeline.
        for stage in &stages {
            for input in &stage.inputs {
                if !first_line.contains_key(&input.stage) {
                    return Err(err(
                        input.line,
                        SpecErrorKind::UnknownInput {
                            stage: stage.name.clone(),
                            target: input.stage.clone(),
                            known: first_line.keys().cloned().collect::<Vec<_>>().join(", "),
                        },
                    ));
                }
            }
        }

        let spec = PipelineSpec {
            path: path.to_path_buf(),
            base_dir,
            name: raw.name.value,
            description: raw.description,
            workdir,
            stages,
        };
        spec.check_acyclic()?;
        Ok(spec)
    }

    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Resolves a path written in the spec (relative to the spec file's directory).
    pub(crate) fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        clean_path(&self.base_dir.join(path))
    }

    /// The line of `field` (a path: `sample.n`, `levels[2]`) in the `config:` block of
    /// `stage`, or of the block itself when the field is not written there (a missing one).
    pub(crate) fn config_field_line(&self, stage: &StageSpec, field: &str) -> u64 {
        stage
            .config_lines
            .line_of(field)
            .unwrap_or(stage.config_line)
    }

    /// Depth-first search for a cycle through input references; reports the cycle's path.
    fn check_acyclic(&self) -> Result<(), SpecError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let index: BTreeMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut marks = vec![Mark::New; self.stages.len()];
        let mut path: Vec<usize> = Vec::new();

        fn visit(
            spec: &PipelineSpec,
            index: &BTreeMap<&str, usize>,
            marks: &mut [Mark],
            path: &mut Vec<usize>,
            i: usize,
        ) -> Result<(), SpecError> {
            marks[i] = Mark::Active;
            path.push(i);
            for input in &spec.stages[i].inputs {
                let j = index[input.stage.as_str()];
                match marks[j] {
                    Mark::Active => {
                        let from = path.iter().position(|&k| k == j).expect("on path");
                        let mut names: Vec<&str> = path[from..]
                            .iter()
                            .map(|&k| spec.stages[k].name.as_str())
                            .collect();
                        names.push(&spec.stages[j].name);
                        names.reverse();
                        return Err(SpecError::new(
                            &spec.path,
                            Some(input.line),
                            SpecErrorKind::Cycle(names.join(" -> ")),
                        ));
                    }
                    Mark::New => visit(spec, index, marks, path, j)?,
                    Mark::Done => {}
                }
            }
            path.pop();
            marks[i] = Mark::Done;
            Ok(())
        }

        for i in 0..self.stages.len() {
            if marks[i] == Mark::New {
                visit(self, &index, &mut marks, &mut path, i)?;
            }
        }
        Ok(())
    }
}

/// A stage as written, or each stage its `matrix:` expands into, with every placeholder
/// substituted; errors point at the template's lines.
fn expand_stage(
    raw_stage: &raw::RawStage,
    vars: &template::Vars,
    err: &impl Fn(u64, SpecErrorKind) -> SpecError,
) -> Result<Vec<StageSpec>, SpecError> {
    let line = raw_stage.name.referenced.line();
    let template_error = |line: u64, message: String| {
        err(
            line,
            SpecErrorKind::Template {
                stage: raw_stage.name.value.clone(),
                message,
            },
        )
    };
    let combinations = match &raw_stage.matrix {
        None => vec![BTreeMap::new()],
        Some(m) => {
            let used = template::placeholders(&raw_stage.name.value)
                .map_err(|msg| template_error(line, msg))?;
            if let Some(key) = m.value.keys().find(|k| !used.contains(&k.as_str())) {
                return Err(template_error(
                    line,
                    format!(
                        "the name does not use the matrix key `${{{key}}}`: \
                         each expanded stage needs a name of its own"
                    ),
                ));
            }
            vars.combinations(&m.value)
                .map_err(|msg| template_error(m.referenced.line(), msg))?
        }
    };
    let mut stages = Vec::with_capacity(combinations.len());
    for binding in combinations {
        let scope = vars.scope(binding);
        let name = scope
            .string(&raw_stage.name.value)
            .map_err(|m| template_error(line, m))?;
        check_stage_name(&name).map_err(|kind| err(line, kind))?;
        let inputs = raw_stage
            .inputs
            .as_ref()
            .map(|i| raw::input_refs(i, &name, &scope))
            .transpose()
            .map_err(|(line, kind)| err(line, kind))?
            .unwrap_or_default();
        let sql = match &raw_stage.sql {
            Some(s) => {
                raw::sql_filters(s, &scope).map_err(|m| template_error(s.referenced.line(), m))?
            }
            None => Vec::new(),
        };
        let (config, config_line, config_lines) = match &raw_stage.config {
            Some(c) => (
                scope
                    .value(&c.value.value)
                    .map_err(|m| template_error(c.referenced.line(), m))?,
                c.referenced.line(),
                c.value.lines.clone(),
            ),
            None => (
                serde_json::Value::Object(Default::default()),
                line,
                FieldLines::default(),
            ),
        };
        stages.push(StageSpec {
            name,
            line,
            kind: raw_stage.kind.value.clone(),
            kind_line: raw_stage.kind.referenced.line(),
            inputs,
            sql,
            config,
            config_line,
            config_lines,
        });
    }
    Ok(stages)
}

/// Removes `.` and `dir/..` pairs lexically, so paths read well in messages
/// (`pipelines/../work` becomes `work`).
pub(crate) fn clean_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

fn is_valid_pipeline_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Stage names become directory names in the workdir and SQL table names, so they are plain
/// lowercase identifiers: no path separators, no `..`, nothing DataFusion would case-fold.
fn check_stage_name(name: &str) -> Result<(), SpecErrorKind> {
    let bad = |why: &str| SpecErrorKind::BadStageName {
        name: name.to_string(),
        why: why.to_string(),
    };
    if name.contains('/') || name.contains('\\') || name.contains("..") || name.starts_with('.') {
        return Err(bad("it would escape the workdir"));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err(bad(
            "stage names are lowercase identifiers ([a-z_][a-z0-9_]*), used as directory and SQL table names",
        ));
    }
    if RESERVED_STAGE_NAMES.contains(&name) {
        return Err(bad("it is a reserved SQL schema name"));
    }
    Ok(())
}
