//! `render_prompts`: queries -> chat prompts asking for passages at graded relevance levels.

use std::path::{Path, PathBuf};

use arrow::array::StringArray;
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value, context};
use serde::Deserialize;

use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::table::{self, columns};

pub(crate) struct RenderPrompts;

const INPUTS: &[InputRole] = &[InputRole {
    name: "queries",
    kind: Some("queries"),
    required: true,
}];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// One prompt per query asking for every level at once (one JSON answer).
    AllLevels,
    /// One prompt per (query, level), for models that cannot follow a JSON format.
    PerLevel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A minijinja template with a `user` block and an optional `system` block.
    template: PathBuf,
    #[serde(default = "default_mode")]
    mode: Mode,
    /// The relevance levels to ask for, best first.
    #[serde(default = "crate::stages::default_levels")]
    levels: Vec<i32>,
    /// Extra variables for the template.
    #[serde(default)]
    vars: serde_json::Map<String, serde_json::Value>,
}

fn default_mode() -> Mode {
    Mode::AllLevels
}

impl StageKind for RenderPrompts {
    fn kind(&self) -> &'static str {
        "render_prompts"
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
        if config.levels.is_empty() {
            return Err(ConfigError::new("levels", "give at least one level"));
        }
        let template = clean_path(&base_dir.join(&config.template));
        Ok(Box::new(RenderPromptsStage { config, template }))
    }
}

struct RenderPromptsStage {
    config: Config,
    template: PathBuf,
}

impl Stage for RenderPromptsStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("prompts")]
    }

    fn files(&self) -> Vec<NamedFile> {
        vec![NamedFile::new("template", self.template.clone())]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.render_all(ctx))
    }
}

/// A rendered prompt.
struct Prompt {
    prompt_id: String,
    query_id: String,
    level: Option<i32>,
    system: Option<String>,
    user: String,
}

impl RenderPromptsStage {
    async fn render_all(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let source =
            std::fs::read_to_string(&self.template).map_err(StageError::io(&self.template))?;
        let name = self.template.file_name().map_or_else(
            || "template".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut env = Environment::new();
        // A misspelt variable is an error, not a silently empty prompt.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template_owned(name.clone(), source)
            .map_err(|e| self.template_error(&e, None))?;
        let template = env
            .get_template(&name)
            .map_err(|e| self.template_error(&e, None))?;

        let mut prompts = Vec::new();
        let bar = ctx.progress(None, "prompts");
        for batch in ctx.read_input("queries").await? {
            let ids = columns::get::<StringArray>(&batch, "query_id");
            let texts = columns::get::<StringArray>(&batch, "text");
            for row in 0..batch.num_rows() {
                let (query_id, query) = (ids.value(row), texts.value(row));
                let levels: Vec<Option<i32>> = match self.config.mode {
                    Mode::AllLevels => vec![None],
                    Mode::PerLevel => self.config.levels.iter().map(|&l| Some(l)).collect(),
                };
                for level in levels {
                    let values = context! {
                        query_id => query_id,
                        query => query,
                        level => level,
                        levels => &self.config.levels,
                        vars => Value::from(minijinja::value::Serde(&self.config.vars)),
                    };
                    let mut captured = template
                        .render_captured(values)
                        .map_err(|e| self.template_error(&e, Some(query_id)))?;
                    let system = captured.with_state_mut(|s| match s.render_block("system") {
                        Ok(text) => Ok(Some(text.trim().to_string())),
                        Err(e) if e.kind() == ErrorKind::UnknownBlock => Ok(None),
                        Err(e) => Err(e),
                    });
                    let user = captured.with_state_mut(|s| s.render_block("user"));
                    let (system, user) = match (system, user) {
                        (Ok(s), Ok(u)) => (s, u.trim().to_string()),
                        (Err(e), _) | (_, Err(e)) => {
                            return Err(self.template_error(&e, Some(query_id)));
                        }
                    };
                    prompts.push(Prompt {
                        prompt_id: match level {
                            None => query_id.to_string(),
                            Some(l) => format!("{query_id}:{l}"),
                        },
                        query_id: query_id.to_string(),
                        level,
                        system,
                        user,
                    });
                    bar.inc(1);
                }
            }
        }
        bar.finish_and_clear();
        let schema = table::schema("prompts")?.arrow();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(prompts.iter().map(|p| p.prompt_id.as_str())),
                columns::utf8(prompts.iter().map(|p| p.query_id.as_str())),
                columns::nullable_int32(prompts.iter().map(|p| p.level)),
                columns::nullable_utf8(prompts.iter().map(|p| p.system.as_deref())),
                columns::utf8(prompts.iter().map(|p| p.user.as_str())),
                columns::utf8(prompts.iter().map(|_| name.as_str())),
            ],
        )
        .expect("columns follow the prompts kind");
        ctx.write_table("prompts", schema, &[batch])
    }

    fn template_error(&self, e: &minijinja::Error, query: Option<&str>) -> StageError {
        StageError::Template {
            path: self.template.clone(),
            line: e.line(),
            query: query.map(str::to_string),
            message: match e.line() {
                Some(_) => e
                    .detail()
                    .map_or_else(|| e.kind().to_string(), str::to_string),
                None => e.to_string(),
            },
        }
    }
}
