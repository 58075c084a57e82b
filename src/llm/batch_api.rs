//! The OpenAI Batch API: upload a batch input file, create a batch, poll it, download its
//! output and error files. Half the price of single requests on hosted APIs; the answers come
//! within the completion window instead of at once.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::openai::{successful, transport_error};
use super::{LlmError, Secret};

pub(crate) struct BatchApi {
    client: reqwest::Client,
    /// `https://api.openai.com/v1`: the endpoint without `/chat/completions`.
    base: String,
    api_key: Option<Secret>,
    timeout: Duration,
}

/// A batch as the API describes it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    /// Why a batch failed validation.
    #[serde(default)]
    pub errors: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct RequestCounts {
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

impl Batch {
    /// Whether the batch has stopped changing (its files are final).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
struct BatchList {
    data: Vec<Batch>,
}

impl BatchApi {
    pub fn new(
        endpoint: &str,
        api_key: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, LlmError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        let base = endpoint.trim_end_matches('/');
        let base = base.strip_suffix("/chat/completions").unwrap_or(base);
        Ok(BatchApi {
            client,
            base: base.to_string(),
            api_key,
            timeout,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, LlmError> {
        let request = match &self.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(e, self.timeout))?;
        successful(response).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, LlmError> {
        let bytes = self
            .send(request)
            .await?
            .bytes()
            .await
            .map_err(|e| transport_error(e, self.timeout))?;
        serde_json::from_slice(&bytes).map_err(|e| LlmError::Malformed(e.to_string()))
    }

    /// Uploads a batch input file (`purpose: batch`); returns its file id.
    pub async fn upload(&self, path: &Path) -> Result<String, LlmError> {
        let content = std::fs::read(path).map_err(|e| LlmError::BatchFile {
            path: path.to_path_buf(),
            line: 0,
            message: e.to_string(),
        })?;
        // multipart/form-data by hand: two parts, no dependency for it.
        let boundary = format!("synthrank-{}", blake3::hash(&content).to_hex());
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let request = self
            .client
            .post(format!("{}/files", self.base))
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        Ok(self.json::<Created>(request).await?.id)
    }

    /// Creates a batch of chat completions over an uploaded input file.
    pub async fn create(
        &self,
        input_file_id: &str,
        completion_window: &str,
    ) -> Result<Batch, LlmError> {
        let request = self
            .client
            .post(format!("{}/batches", self.base))
            .json(&json!({
                "input_file_id": input_file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": completion_window,
            }));
        self.json(request).await
    }

    pub async fn get(&self, batch_id: &str) -> Result<Batch, LlmError> {
        self.json(self.client.get(format!("{}/batches/{batch_id}", self.base)))
            .await
    }

    /// The most recent batch made from `input_file_id`, if any: how a run that died between
    /// creating a batch and recording its id finds it instead of creating a second one.
    pub async fn find(&self, input_file_id: &str) -> Result<Option<Batch>, LlmError> {
        let list: BatchList = self
            .json(self.client.get(format!("{}/batches?limit=100", self.base)))
            .await?;
        Ok(list
            .data
            .into_iter()
            .find(|b| b.input_file_id.as_deref() == Some(input_file_id)))
    }

    /// A file's content (an output or error file).
    pub async fn download(&self, file_id: &str) -> Result<Vec<u8>, LlmError> {
        let response = self
            .send(
                self.client
                    .get(format!("{}/files/{file_id}/content", self.base)),
            )
            .await?;
        Ok(response
            .bytes()
            .await
            .map_err(|e| transport_error(e, self.timeout))?
            .to_vec())
    }
}
