//! The OpenAI-compatible `/v1/chat/completions` backend (vLLM, llama.cpp server, Ollama,
//! hosted APIs), spreading requests over several endpoints.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{ChatBackend, ChatRequest, ChatResponse, LlmError, Secret};

#[derive(Debug, Clone)]
pub(crate) struct OpenAiConfig {
    /// Base URLs (`http://host:8000/v1`) or full `.../chat/completions` URLs.
    pub endpoints: Vec<String>,
    /// Sent as a bearer token; read by the caller from an environment variable.
    pub api_key: Option<Secret>,
    pub timeout: Duration,
    /// Cap on requests started per second, over all endpoints.
    pub requests_per_second: Option<f64>,
}

pub(crate) struct OpenAiBackend {
    client: reqwest::Client,
    urls: Vec<String>,
    api_key: Option<Secret>,
    timeout: Duration,
    next: AtomicUsize,
    /// The earliest instant the next request may start (rate limit).
    next_slot: Option<(Duration, Mutex<Instant>)>,
}

impl OpenAiBackend {
    pub fn new(config: OpenAiConfig) -> Result<OpenAiBackend, LlmError> {
        if config.endpoints.is_empty() {
            return Err(LlmError::Config("no endpoints".to_string()));
        }
        // The process-wide TLS provider; a second install (another backend) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        let urls = config
            .endpoints
            .iter()
            .map(|e| {
                let e = e.trim_end_matches('/');
                if e.ends_with("/chat/completions") {
                    e.to_string()
                } else {
                    format!("{e}/chat/completions")
                }
            })
            .collect();
        let next_slot = match config.requests_per_second {
            Some(rps) => {
                let interval = Duration::try_from_secs_f64(1.0 / rps)
                    .ok()
                    .filter(|_| rps > 0.0 && rps.is_finite())
                    .ok_or_else(|| {
                        LlmError::Config(format!(
                            "requests_per_second must be a positive number, not {rps}"
                        ))
                    })?;
                Some((interval, Mutex::new(Instant::now())))
            }
            None => None,
        };
        Ok(OpenAiBackend {
            client,
            urls,
            api_key: config.api_key,
            timeout: config.timeout,
            next: AtomicUsize::new(0),
            next_slot,
        })
    }

    /// Waits for this request's slot under the rate limit.
    async fn pace(&self) {
        let Some((interval, next)) = &self.next_slot else {
            return;
        };
        let start = {
            let mut next = next.lock().expect("rate limiter lock");
            let start = (*next).max(Instant::now());
            *next = start + *interval;
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    async fn attempt(&self, request: &ChatRequest) -> Result<ChatResponse, LlmError> {
        self.pace().await;
        let url = &self.urls[self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()];
        let mut builder = self.client.post(url).json(request);
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        let response = builder.send().await.map_err(|e| self.transport_error(e))?;
        let bytes = successful(response)
            .await?
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        parse_completion(&bytes)
    }

    fn transport_error(&self, e: reqwest::Error) -> LlmError {
        transport_error(e, self.timeout)
    }
}

/// The response, or its status as an error (with the server's Retry-After and the start of its
/// body).
pub(super) async fn successful(response: reqwest::Response) -> Result<reqwest::Response, LlmError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok());
    let body = response.text().await.unwrap_or_default();
    Err(LlmError::Status {
        status: status.as_u16(),
        body: body.chars().take(300).collect(),
        retry_after,
    })
}

/// A failed exchange as an `LlmError`: a timeout, or the root cause of a connection failure
/// ("connection closed before message completed" says more than "error sending request"),
/// never with the URL (an endpoint may carry a key in its query string).
pub(super) fn transport_error(e: reqwest::Error, timeout: Duration) -> LlmError {
    if e.is_timeout() {
        LlmError::Timeout(timeout.as_secs_f64())
    } else {
        let e = e.without_url();
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = s.to_string();
            source = s.source();
        }
        LlmError::Connection(message)
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    model: String,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

pub(super) fn parse_completion(bytes: &[u8]) -> Result<ChatResponse, LlmError> {
    let completion: Completion = serde_json::from_slice(bytes).map_err(|e| {
        let start: String = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
        LlmError::Malformed(format!("{e} (body starts `{start}`)"))
    })?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::Malformed("no choices".to_string()))?;
    let usage = completion.usage.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    Ok(ChatResponse {
        text: choice.message.content.unwrap_or_default(),
        model: completion.model,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        finish_reason: choice.finish_reason,
    })
}

impl ChatBackend for OpenAiBackend {
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(self.attempt(request))
    }
}
