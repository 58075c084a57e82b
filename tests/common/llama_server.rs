//! llama.cpp's own OpenAI-compatible server (`llama-server`) on 127.0.0.1, serving a GGUF: the
//! binary is built by scripts/fetch-llama-server.sh, which the test command runs and whose path
//! it passes in `SYNTHRANK_LLAMA_SERVER`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LlamaServer {
    child: Child,
    port: u16,
}

impl LlamaServer {
    /// Serves `model` with `parallel` slots of `context` tokens each on 2 threads; waits until
    /// the model is loaded.
    pub fn start(model: &Path, parallel: usize, context: usize) -> LlamaServer {
        let binary = std::env::var_os("SYNTHRANK_LLAMA_SERVER").expect(
            "SYNTHRANK_LLAMA_SERVER is not set: run the tests with scripts/test.sh, which builds \
             llama-server (scripts/fetch-llama-server.sh) and sets it",
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&binary)
            .args(["--model", model.to_str().unwrap(), "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--threads", "2"])
            .args(["--parallel", &parallel.to_string()])
            .args(["--ctx-size", &(parallel * context).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", Path::new(&binary).display()));
        let mut server = LlamaServer { child, port };
        server.wait_until_ready();
        server
    }

    /// The base URL an OpenAI client is given.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn wait_until_ready(&mut self) {
        let started = Instant::now();
        while !self.healthy() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("llama-server exited while loading: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "llama-server did not load its model within 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /health` answers 200 once the model is loaded (503 while loading).
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.starts_with("HTTP/1.1 200")
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
