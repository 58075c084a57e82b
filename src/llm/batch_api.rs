//! The OpenAI Batch API: upload a batch input file, create a batch, poll it, download its
//! output and error files. Half the price of single requests on hosted APIs; the answers come
//! within the completion window instead of at once.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_util::io::ReaderStream;

use super::batch::{PartialFile, io_error};
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
    /// Unix seconds, on the same clock as the input file's.
    #[serde(default)]
    pub created_at: Option<i64>,
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

/// A page of the batch list, newest first.
#[derive(Deserialize)]
struct BatchList {
    data: Vec<Batch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// What matters of an uploaded file: when it was uploaded (unix seconds).
#[derive(Deserialize)]
struct FileObject {
    #[serde(default)]
    created_at: Option<i64>,
}

/// Batches asked for per page of the list (the API's largest page).
const LIST_PAGE: usize = 100;

/// What a page of batches, newest first, says of the batch made from a file.
#[derive(Debug)]
enum Scan {
    Found(Batch),
    /// The page reaches batches created before the file was uploaded: none further can have
    /// been made from it.
    Absent,
    /// Not on this page; it may be on the next.
    NotYet,
}

fn scan(page: Vec<Batch>, input_file_id: &str, uploaded_at: Option<i64>) -> Scan {
    for batch in page {
        if batch.input_file_id.as_deref() == Some(input_file_id) {
            return Scan::Found(batch);
        }
        if let (Some(created), Some(uploaded)) = (batch.created_at, uploaded_at)
            && created < uploaded
        {
            return Scan::Absent;
        }
    }
    Scan::NotYet
}

/// The slowest upload that finishes: a batch input file may take its size at this rate on top
/// of the timeout (a 200 MB file, 200 s more).
const MIN_UPLOAD_BYTES_PER_S: f64 = 1e6;

impl BatchApi {
    /// `timeout` bounds each call, except that an upload gets more time by its size and a
    /// download goes on as long as each chunk of it arrives within `timeout`: batch files are
    /// hundreds of megabytes.
    pub fn new(
        endpoint: &str,
        api_key: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, LlmError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
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

    /// Sends `request`; without a `timeout` of its own, the caller bounds it.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, LlmError> {
        let request = match &self.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        };
        let request = match timeout {
            Some(timeout) => request.timeout(timeout),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(e, timeout.unwrap_or(self.timeout)))?;
        successful(response).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, LlmError> {
        self.json_within(request, self.timeout).await
    }

    async fn json_within<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, LlmError> {
        let bytes = self
            .send(request, Some(timeout))
            .await?
            .bytes()
            .await
            .map_err(|e| transport_error(e, timeout))?;
        serde_json::from_slice(&bytes).map_err(|e| LlmError::Malformed(e.to_string()))
    }

    /// `work`, or a timeout error once it has taken `self.timeout`.
    async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, LlmError>>,
    ) -> Result<T, LlmError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(LlmError::Timeout(self.timeout.as_secs_f64())))
    }

    /// Uploads a batch input file (`purpose: batch`); returns its file id. The file is
    /// streamed into the request a chunk at a time.
    pub async fn upload(&self, path: &Path) -> Result<String, LlmError> {
        let io = |e: std::io::Error| io_error(path, &e);
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        // multipart/form-data by hand: two parts, no dependency for it. The boundary is drawn
        // from the file's name, size and the time, not its content, which is never held.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = format!("{}:{size}:{}", path.display(), started.as_nanos());
        let boundary = format!("synthrank-{}", blake3::hash(seed.as_bytes()).to_hex());
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let body_len = head.len() as u64 + size + tail.len() as u64;
        let body = futures::stream::iter([Ok(head.into_bytes().into())])
            .chain(ReaderStream::with_capacity(file, UPLOAD_CHUNK))
            .chain(futures::stream::iter([Ok(tail.into_bytes().into())]));
        let request = self
            .client
            .post(format!("{}/files", self.base))
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header(reqwest::header::CONTENT_LENGTH, body_len)
            .body(reqwest::Body::wrap_stream(body));
        let timeout =
            self.timeout + Duration::from_secs_f64(body_len as f64 / MIN_UPLOAD_BYTES_PER_S);
        Ok(self.json_within::<Created>(request, timeout).await?.id)
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

    /// The batch made from `input_file_id`, if any: how a run finds a batch that was created
    /// but not recorded (killed in between, or the answer to the create lost) instead of
    /// creating a second one. The list is read newest first, a page at a time, back to the
    /// file's upload: however many other batches the organisation created since.
    pub async fn find(&self, input_file_id: &str) -> Result<Option<Batch>, LlmError> {
        let file = self
            .client
            .get(format!("{}/files/{input_file_id}", self.base));
        // A server that does not describe files: the list is read to its end instead.
        let uploaded_at = match self.json::<FileObject>(file).await {
            Ok(file) => file.created_at,
            Err(LlmError::Status {
                status: 404 | 405, ..
            }) => None,
            Err(e) => return Err(e),
        };
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", LIST_PAGE.to_string())];
            query.extend(after.iter().map(|id| ("after", id.clone())));
            let url = reqwest::Url::parse_with_params(&format!("{}/batches", self.base), &query)
                .map_err(|e| LlmError::Config(format!("{}: {e}", self.base)))?;
            let page: BatchList = self.json(self.client.get(url)).await?;
            let next = page
                .last_id
                .clone()
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            match scan(page.data, input_file_id, uploaded_at) {
                Scan::Found(batch) => return Ok(Some(batch)),
                Scan::Absent => return Ok(None),
                // A server that ignores `after` would repeat the page forever.
                Scan::NotYet if !page.has_more || next.is_none() || next == after => {
                    return Ok(None);
                }
                Scan::NotYet => after = next,
            }
        }
    }

    /// Downloads a file's content (an output or error file) to `path`, one chunk in memory at
    /// a time; `path` appears once the whole content is there and synced.
    pub async fn download(&self, file_id: &str, path: &Path) -> Result<(), LlmError> {
        let url = format!("{}/files/{file_id}/content", self.base);
        let mut response = self.within(self.send(self.client.get(url), None)).await?;
        let mut file = PartialFile::create(path)?;
        loop {
            let chunk = response.chunk();
            let chunk =
                self.within(async { chunk.await.map_err(|e| transport_error(e, self.timeout)) });
            let Some(chunk) = chunk.await? else {
                break;
            };
            file.write(&chunk)?;
        }
        file.finish()
    }
}

/// Bytes of a batch input file read at a time as it is uploaded.
const UPLOAD_CHUNK: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str, input: &str, created_at: Option<i64>) -> Batch {
        serde_json::from_value(json!({
            "id": id, "status": "in_progress", "input_file_id": input, "created_at": created_at,
        }))
        .unwrap()
    }

    #[test]
    fn a_page_finds_the_batch_or_says_whether_to_read_on() {
        let page = || {
            vec![
                batch("b3", "other", Some(30)),
                batch("b2", "mine", Some(20)),
                batch("b1", "other", Some(10)),
            ]
        };
        assert!(matches!(scan(page(), "mine", Some(20)), Scan::Found(b) if b.id == "b2"));
        // b1 was created before the file: the list has passed the file's upload.
        assert!(matches!(scan(page(), "lost", Some(15)), Scan::Absent));
        // Everything on the page is newer than the file: the next page may hold it.
        assert!(matches!(scan(page(), "lost", Some(5)), Scan::NotYet));
        // Without times, only the end of the list says it is absent.
        let untimed = vec![batch("b1", "other", None)];
        assert!(matches!(scan(untimed, "lost", Some(15)), Scan::NotYet));
        assert!(matches!(scan(page(), "lost", None), Scan::NotYet));
    }
}
