//! Batch files in the OpenAI Batch API's JSONL format, which vLLM's offline `run_batch` reads
//! and writes too: one request per line keyed by `custom_id` (the request hash), one result per
//! line back, in any order.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::json_lines::JsonLines;
use super::openai::parse_completion;
use super::{ChatRequest, ChatResponse, LlmError};

#[derive(Serialize)]
struct RequestLine<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'static str,
    body: &'a ChatRequest,
}

/// A batch file written under `PATH.partial` and renamed to `PATH` once complete and synced,
/// so a reader (or a run after a crash) never sees part of it.
pub(super) struct PartialFile {
    path: PathBuf,
    partial: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl PartialFile {
    pub fn create(path: &Path) -> Result<PartialFile, LlmError> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let file = std::fs::File::create(&partial).map_err(|e| io_error(path, &e))?;
        Ok(PartialFile {
            path: path.to_path_buf(),
            partial,
            out: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), LlmError> {
        self.out
            .write_all(bytes)
            .map_err(|e| io_error(&self.path, &e))
    }

    pub fn finish(self) -> Result<(), LlmError> {
        let io = |e: std::io::Error| io_error(&self.path, &e);
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.partial, &self.path).map_err(io)
    }
}

/// A batch input file being written, one request at a time; it appears under its name only
/// once finished.
pub(crate) struct RequestFile {
    file: PartialFile,
    written: usize,
    bytes: u64,
}

/// One request as a line of a batch input file, keyed by its hash.
fn request_line(custom_id: &str, body: &ChatRequest) -> Vec<u8> {
    let line = RequestLine {
        custom_id,
        method: "POST",
        url: "/v1/chat/completions",
        body,
    };
    let mut bytes = serde_json::to_vec(&line).expect("requests serialize");
    bytes.push(b'\n');
    bytes
}

impl RequestFile {
    pub fn create(path: &Path) -> Result<RequestFile, LlmError> {
        Ok(RequestFile {
            file: PartialFile::create(path)?,
            written: 0,
            bytes: 0,
        })
    }

    /// Adds a request keyed by its hash.
    pub fn add(&mut self, custom_id: &str, body: &ChatRequest) -> Result<(), LlmError> {
        self.add_line(&request_line(custom_id, body))
    }

    fn add_line(&mut self, line: &[u8]) -> Result<(), LlmError> {
        self.file.write(line)?;
        self.written += 1;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Syncs the file and renames it into place; returns how many requests it holds.
    pub fn finish(self) -> Result<usize, LlmError> {
        self.file.finish()?;
        Ok(self.written)
    }
}

/// How much one batch input file may hold: the OpenAI Batch API takes at most 50,000 requests
/// and 200 MB a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PartLimits {
    pub requests: usize,
    pub bytes: u64,
}

/// A finished part of a split batch input: its file and how many requests it holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Part {
    pub path: PathBuf,
    pub requests: usize,
}

/// Batch input files within [`PartLimits`], written one after the other:
/// `DIR/STEM-0.jsonl`, `DIR/STEM-1.jsonl`, ... A part is started by its first request, so
/// no part is empty.
pub(crate) struct RequestParts {
    dir: PathBuf,
    stem: String,
    limits: PartLimits,
    current: Option<RequestFile>,
    finished: Vec<Part>,
}

impl RequestParts {
    pub fn new(dir: &Path, stem: &str, limits: PartLimits) -> RequestParts {
        RequestParts {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            limits,
            current: None,
            finished: Vec::new(),
        }
    }

    /// Adds a request keyed by its hash to the current part, or to a new one when it would
    /// take the current part past a limit.
    pub fn add(&mut self, custom_id: &str, body: &ChatRequest) -> Result<(), LlmError> {
        let line = request_line(custom_id, body);
        let size = line.len() as u64;
        if size > self.limits.bytes {
            return Err(LlmError::Config(format!(
                "request {custom_id} is {size} bytes, more than one batch file may hold ({} bytes)",
                self.limits.bytes
            )));
        }
        let full = self.current.as_ref().is_some_and(|part| {
            part.written == self.limits.requests || part.bytes + size > self.limits.bytes
        });
        if full {
            self.finish_current()?;
        }
        let part = match &mut self.current {
            Some(part) => part,
            None => {
                let path = self
                    .dir
                    .join(format!("{}-{}.jsonl", self.stem, self.finished.len()));
                self.current.insert(RequestFile::create(&path)?)
            }
        };
        part.add_line(&line)
    }

    fn finish_current(&mut self) -> Result<(), LlmError> {
        if let Some(part) = self.current.take() {
            let path = part.file.path.clone();
            let requests = part.finish()?;
            self.finished.push(Part { path, requests });
        }
        Ok(())
    }

    /// Finishes the last part; returns every part in order (none when no request was added).
    pub fn finish(mut self) -> Result<Vec<Part>, LlmError> {
        self.finish_current()?;
        Ok(self.finished)
    }
}

/// An I/O error on a batch file, naming the file.
pub(super) fn io_error(path: &Path, e: &std::io::Error) -> LlmError {
    batch_file_error(path, 0, e.to_string())
}

#[derive(Deserialize)]
struct ResultLine {
    custom_id: String,
    #[serde(default)]
    response: Option<ResultResponse>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ResultResponse {
    status_code: u16,
    body: serde_json::Value,
}

/// One line of a results file: the request's hash and its answer, or why there is none.
pub(crate) struct BatchResult {
    pub hash: String,
    pub answer: Result<ChatResponse, String>,
}

/// The results in a batch output file (OpenAI's output or error file, vLLM's `-o` file), one
/// line in memory at a time. A line that is not a result is an error naming the file and line:
/// results are paid for, so none is skipped silently.
pub(crate) fn read_results(
    path: &Path,
) -> Result<impl Iterator<Item = Result<BatchResult, LlmError>>, LlmError> {
    let lines = JsonLines::<ResultLine>::open(path).map_err(|e| io_error(path, &e))?;
    let path = path.to_path_buf();
    Ok(lines.map(move |line| {
        let line = line.map_err(|e| io_error(&path, &e))?;
        let parsed = line.value.map_err(|e| {
            batch_file_error(&path, line.number, format!("not a batch result: {e}"))
        })?;
        Ok(BatchResult {
            hash: parsed.custom_id,
            answer: answer_of(parsed.response, parsed.error),
        })
    }))
}

fn answer_of(
    response: Option<ResultResponse>,
    error: Option<serde_json::Value>,
) -> Result<ChatResponse, String> {
    if let Some(error) = error.filter(|e| !e.is_null()) {
        return Err(format!("error: {error}"));
    }
    let response = response.ok_or("neither a response nor an error")?;
    if response.status_code != 200 {
        return Err(format!("HTTP {}: {}", response.status_code, response.body));
    }
    let body = serde_json::to_vec(&response.body).expect("JSON values serialize");
    parse_completion(&body).map_err(|e| e.to_string())
}

fn batch_file_error(path: &Path, line: usize, message: String) -> LlmError {
    LlmError::BatchFile {
        path: path.to_path_buf(),
        line,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Message;

    fn request(content: &str) -> ChatRequest {
        ChatRequest {
            model: "m".to_string(),
            messages: vec![Message::new("user", content)],
            temperature: Some(0.0),
            max_tokens: Some(10),
            ..ChatRequest::default()
        }
    }

    #[test]
    fn requests_are_written_keyed_by_hash_and_results_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let (a, b) = (request("a"), request("b"));
        let mut file = RequestFile::create(&path).unwrap();
        file.add("ha", &a).unwrap();
        file.add("hb", &b).unwrap();
        assert!(!path.exists(), "the file appears once finished");
        let written = file.finish().unwrap();
        assert_eq!(written, 2);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[1]["custom_id"], "hb");
        assert_eq!(lines[1]["url"], "/v1/chat/completions");
        assert_eq!(lines[1]["body"]["messages"][0]["content"], "b");

        let out = dir.path().join("out.jsonl");
        std::fs::write(
            &out,
            "{\"id\": \"r1\", \"custom_id\": \"hb\", \"response\": {\"status_code\": 200, \"body\": \
             {\"model\": \"m\", \"choices\": [{\"message\": {\"content\": \"B\"}, \"finish_reason\": \"stop\"}], \
             \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1}}}, \"error\": null}\n\n\
             {\"custom_id\": \"ha\", \"response\": {\"status_code\": 400, \"body\": {\"error\": \"bad\"}}}\n\
             {\"custom_id\": \"hc\", \"response\": null, \"error\": {\"code\": \"expired\"}}\n",
        )
        .unwrap();
        let results: Vec<BatchResult> = read_results(&out)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(results.len(), 3);
        let answer = results[0].answer.as_ref().unwrap();
        assert_eq!((answer.text.as_str(), answer.completion_tokens), ("B", 1));
        assert!(
            results[1]
                .answer
                .as_ref()
                .unwrap_err()
                .starts_with("HTTP 400")
        );
        assert!(results[2].answer.as_ref().unwrap_err().contains("expired"));

        std::fs::write(&out, "{\"custom_id\": \"ha\"}\nnot json\n").unwrap();
        let error = read_results(&out)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.ends_with("out.jsonl:2: not a batch result: expected ident at line 1 column 2"),
            "{error}"
        );
    }

    #[test]
    fn parts_hold_at_most_their_limits_and_together_every_request_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let line = |i: usize| request_line(&format!("h{i}"), &request(&format!("r{i}")));
        let size = line(0).len() as u64;
        let whole = dir.path().join("whole.jsonl");
        let mut file = RequestFile::create(&whole).unwrap();
        for i in 0..7 {
            file.add(&format!("h{i}"), &request(&format!("r{i}")))
                .unwrap();
        }
        file.finish().unwrap();
        // Three requests a part by count, then two by bytes.
        for (limits, sizes) in [
            (
                PartLimits {
                    requests: 3,
                    bytes: 100 * size,
                },
                vec![3, 3, 1],
            ),
            (
                PartLimits {
                    requests: 100,
                    bytes: 2 * size + 1,
                },
                vec![2, 2, 2, 1],
            ),
        ] {
            let mut parts = RequestParts::new(dir.path(), "part", limits);
            for i in 0..7 {
                assert_eq!(line(i).len() as u64, size, "requests of one size");
                parts
                    .add(&format!("h{i}"), &request(&format!("r{i}")))
                    .unwrap();
            }
            let parts = parts.finish().unwrap();
            assert_eq!(parts.iter().map(|p| p.requests).collect::<Vec<_>>(), sizes);
            let mut joined = String::new();
            for (n, part) in parts.iter().enumerate() {
                assert_eq!(part.path, dir.path().join(format!("part-{n}.jsonl")));
                let text = std::fs::read_to_string(&part.path).unwrap();
                assert_eq!(text.lines().count(), part.requests);
                assert!(text.len() as u64 <= limits.bytes);
                joined.push_str(&text);
            }
            assert_eq!(joined, std::fs::read_to_string(&whole).unwrap());
        }
        let empty = RequestParts::new(
            dir.path(),
            "none",
            PartLimits {
                requests: 1,
                bytes: 1 << 20,
            },
        );
        assert!(empty.finish().unwrap().is_empty());
        let mut small = RequestParts::new(
            dir.path(),
            "small",
            PartLimits {
                requests: 1,
                bytes: size - 1,
            },
        );
        let error = small.add("h0", &request("r0")).unwrap_err().to_string();
        assert!(
            error.contains(&format!("request h0 is {size} bytes")),
            "{error}"
        );
    }
}
