//! Chat-completion backends: any OpenAI-compatible HTTP endpoint, with retries, rate limits and
//! a durable journal of responses. Knows nothing of pipelines or tables.

mod batch;
mod batch_api;
mod batcher;
mod blocks;
mod embedded;
mod journal;
mod json_lines;
mod llama;
mod openai;
mod parse;
mod retry;
mod sampler;
mod secret;
mod structured;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub(crate) use batch::{Part, PartLimits, RequestFile, RequestParts, read_results};
pub(crate) use batch_api::{Batch, BatchApi};
pub use embedded::{EmbeddedBackend, EmbeddedOptions};
pub use journal::{Answered, JournalEntry, JournalIndex, OpenedJournal};
pub use journal::{Journal, JournalError};
pub(crate) use openai::{OpenAiBackend, OpenAiConfig};
pub use parse::GradedPassage;
pub use parse::{ParseError, parse_all_levels, parse_single_level};
pub(crate) use retry::RetryPolicy;
pub(crate) use secret::Secret;
pub(crate) use structured::{StructuredOutput, graded_passages_schema};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// What is sent, minus where it is sent: its hash keys the journal, so a response is reused
/// whichever endpoint answered it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub stop: Vec<String>,
    /// Structured output (`StructuredOutput`): the OpenAI form ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub response_format: Option<serde_json::Value>,
    /// ... or vLLM's older extension.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guided_json: Option<serde_json::Value>,
}

impl ChatRequest {
    /// BLAKE3 of the request's canonical JSON (fields in declaration order, no endpoint, no
    /// key). The output constraint is left out: an answer journaled with or without it answers
    /// the same prompt, and turning it on must not buy every answer again.
    pub fn hash(&self) -> String {
        let unconstrained = ChatRequest {
            response_format: None,
            guided_json: None,
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unconstrained).expect("requests serialize");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub text: String,
    /// The model the server says answered.
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LlmError {
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// Seconds the server asked to wait (Retry-After).
        retry_after: Option<f64>,
    },
    #[error("timed out after {0:.1}s")]
    Timeout(f64),
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("invalid backend configuration: {0}")]
    Config(String),
    /// The embedded model failed to load or to generate.
    #[error("model: {0}")]
    Model(String),
    /// A batch of the Batch API failed as a whole (validation, say).
    #[error("batch failed: {0}")]
    BatchFailed(String),
    /// A batch file could not be written or read (line 0: the file as a whole).
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    BatchFile {
        path: std::path::PathBuf,
        line: usize,
        message: String,
    },
}

impl LlmError {
    /// Worth another try: rate limits, server errors, timeouts, dropped connections, and
    /// responses cut off mid-body.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            LlmError::Timeout(_) | LlmError::Connection(_) | LlmError::Malformed(_) => true,
            LlmError::Config(_)
            | LlmError::Model(_)
            | LlmError::BatchFailed(_)
            | LlmError::BatchFile { .. } => false,
        }
    }
}

/// A chat-completion backend.
pub trait ChatBackend: Send + Sync {
    /// One attempt, no retries (the caller owns the retry policy).
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>>;
}
