//! Structured output: constrain an all-levels answer to the JSON the parser reads (one object
//! per level, each with a title and a text), so a paid request cannot come back malformed on
//! servers that support constrained decoding.

use serde::Deserialize;
use serde_json::{Value, json};

use super::ChatRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum StructuredOutput {
    /// OpenAI's `response_format: {type: json_schema}` (OpenAI, vLLM, llama.cpp's server).
    #[default]
    JsonSchema,
    /// vLLM's older `guided_json` extension.
    GuidedJson,
    /// Nothing: the prompt alone asks for JSON (`none`; YAML's `off` and `false` too).
    Off,
}

impl<'de> Deserialize<'de> for StructuredOutput {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // YAML reads a bare `off` as false: take booleans as well as names.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Name(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Flag(true) => Ok(StructuredOutput::JsonSchema),
            Written::Flag(false) => Ok(StructuredOutput::Off),
            Written::Name(name) => match name.as_str() {
                "json_schema" => Ok(StructuredOutput::JsonSchema),
                "guided_json" => Ok(StructuredOutput::GuidedJson),
                "none" | "off" => Ok(StructuredOutput::Off),
                other => Err(serde::de::Error::custom(format!(
                    "`{other}` is not json_schema, guided_json or none"
                ))),
            },
        }
    }
}

/// The JSON schema of an answer with passages at `levels`: every level required, nothing else.
pub(crate) fn graded_passages_schema(levels: &[i32]) -> Value {
    let passage = json!({
        "type": "object",
        "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
        "required": ["title", "text"],
        "additionalProperties": false
    });
    let keys: Vec<String> = levels.iter().map(i32::to_string).collect();
    json!({
        "type": "object",
        "properties": keys.iter().map(|k| (k.clone(), passage.clone())).collect::<serde_json::Map<_, _>>(),
        "required": keys,
        "additionalProperties": false
    })
}

impl StructuredOutput {
    /// Adds the constraint for `schema` to `request` in this flavor.
    pub(crate) fn apply(self, request: &mut ChatRequest, schema: Value) {
        match self {
            StructuredOutput::JsonSchema => {
                request.response_format = Some(json!({
                    "type": "json_schema",
                    "json_schema": {"name": "graded_passages", "strict": true, "schema": schema}
                }));
            }
            StructuredOutput::GuidedJson => request.guided_json = Some(schema),
            StructuredOutput::Off => {}
        }
    }
}
