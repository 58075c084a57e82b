//! Turning an LLM's answer into graded passages, tolerant of what small models do: code fences,
//! prose around the JSON, keys like "Level 3", a passage given as a bare string.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradedPassage {
    pub level: i32,
    pub title: String,
    pub text: String,
}

/// Why (part of) an answer could not be used; `level` is `None` when nothing could be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub level: Option<i32>,
    pub reason: String,
}

fn reject(level: Option<i32>, reason: impl Into<String>) -> ParseError {
    ParseError {
        level,
        reason: reason.into(),
    }
}

/// Removes a Markdown code fence around the answer, if any.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let body = rest.split_once('\n').map_or("", |(_, b)| b);
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

/// The integer a key names: "3", "level 3", "Level_3", "3 (perfectly relevant)".
fn level_of(key: &str) -> Option<i32> {
    let digits: String = key
        .chars()
        .skip_while(|c| !c.is_ascii_digit() && *c != '-')
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// Parses a one-JSON-object answer with a passage per level. Returns the usable passages, in
/// the order of `levels`, and a problem for every level that is missing or empty (or one
/// problem with no level when the answer is not JSON at all).
pub fn parse_all_levels(answer: &str, levels: &[i32]) -> (Vec<GradedPassage>, Vec<ParseError>) {
    let body = strip_fence(answer);
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) if start < end => &body[start..=end],
        _ => {
            return (
                Vec::new(),
                vec![reject(None, "no JSON object in the answer")],
            );
        }
    };
    let object: BTreeMap<String, serde_json::Value> = match serde_json::from_str(json) {
        Ok(o) => o,
        Err(e) => return (Vec::new(), vec![reject(None, format!("invalid JSON: {e}"))]),
    };
    let by_level: BTreeMap<i32, &serde_json::Value> = object
        .iter()
        .filter_map(|(k, v)| level_of(k).map(|l| (l, v)))
        .collect();
    let mut passages = Vec::new();
    let mut problems = Vec::new();
    for &level in levels {
        let (title, text) = match by_level.get(&level) {
            None => {
                problems.push(reject(Some(level), "level missing from the answer"));
                continue;
            }
            Some(serde_json::Value::String(s)) => (String::new(), s.clone()),
            Some(serde_json::Value::Object(o)) => {
                let field = |k: &str| {
                    o.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .trim()
                        .to_string()
                };
                (field("title"), field("text"))
            }
            Some(other) => {
                problems.push(reject(
                    Some(level),
                    format!("expected a passage object, found {other}"),
                ));
                continue;
            }
        };
        if text.trim().is_empty() {
            problems.push(reject(Some(level), "empty passage text"));
        } else {
            passages.push(GradedPassage {
                level,
                title,
                text: text.trim().to_string(),
            });
        }
    }
    (passages, problems)
}

/// Parses a plain-text answer to a one-level prompt: the passage itself.
pub fn parse_single_level(answer: &str, level: i32) -> Result<GradedPassage, ParseError> {
    let text = strip_fence(answer).trim_matches('"').trim();
    if text.is_empty() {
        return Err(reject(Some(level), "empty answer"));
    }
    Ok(GradedPassage {
        level,
        title: String::new(),
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_json_with_level_keys() {
        let answer = "Sure!\n```json\n{\"Level 3\": {\"title\": \"T\", \"text\": \"three\"}, \"2\": \"two\", \"1\": {\"text\": \" \"}}\n```";
        let (passages, problems) = parse_all_levels(answer, &[3, 2, 1, 0]);
        assert_eq!(
            passages,
            vec![
                GradedPassage {
                    level: 3,
                    title: "T".into(),
                    text: "three".into()
                },
                GradedPassage {
                    level: 2,
                    title: String::new(),
                    text: "two".into()
                },
            ]
        );
        assert_eq!(
            problems,
            vec![
                reject(Some(1), "empty passage text"),
                reject(Some(0), "level missing from the answer")
            ]
        );
    }

    #[test]
    fn not_json() {
        let (passages, problems) = parse_all_levels("I cannot help with that.", &[3]);
        assert!(passages.is_empty());
        assert_eq!(problems, vec![reject(None, "no JSON object in the answer")]);
        let (_, problems) = parse_all_levels("{\"3\": oops}", &[3]);
        assert!(
            problems[0].reason.starts_with("invalid JSON"),
            "{problems:?}"
        );
    }

    #[test]
    fn single_level() {
        assert_eq!(
            parse_single_level("```\n\"A passage.\"\n```", 2)
                .unwrap()
                .text,
            "A passage."
        );
        assert!(parse_single_level("  ", 2).is_err());
    }
}
