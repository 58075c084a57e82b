use std::fmt;
use std::path::{Path, PathBuf};

/// A problem with a pipeline spec, located at a file and (where known) a line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", Location { file, line: *line })]
pub struct SpecError {
    pub file: PathBuf,
    pub line: Option<u64>,
    /// Boxed: errors travel through every `Result` of the spec and pipeline layers.
    pub kind: Box<SpecErrorKind>,
}

impl SpecError {
    pub fn new(file: &Path, line: Option<u64>, kind: SpecErrorKind) -> SpecError {
        SpecError {
            file: file.to_path_buf(),
            line,
            kind: Box::new(kind),
        }
    }
}

struct Location<'a> {
    file: &'a Path,
    line: Option<u64>,
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file.display()),
            None => write!(f, "{}", self.file.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecErrorKind {
    #[error("cannot read the pipeline spec: {0}")]
    Io(std::io::Error),
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("pipeline name `{0}` is not allowed: use letters, digits, `_`, `-` and `.`")]
    BadPipelineName(String),
    #[error("`vars:` {0}")]
    Vars(String),
    #[error("stage template `{stage}`: {message}")]
    Template { stage: String, message: String },
    #[error("stage name `{name}` is not allowed: {why}")]
    BadStageName { name: String, why: String },
    #[error("duplicate stage name `{name}` (first defined on line {first})")]
    DuplicateStage { name: String, first: u64 },
    #[error("stage `{stage}`: unknown kind `{kind}` (known kinds: {known})")]
    UnknownKind {
        stage: String,
        kind: String,
        known: String,
    },
    #[error("stage `{stage}`: input `{reference}` is not of the form `stage` or `stage.table`")]
    BadInputRef { stage: String, reference: String },
    #[error("stage `{stage}`: input refers to unknown stage `{target}` (stages: {known})")]
    UnknownInput {
        stage: String,
        target: String,
        known: String,
    },
    #[error(
        "stage `{stage}`: input `{target}.{table}`: stage `{target}` writes no table `{table}` (it writes: {known})"
    )]
    UnknownInputTable {
        stage: String,
        target: String,
        table: String,
        known: String,
    },
    #[error("cycle between stages: {0}")]
    Cycle(String),
    #[error("stage `{stage}` ({kind}): {message}")]
    Inputs {
        stage: String,
        kind: String,
        message: String,
    },
    #[error("stage `{stage}`, field `{field}`: {message}")]
    Config {
        stage: String,
        field: String,
        message: String,
    },
    #[error("stage `{stage}`, field `{field}`: file `{}` does not exist", path.display())]
    MissingFile {
        stage: String,
        field: String,
        path: PathBuf,
    },
    #[error("stage `{stage}`, `sql:` {message}")]
    Sql { stage: String, message: String },
}
