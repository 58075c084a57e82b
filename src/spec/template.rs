//! Spec templates: `vars:` at the top of a spec, `matrix:` on a stage, and `${name}`
//! placeholders. A matrix stage expands into one stage per combination of its values; an input
//! entry that names a list variable expands into one entry per value (a fan-in: one report over
//! every dataset's metrics). Substitution is textual on strings; a string that is exactly one
//! placeholder takes the value's own type (`k: ${k}` stays a number).

use std::collections::BTreeMap;

use serde_json::Value;

/// The spec's `vars:` (scalars or lists of scalars), after command-line overrides.
#[derive(Debug, Clone, Default)]
pub(super) struct Vars(BTreeMap<String, Value>);

/// The values of one expanded stage: its matrix combination over the spec's vars.
pub(super) struct Scope<'a> {
    vars: &'a Vars,
    binding: BTreeMap<String, Value>,
}

impl Vars {
    /// Checks that every variable is a scalar or a list of scalars.
    pub(super) fn new(vars: BTreeMap<String, Value>) -> Result<Vars, String> {
        for (name, value) in &vars {
            check_name(name)?;
            let ok = match value {
                Value::Array(items) => items.iter().all(is_scalar),
                other => is_scalar(other),
            };
            if !ok {
                return Err(format!(
                    "variable `{name}` must be a string, number, boolean or a list of those"
                ));
            }
        }
        Ok(Vars(vars))
    }

    /// Replaces declared variables by `NAME=VALUE` overrides (VALUE read as YAML, so `[a, b]`
    /// is a list and `7` a number). Unknown names are refused: a typo would silently do nothing.
    pub(super) fn override_with(&mut self, overrides: &[(String, String)]) -> Result<(), String> {
        for (name, text) in overrides {
            if !self.0.contains_key(name) {
                let known: Vec<&str> = self.0.keys().map(String::as_str).collect();
                return Err(format!(
                    "`--var {name}=...`: the spec declares no variable `{name}` (vars: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
            let value: Value = serde_saphyr::from_str(text)
                .map_err(|e| format!("`--var {name}={text}`: not a YAML value: {e}"))?;
            self.0.insert(name.clone(), value);
        }
        *self = Vars::new(std::mem::take(&mut self.0))?;
        Ok(())
    }

    fn list(&self, name: &str) -> Option<&[Value]> {
        match self.0.get(name) {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        }
    }

    /// Every combination of a stage's `matrix:` (keys in name order, the last varying
    /// fastest). A key's values are a list or the name of a list variable.
    pub(super) fn combinations(
        &self,
        matrix: &BTreeMap<String, Value>,
    ) -> Result<Vec<BTreeMap<String, Value>>, String> {
        let mut combos = vec![BTreeMap::new()];
        for (key, values) in matrix {
            check_name(key)?;
            if self.0.contains_key(key) {
                return Err(format!(
                    "matrix key `{key}` shadows the variable `{key}`: give it another name"
                ));
            }
            let values: &[Value] = match values {
                Value::Array(items) => items,
                Value::String(var) => self
                    .list(var.trim_start_matches("${").trim_end_matches('}'))
                    .ok_or_else(|| {
                        format!("matrix key `{key}`: `{var}` is not a list variable of this spec")
                    })?,
                _ => {
                    return Err(format!(
                        "matrix key `{key}`: give a list of values or the name of a list variable"
                    ));
                }
            };
            if values.is_empty() {
                return Err(format!("matrix key `{key}` has no values"));
            }
            if let Some(bad) = values.iter().find(|v| !is_scalar(v)) {
                return Err(format!("matrix key `{key}`: value {bad} is not a scalar"));
            }
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    values.iter().map(move |v| {
                        let mut next = combo.clone();
                        next.insert(key.clone(), v.clone());
                        next
                    })
                })
                .collect();
        }
        Ok(combos)
    }

    pub(super) fn scope(&self, binding: BTreeMap<String, Value>) -> Scope<'_> {
        Scope {
            vars: self,
            binding,
        }
    }
}

impl Scope<'_> {
    /// A matrix key's value or a variable's, lists included.
    fn lookup_any(&self, name: &str) -> Result<&Value, String> {
        match self.binding.get(name).or_else(|| self.vars.0.get(name)) {
            Some(v) => Ok(v),
            None => self.lookup(name),
        }
    }

    /// A scalar to interpolate into a string.
    fn lookup(&self, name: &str) -> Result<&Value, String> {
        if let Some(v) = self.binding.get(name) {
            return Ok(v);
        }
        match self.vars.0.get(name) {
            Some(Value::Array(_)) => Err(format!(
                "`${{{name}}}` is a list: use it as a stage's `matrix:` values or in `inputs:` \
                 (one input per value)"
            )),
            Some(v) => Ok(v),
            None => {
                let mut known: Vec<&str> = self.binding.keys().map(String::as_str).collect();
                known.extend(self.vars.0.keys().map(String::as_str));
                Err(format!(
                    "`${{{name}}}` names no matrix key or variable (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            }
        }
    }

    /// `text` with every `${name}` replaced (`$${` stays a literal `${`).
    pub(super) fn string(&self, text: &str) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        for piece in pieces(text)? {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(name) => out.push_str(&scalar_text(self.lookup(name)?)),
            }
        }
        Ok(out)
    }

    /// A config value with every string substituted; `"${n}"` alone takes n's value as it
    /// is (a number, or a whole list).
    pub(super) fn value(&self, value: &Value) -> Result<Value, String> {
        Ok(match value {
            Value::String(s) => match pieces(s)?.as_slice() {
                [Piece::Var(name)] => self.lookup_any(name)?.clone(),
                _ => Value::String(self.string(s)?),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.value(v))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((self.string(k)?, self.value(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Expands one `inputs:` entry (role, reference): when it names a list variable that is
    /// not bound by this stage's matrix, one entry per value of that list.
    pub(super) fn input_entries(
        &self,
        role: Option<&str>,
        reference: &str,
    ) -> Result<Vec<(Option<String>, String)>, String> {
        let mut names = placeholders(reference)?;
        if let Some(r) = role {
            names.extend(placeholders(r)?);
        }
        let lists: Vec<&str> = names
            .into_iter()
            .filter(|n| !self.binding.contains_key(*n) && self.vars.list(n).is_some())
            .collect();
        let Some(&list) = lists.first() else {
            return Ok(vec![(
                role.map(|r| self.string(r)).transpose()?,
                self.string(reference)?,
            )]);
        };
        if lists.iter().any(|l| *l != list) {
            return Err(format!(
                "input `{reference}` fans in over two lists: use one list variable per entry"
            ));
        }
        let mut out = Vec::new();
        for value in self.vars.list(list).unwrap_or_default() {
            let mut binding = self.binding.clone();
            binding.insert(list.to_string(), value.clone());
            let scope = Scope {
                vars: self.vars,
                binding,
            };
            out.push((
                role.map(|r| scope.string(r)).transpose()?,
                scope.string(reference)?,
            ));
        }
        Ok(out)
    }
}

/// A template string: literal text and `${name}` placeholders.
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Splits `text` at its placeholders; `$${` is the literal text `${`.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push(Piece::Text(&rest[..at - 1]));
            out.push(Piece::Text(&rest[at..at + 2]));
            rest = &rest[at + 2..];
            continue;
        }
        out.push(Piece::Text(&rest[..at]));
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
        out.push(Piece::Var(after[..end].trim()));
        rest = &after[end + 1..];
    }
    out.push(Piece::Text(rest));
    out.retain(|p| !matches!(p, Piece::Text("")));
    Ok(out)
}

/// The placeholder names in `text`, in order.
pub(super) fn placeholders(text: &str) -> Result<Vec<&str>, String> {
    Ok(pieces(text)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(name) => Some(name),
            Piece::Text(_) => None,
        })
        .collect())
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a variable name (letters, digits and `_`, not starting with a digit)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        Vars::new(
            serde_json::from_value(json!({
                "data": "../data", "k": 10, "beir": ["scifact", "nfcorpus"]
            }))
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn strings_substitute_and_lone_placeholders_keep_their_type() {
        let vars = vars();
        let scope = vars.scope(BTreeMap::from([("dataset".to_string(), json!("scifact"))]));
        assert_eq!(
            scope.string("${data}/beir/${dataset}").unwrap(),
            "../data/beir/scifact"
        );
        assert_eq!(scope.value(&json!("${k}")).unwrap(), json!(10));
        assert_eq!(scope.value(&json!("top ${k}")).unwrap(), json!("top 10"));
        assert_eq!(
            scope.value(&json!({"runs": "${beir}"})).unwrap(),
            json!({"runs": ["scifact", "nfcorpus"]})
        );
        assert_eq!(scope.string("cost $${x}").unwrap(), "cost ${x}");
        assert!(scope.string("${nope}").unwrap_err().contains("names no"));
        assert!(scope.string("${beir}").unwrap_err().contains("is a list"));
        assert!(scope.string("${data").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn matrices_are_cartesian_products_over_lists_or_list_variables() {
        let vars = vars();
        let matrix: BTreeMap<String, Value> = serde_json::from_value(json!({
            "dataset": "beir", "model": ["base", "sycl"]
        }))
        .unwrap();
        let combos = vars.combinations(&matrix).unwrap();
        let names: Vec<String> = combos
            .into_iter()
            .map(|b| vars.scope(b).string("${dataset}_${model}").unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "scifact_base",
                "scifact_sycl",
                "nfcorpus_base",
                "nfcorpus_sycl"
            ]
        );
        let shadow: BTreeMap<String, Value> = serde_json::from_value(json!({"k": [1, 2]})).unwrap();
        assert!(vars.combinations(&shadow).is_err());
        let empty: BTreeMap<String, Value> = serde_json::from_value(json!({"x": []})).unwrap();
        assert!(vars.combinations(&empty).is_err());
    }

    #[test]
    fn inputs_fan_in_over_list_variables_not_bound_by_the_matrix() {
        let vars = vars();
        let scope = vars.scope(BTreeMap::new());
        assert_eq!(
            scope
                .input_entries(Some("${beir}"), "${beir}_metrics")
                .unwrap(),
            [
                (Some("scifact".to_string()), "scifact_metrics".to_string()),
                (Some("nfcorpus".to_string()), "nfcorpus_metrics".to_string()),
            ]
        );
        let bound = vars.scope(BTreeMap::from([("beir".to_string(), json!("x"))]));
        assert_eq!(
            bound.input_entries(None, "${beir}_run").unwrap(),
            [(None, "x_run".to_string())]
        );
    }

    #[test]
    fn overrides_parse_as_yaml_and_refuse_unknown_names() {
        let mut vars = vars();
        vars.override_with(&[
            ("beir".into(), "[scifact]".into()),
            ("k".into(), "5".into()),
        ])
        .unwrap();
        assert_eq!(vars.list("beir").unwrap(), [json!("scifact")]);
        assert!(
            vars.override_with(&[("bier".into(), "x".into())])
                .unwrap_err()
                .contains("no variable `bier`")
        );
    }
}
