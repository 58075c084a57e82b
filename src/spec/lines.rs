//! A stage's `config:` read once from the YAML into JSON for the stage kind, together with
//! the line of every key and list item, so a config error reported by field path
//! (`sample.n`, `sources[1].input`) points at its line.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Lines of a config node's keys and items.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldLines {
    fields: BTreeMap<String, (u64, FieldLines)>,
    items: Vec<(u64, FieldLines)>,
}

impl FieldLines {
    /// The line of the deepest node of `path` found (`a.b[2].c`); `None` if not even the
    /// first segment is there.
    pub fn line_of(&self, path: &str) -> Option<u64> {
        let mut node = self;
        let mut line = None;
        for segment in path.split('.') {
            let (key, indices) = match segment.find('[') {
                Some(at) => segment.split_at(at),
                None => (segment, ""),
            };
            if !key.is_empty() {
                let Some((l, child)) = node.fields.get(key) else {
                    break;
                };
                (line, node) = (Some(*l), child);
            }
            for index in indices
                .split(['[', ']'])
                .filter(|s| !s.is_empty())
                .map(str::parse::<usize>)
            {
                let Some((l, child)) = index.ok().and_then(|i| node.items.get(i)) else {
                    return line;
                };
                (line, node) = (Some(*l), child);
            }
        }
        line
    }
}

/// A config node as JSON, and the lines below it.
pub struct LinedValue {
    pub value: serde_json::Value,
    pub lines: FieldLines,
}

impl<'de> Deserialize<'de> for LinedValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<LinedValue, D::Error> {
        deserializer.deserialize_any(LinedVisitor)
    }
}

struct LinedVisitor;

fn leaf(value: serde_json::Value) -> LinedValue {
    LinedValue {
        value,
        lines: FieldLines::default(),
    }
}

impl<'de> Visitor<'de> for LinedVisitor {
    type Value = LinedValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<LinedValue, E> {
        Ok(leaf(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<LinedValue, E> {
        Ok(leaf(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<LinedValue, E> {
        Ok(leaf(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<LinedValue, E> {
        serde_json::Number::from_f64(v)
            .map(|n| leaf(serde_json::Value::Number(n)))
            .ok_or_else(|| E::custom(format!("{v} is not a number JSON can hold")))
    }

    fn visit_str<E>(self, v: &str) -> Result<LinedValue, E> {
        Ok(leaf(v.into()))
    }

    fn visit_string<E>(self, v: String) -> Result<LinedValue, E> {
        Ok(leaf(v.into()))
    }

    fn visit_unit<E>(self) -> Result<LinedValue, E> {
        Ok(leaf(serde_json::Value::Null))
    }

    fn visit_none<E>(self) -> Result<LinedValue, E> {
        Ok(leaf(serde_json::Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<LinedValue, D::Error> {
        LinedValue::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LinedValue, A::Error> {
        let (mut values, mut lines) = (Vec::new(), FieldLines::default());
        while let Some(item) = seq.next_element::<Spanned<LinedValue>>()? {
            lines.items.push((item.referenced.line(), item.value.lines));
            values.push(item.value.value);
        }
        Ok(LinedValue {
            value: serde_json::Value::Array(values),
            lines,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LinedValue, A::Error> {
        let (mut values, mut lines) = (serde_json::Map::new(), FieldLines::default());
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value: LinedValue = map.next_value()?;
            lines
                .fields
                .insert(key.value.clone(), (key.referenced.line(), value.lines));
            values.insert(key.value, value.value);
        }
        Ok(LinedValue {
            value: serde_json::Value::Object(values),
            lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        config: LinedValue,
    }

    #[test]
    fn keys_and_items_keep_their_lines() {
        let yaml = "config:\n  model: m\n  sample:\n    n: 5\n    seed: 1\n  sources:\n    - input: graded\n    - {input: qrels, min_score: 2}\n  levels: [3, 2, 1.5]\n";
        let doc: Doc = serde_saphyr::from_str(yaml).unwrap();
        let json: serde_json::Value = serde_json::json!({
            "model": "m",
            "sample": {"n": 5, "seed": 1},
            "sources": [{"input": "graded"}, {"input": "qrels", "min_score": 2}],
            "levels": [3, 2, 1.5],
        });
        assert_eq!(doc.config.value, json);
        let lines = &doc.config.lines;
        assert_eq!(lines.line_of("model"), Some(2));
        assert_eq!(lines.line_of("sample"), Some(3));
        assert_eq!(lines.line_of("sample.seed"), Some(5));
        assert_eq!(lines.line_of("sources[1].min_score"), Some(8));
        assert_eq!(lines.line_of("sources[0].input"), Some(7));
        assert_eq!(lines.line_of("levels[2]"), Some(9));
        // The deepest node found: `sample` has no `x`.
        assert_eq!(lines.line_of("sample.x"), Some(3));
        assert_eq!(lines.line_of("sources[7]"), Some(6));
        assert_eq!(lines.line_of("nope"), None);
    }
}
