//! The YAML shape of a spec, as serde reads it, with source locations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{InputRef, SpecError, SpecErrorKind, SqlFilter, SqlSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub workdir: Option<Spanned<String>>,
    pub stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub inputs: Option<Spanned<RawInputs>>,
    #[serde(default)]
    pub sql: Option<Spanned<RawSql>>,
    #[serde(default)]
    pub config: Option<Spanned<serde_json::Value>>,
}

/// `inputs: [a, b.table]` or `inputs: {role: a, other: b.table}`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawInputs {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

/// `sql: "SELECT ..."`, `sql: filters/x.sql`, or `sql: {role: "SELECT ..."}`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawSql {
    One(String),
    PerRole(BTreeMap<String, String>),
}

pub(super) fn parse(path: &Path, source: &str) -> Result<RawSpec, SpecError> {
    serde_saphyr::from_str(source).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let message = e.without_snippet().to_string();
        SpecError::new(path, line, SpecErrorKind::Yaml(message))
    })
}

pub(super) fn input_refs(
    inputs: Spanned<RawInputs>,
    stage: &str,
) -> Result<Vec<InputRef>, (u64, SpecErrorKind)> {
    {
        let line = inputs.referenced.line();
        let pairs: Vec<(Option<String>, String)> = match inputs.value {
            RawInputs::List(refs) => refs.into_iter().map(|r| (None, r)).collect(),
            RawInputs::Map(map) => map.into_iter().map(|(k, v)| (Some(k), v)).collect(),
        };
        pairs
            .into_iter()
            .map(|(role, reference)| {
                let (target, table) = match reference.split_once('.') {
                    Some((s, t)) => (s.to_string(), Some(t.to_string())),
                    None => (reference.clone(), None),
                };
                if target.is_empty() || table.as_deref() == Some("") {
                    return Err((
                        line,
                        SpecErrorKind::BadInputRef {
                            stage: stage.to_string(),
                            reference,
                        },
                    ));
                }
                Ok(InputRef {
                    role,
                    stage: target,
                    table,
                    line,
                })
            })
            .collect()
    }
}

pub(super) fn sql_filters(sql: Spanned<RawSql>) -> Vec<SqlFilter> {
    {
        let line = sql.referenced.line();
        let source = |text: String| {
            let trimmed = text.trim();
            if trimmed.ends_with(".sql") && !trimmed.contains(char::is_whitespace) {
                SqlSource::File(PathBuf::from(trimmed))
            } else {
                SqlSource::Inline(text)
            }
        };
        match sql.value {
            RawSql::One(text) => vec![SqlFilter {
                role: None,
                source: source(text),
                line,
            }],
            RawSql::PerRole(map) => map
                .into_iter()
                .map(|(role, text)| SqlFilter {
                    role: Some(role),
                    source: source(text),
                    line,
                })
                .collect(),
        }
    }
}
