//! The YAML shape of a spec, as serde reads it, with source locations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::lines::LinedValue;
use super::template::Scope;
use super::{InputRef, SpecError, SpecErrorKind, SqlFilter, SqlSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub workdir: Option<Spanned<String>>,
    /// Template variables: scalars, or lists for matrices and fan-in inputs.
    #[serde(default)]
    pub vars: Option<Spanned<BTreeMap<String, serde_json::Value>>>,
    pub stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStage {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    /// Documentation for the spec's reader: accepted, never used.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    /// One stage per combination of these values (lists, or names of list variables).
    #[serde(default)]
    pub matrix: Option<Spanned<BTreeMap<String, serde_json::Value>>>,
    #[serde(default)]
    pub inputs: Option<Spanned<RawInputs>>,
    #[serde(default)]
    pub sql: Option<Spanned<RawSql>>,
    #[serde(default)]
    pub config: Option<Spanned<LinedValue>>,
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
    inputs: &Spanned<RawInputs>,
    stage: &str,
    scope: &Scope,
) -> Result<Vec<InputRef>, (u64, SpecErrorKind)> {
    let line = inputs.referenced.line();
    let template = |message: String| {
        (
            line,
            SpecErrorKind::Template {
                stage: stage.to_string(),
                message,
            },
        )
    };
    let mut pairs: Vec<(Option<String>, String)> = Vec::new();
    match &inputs.value {
        RawInputs::List(refs) => {
            for r in refs {
                pairs.extend(scope.input_entries(None, r).map_err(template)?);
            }
        }
        RawInputs::Map(map) => {
            for (k, v) in map {
                pairs.extend(scope.input_entries(Some(k), v).map_err(template)?);
            }
        }
    }
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

pub(super) fn sql_filters(sql: &Spanned<RawSql>, scope: &Scope) -> Result<Vec<SqlFilter>, String> {
    let line = sql.referenced.line();
    let source = |text: &str| -> Result<SqlSource, String> {
        let text = scope.string(text)?;
        let trimmed = text.trim();
        Ok(
            if Path::new(trimmed)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("sql"))
                && !trimmed.contains(char::is_whitespace)
            {
                SqlSource::File(PathBuf::from(trimmed))
            } else {
                SqlSource::Inline(text)
            },
        )
    };
    match &sql.value {
        RawSql::One(text) => Ok(vec![SqlFilter {
            role: None,
            source: source(text)?,
            line,
        }]),
        RawSql::PerRole(map) => map
            .iter()
            .map(|(role, text)| {
                Ok(SqlFilter {
                    role: Some(scope.string(role)?),
                    source: source(text)?,
                    line,
                })
            })
            .collect(),
    }
}
