//! A stage's fingerprint: a hash over everything its output depends on — its kind and config,
//! the content of its input tables and named files, and the program version.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::table::{FileStamp, Manifest, hash_file};

use super::{PipelineError, PlannedStage};

pub(crate) const PROGRAM_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Components {
    pub version: String,
    pub kind: String,
    /// Manifests written before stage kinds had versions read as version 1.
    #[serde(default = "first_version")]
    pub kind_version: u32,
    pub config: serde_json::Value,
    pub inputs: BTreeMap<String, InputComponent>,
    /// Per config field, the files it names (a model directory names several).
    pub files: BTreeMap<String, Vec<FileComponent>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputComponent {
    pub stage: String,
    pub table: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileComponent {
    pub path: String,
    pub hash: String,
    /// Not part of the fingerprint: lets an unchanged file skip re-hashing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stamp: Option<FileStamp>,
}

fn first_version() -> u32 {
    1
}

impl Components {
    pub fn fingerprint(&self) -> String {
        let mut hashed = self.clone();
        for file in hashed.files.values_mut().flatten() {
            file.stamp = None;
        }
        // serde_json maps are sorted by key, so this serialization is canonical.
        let bytes = serde_json::to_vec(&hashed).expect("components serialize");
        blake3::hash(&bytes).to_hex().to_string()
    }

    /// Human-readable reasons why `self` differs from what a previous run recorded.
    pub fn differences(&self, previous: &Components) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.version != previous.version {
            reasons.push(format!(
                "program version changed ({} -> {})",
                previous.version, self.version
            ));
        }
        if self.kind != previous.kind {
            reasons.push(format!("kind changed ({} -> {})", previous.kind, self.kind));
        } else if self.kind_version != previous.kind_version {
            reasons.push(format!(
                "`{}` writes its output differently since version {} (was {})",
                self.kind, self.kind_version, previous.kind_version
            ));
        }
        if self.config != previous.config {
            reasons.push(format!(
                "config changed ({})",
                changed_keys(&self.config, &previous.config).join(", ")
            ));
        }
        for (role, input) in &self.inputs {
            match previous.inputs.get(role) {
                None => reasons.push(format!("new input `{role}`")),
                Some(old) if old.stage != input.stage || old.table != input.table => reasons.push(
                    format!("input `{role}` now reads `{}.{}`", input.stage, input.table),
                ),
                Some(old) if old.filter != input.filter => {
                    reasons.push(format!("sql filter of input `{role}` changed"));
                }
                Some(old) if old.hash != input.hash => reasons.push(format!(
                    "input `{role}` changed (stage `{}` has new output)",
                    input.stage
                )),
                Some(_) => {}
            }
        }
        for role in previous.inputs.keys() {
            if !self.inputs.contains_key(role) {
                reasons.push(format!("input `{role}` removed"));
            }
        }
        let fields: BTreeSet<&String> = self.files.keys().chain(previous.files.keys()).collect();
        for field in fields {
            let (now, before) = (
                self.files.get(field).map_or(&[][..], Vec::as_slice),
                previous.files.get(field).map_or(&[][..], Vec::as_slice),
            );
            for file in now {
                match before.iter().find(|old| old.path == file.path) {
                    Some(old) if old.hash == file.hash => {}
                    Some(_) => reasons.push(format!("file `{}` changed", file.path)),
                    None => reasons.push(format!("`{field}` now names `{}`", file.path)),
                }
            }
            for old in before {
                if !now.iter().any(|file| file.path == old.path) {
                    reasons.push(format!("`{field}` no longer names `{}`", old.path));
                }
            }
        }
        if reasons.is_empty() {
            reasons.push("fingerprint changed".to_string());
        }
        reasons
    }
}

fn changed_keys(new: &serde_json::Value, old: &serde_json::Value) -> Vec<String> {
    match (new, old) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut keys: Vec<String> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect();
            keys.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
            keys.sort();
            keys
        }
        _ => vec!["config".to_string()],
    }
}

/// Hash of a named file, reusing the hash the previous run recorded for the same path (among
/// `previous`, its field's files) while size and mtime are unchanged.
fn file_component(path: &Path, previous: &[FileComponent]) -> Result<FileComponent, PipelineError> {
    let shown = path.to_string_lossy().into_owned();
    let stamp = FileStamp::of(path)?;
    if let Some(old) = previous
        .iter()
        .find(|old| old.path == shown && old.stamp == Some(stamp))
    {
        return Ok(old.clone());
    }
    Ok(FileComponent {
        path: shown,
        hash: hash_file(path)?,
        stamp: Some(stamp),
    })
}

/// The input tables' hashes come from their producers' manifests (verified against the file's
/// stamp, re-hashed if it was modified), so assessing a pipeline reads no table data.
pub(crate) fn table_hash(
    dir: &Path,
    table: &str,
    manifest: &Manifest,
) -> Result<Option<String>, PipelineError> {
    let Some(entry) = manifest.tables.get(table) else {
        return Ok(None);
    };
    let path = dir.join(&entry.file);
    if !path.exists() {
        return Ok(None);
    }
    if FileStamp::of(&path)? == entry.stamp {
        Ok(Some(entry.hash.clone()))
    } else {
        Ok(Some(hash_file(&path)?))
    }
}

pub(crate) enum Computed {
    Ready(Components),
    /// An input table does not exist yet.
    InputMissing(String),
}

pub fn compute(
    stage: &PlannedStage,
    producers: &[&PlannedStage],
    previous: Option<&Components>,
) -> Result<Computed, PipelineError> {
    let mut inputs = BTreeMap::new();
    for input in &stage.inputs {
        let producer = producers
            .iter()
            .find(|p| p.name() == input.stage)
            .expect("inputs are stages of the pipeline");
        let Some(manifest) = producer.manifest() else {
            return Ok(Computed::InputMissing(input.stage.clone()));
        };
        let Some(hash) = table_hash(&producer.dir, &input.table, &manifest)? else {
            return Ok(Computed::InputMissing(input.stage.clone()));
        };
        inputs.insert(
            input.role.clone(),
            InputComponent {
                stage: input.stage.clone(),
                table: input.table.clone(),
                filter: input.filter.as_ref().map(|(text, _)| text.clone()),
                hash,
            },
        );
    }
    let mut files: BTreeMap<String, Vec<FileComponent>> = BTreeMap::new();
    for file in &stage.files {
        let old = previous
            .and_then(|p| p.files.get(&file.field))
            .map_or(&[][..], Vec::as_slice);
        let component = file_component(&file.path, old)?;
        files.entry(file.field.clone()).or_default().push(component);
    }
    Ok(Computed::Ready(Components {
        version: PROGRAM_VERSION.to_string(),
        kind: stage.spec.kind.clone(),
        kind_version: stage.kind_version,
        config: without_credentials(&stage.spec.config),
        inputs,
        files,
    }))
}

/// Query parameters whose values are credentials (matched case-insensitively as substrings).
const SECRET_PARAMS: [&str; 6] = ["key", "token", "secret", "password", "sig", "auth"];

/// The config as manifests record it: URLs without their user info and without the values of
/// credential-like query parameters (`?api_key=...`). A run with another key is the same
/// computation, so the fingerprint does not see keys either.
fn without_credentials(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains("://") => Value::String(redact_url(s)),
        Value::Array(items) => Value::Array(items.iter().map(without_credentials).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), without_credentials(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut out = format!("{scheme}://{host}{path}");
    if let Some(query) = query {
        let (query, fragment) = query.split_once('#').unwrap_or((query, ""));
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if SECRET_PARAMS
                        .iter()
                        .any(|s| name.to_ascii_lowercase().contains(s)) =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
        if !fragment.is_empty() {
            out.push('#');
            out.push_str(fragment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_kind_version_makes_older_outputs_stale() {
        let older: Components = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "kind": "assemble", "config": {}, "inputs": {}, "files": {}
        }))
        .unwrap();
        assert_eq!(older.kind_version, 1, "manifests before versions read as 1");
        let newer = Components {
            kind_version: 2,
            ..older.clone()
        };
        assert_ne!(newer.fingerprint(), older.fingerprint());
        assert_eq!(
            newer.differences(&older),
            ["`assemble` writes its output differently since version 2 (was 1)"]
        );
    }

    #[test]
    fn urls_lose_user_info_and_credential_parameters() {
        assert_eq!(
            redact_url(
                "https://user:pw@api.example.com:8443/v1?api-version=2024&api_key=sk1&Sig=x"
            ),
            "https://api.example.com:8443/v1?api-version=2024&api_key=***&Sig=***"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:8000/v1"),
            "http://127.0.0.1:8000/v1"
        );
        let config = serde_json::json!({"endpoints": ["http://a:b@h/v1?token=t"], "n": 3});
        assert_eq!(
            without_credentials(&config),
            serde_json::json!({"endpoints": ["http://h/v1?token=***"], "n": 3})
        );
    }
}
