//! A real OpenAI-compatible HTTP/1.1 server on 127.0.0.1 for tests and benchmarks, whose
//! behaviour per request is scripted: answer, stall, fail with a status, drop the connection,
//! or send a malformed body. It records every request it receives.
#![allow(dead_code)] // each test binary uses a subset

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request target (`/v1/chat/completions`, `/v1/batches?limit=100`).
    pub path: String,
    /// The body as sent (multipart uploads are not JSON).
    pub raw: Vec<u8>,
    pub body: serde_json::Value,
    pub authorization: Option<String>,
    /// When the whole request had arrived.
    pub at: std::time::Instant,
}

impl Received {
    /// The last user message.
    pub fn user(&self) -> String {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string()
    }
}

pub enum Reply {
    /// 200 with this assistant message content.
    Answer(String),
    /// This status, body and optional Retry-After seconds.
    Status(u16, String, Option<u32>),
    /// Wait, then run the inner reply.
    Stall(Duration, Box<Reply>),
    /// 200 with this body sent in 4 pieces, after each pause (a slow transfer).
    Trickle(Duration, String),
    /// Close the connection without answering.
    Drop,
    /// 200 with a body that is not JSON.
    Malformed,
}

pub type Handler = dyn Fn(&Received, usize) -> Reply + Send + Sync;

pub struct LlmServer {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl LlmServer {
    /// Starts the server on its own thread; `handler(request, n)` decides the reply to the n-th
    /// request (0-based, over all connections).
    pub fn start(handler: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) -> LlmServer {
        let handler: Arc<Handler> = Arc::new(handler);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = received.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let (handler, log) = (handler.clone(), log.clone());
                    tokio::spawn(serve(socket, handler, log));
                }
            });
        });
        let addr = rx.recv().unwrap();
        LlmServer {
            url: format!("http://{addr}/v1"),
            received,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    handler: Arc<Handler>,
    log: Arc<Mutex<Vec<Received>>>,
) {
    let mut buffer = Vec::new();
    loop {
        // Headers.
        let header_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                .map(|l| l[name.len() + 1..].trim().to_string())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buffer.len() < header_end + length {
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let raw = buffer[header_end..header_end + length].to_vec();
        let body: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        buffer.drain(..header_end + length);
        let mut request_line = head.split_whitespace();
        let request = Received {
            method: request_line.next().unwrap_or_default().to_string(),
            path: request_line.next().unwrap_or_default().to_string(),
            raw,
            body,
            authorization: header("authorization"),
            at: std::time::Instant::now(),
        };
        let n = {
            let mut log = log.lock().unwrap();
            log.push(request.clone());
            log.len() - 1
        };
        let mut reply = handler(&request, n);
        while let Reply::Stall(delay, inner) = reply {
            tokio::time::sleep(delay).await;
            reply = *inner;
        }
        let (status, body, retry_after) = match reply {
            Reply::Answer(content) => (200, completion(&content), None),
            Reply::Status(status, body, retry_after) => (status, body, retry_after),
            Reply::Malformed => (200, "{\"choices\": [ this is not json".to_string(), None),
            Reply::Drop => return,
            Reply::Trickle(pause, body) => {
                let head = format!(
                    "HTTP/1.1 200 X\r\ncontent-type: application/jsonl\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for piece in body.as_bytes().chunks(body.len().div_ceil(4).max(1)) {
                    tokio::time::sleep(pause).await;
                    if socket.write_all(piece).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Reply::Stall(..) => unreachable!(),
        };
        let mut response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        if let Some(seconds) = retry_after {
            response.push_str(&format!("retry-after: {seconds}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&body);
        if socket.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An OpenAI chat-completion body carrying `content`.
pub fn completion(content: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 40, "total_tokens": 90}
    })
    .to_string()
}

/// What a good model answers to the all-levels prompt: one passage per level, about the query.
pub fn graded_answer(query: &str, levels: &[i32]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = levels
        .iter()
        .map(|l| {
            (
                l.to_string(),
                serde_json::json!({"title": format!("Level {l}"), "text": format!("A level-{l} passage for: {query}")}),
            )
        })
        .collect();
    format!("```json\n{}\n```", serde_json::Value::Object(object))
}

/// The query line of a rendered prompt (`Query: ...`).
pub fn query_of(user: &str) -> String {
    user.lines()
        .find_map(|l| l.strip_prefix("Query: "))
        .unwrap_or("")
        .to_string()
}
