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

/// A batch input file being written, one request at a time; it appears under its name only
/// once finished, so a reader never sees a half-written file.
pub(crate) struct RequestFile {
    path: PathBuf,
    partial: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    written: usize,
}

impl RequestFile {
    pub fn create(path: &Path) -> Result<RequestFile, LlmError> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let file = std::fs::File::create(&partial).map_err(|e| io_error(path, &e))?;
        Ok(RequestFile {
            path: path.to_path_buf(),
            partial,
            out: std::io::BufWriter::new(file),
            written: 0,
        })
    }

    /// Adds a request keyed by its hash.
    pub fn add(&mut self, custom_id: &str, body: &ChatRequest) -> Result<(), LlmError> {
        let line = RequestLine {
            custom_id,
            method: "POST",
            url: "/v1/chat/completions",
            body,
        };
        serde_json::to_writer(&mut self.out, &line).expect("requests serialize");
        self.out
            .write_all(b"\n")
            .map_err(|e| io_error(&self.path, &e))?;
        self.written += 1;
        Ok(())
    }

    /// Syncs the file and renames it into place; returns how many requests it holds.
    pub fn finish(self) -> Result<usize, LlmError> {
        let io = |e: std::io::Error| io_error(&self.path, &e);
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.partial, &self.path).map_err(io)?;
        Ok(self.written)
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> LlmError {
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
}
