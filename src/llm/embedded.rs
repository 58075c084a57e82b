//! The embedded backend: a GGUF chat model (llama architecture, e.g. SmolLM2-135M-Instruct)
//! run in-process on the CPU, prompts in the ChatML template. No server needed, so the
//! quickstart runs offline. Concurrent requests are decoded together (continuous batching,
//! `batcher`) by one engine thread that owns the model.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use candle_core::quantized::gguf_file;
use futures::channel::oneshot;
use futures::future::BoxFuture;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::batcher::{Engine, Work};
use super::llama::Llama;
use super::{ChatBackend, ChatRequest, ChatResponse, LlmError};

/// ChatML's turn delimiters (SmolLM2, Qwen and others).
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// How the embedded model runs.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedOptions {
    /// Requests decoded together at most (more wait for a free slot).
    pub max_batch: usize,
    /// Threads for the model's products; `None`: every core.
    pub threads: Option<usize>,
}

pub struct EmbeddedBackend {
    name: String,
    queue: Option<mpsc::Sender<Work>>,
    engine: Option<JoinHandle<()>>,
}

fn model_error(path: &Path, e: impl std::fmt::Display) -> LlmError {
    LlmError::Model(format!("{}: {e}", path.display()))
}

/// The BPE tokenizer a GGUF file carries in its metadata (tokenizer.ggml.*).
fn gguf_tokenizer(content: &gguf_file::Content, path: &Path) -> Result<Tokenizer, LlmError> {
    let get = |key: &str| {
        content
            .metadata
            .get(key)
            .ok_or_else(|| model_error(path, format!("no `{key}` in the GGUF metadata")))
    };
    let model = get("tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| model_error(path, e))?;
    if model != "gpt2" {
        return Err(model_error(
            path,
            format!("tokenizer `{model}` is not supported (byte-level BPE `gpt2` is)"),
        ));
    }
    let tokens = get("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| model_error(path, e))?;
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let token = token.to_string().map_err(|e| model_error(path, e))?;
        vocab.insert(token.clone(), id as u32);
    }
    let merges = get("tokenizer.ggml.merges")?
        .to_vec()
        .map_err(|e| model_error(path, e))?
        .iter()
        .map(|m| {
            let m = m.to_string().map_err(|e| model_error(path, e))?;
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| model_error(path, format!("malformed merge `{m}`")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<Vec<_>, LlmError>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| model_error(path, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .add_special_tokens([
            AddedToken::from(IM_START, true),
            AddedToken::from(IM_END, true),
        ])
        .map_err(|e| model_error(path, e))?;
    Ok(tokenizer)
}

impl EmbeddedBackend {
    /// Loads the GGUF file and starts the engine thread; `name` is the model name responses
    /// report.
    pub fn open(
        path: &Path,
        name: &str,
        options: EmbeddedOptions,
    ) -> Result<EmbeddedBackend, LlmError> {
        let started = std::time::Instant::now();
        let mut file = std::fs::File::open(path).map_err(|e| model_error(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| model_error(path, e))?;
        let tokenizer = gguf_tokenizer(&content, path)?;
        let eos = tokenizer
            .token_to_id(IM_END)
            .ok_or_else(|| model_error(path, format!("the vocabulary has no {IM_END}")))?;
        let model = Llama::from_gguf(&content, &mut file).map_err(|e| model_error(path, e))?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "embedded model loaded"
        );
        let pool = match options.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| LlmError::Model(format!("starting {n} threads: {e}")))?,
            ),
            None => None,
        };
        let engine = Engine {
            model,
            tokenizer,
            eos,
            max_batch: options.max_batch.max(1),
            pool,
        };
        let (queue, requests) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("embedded-llm".into())
            .spawn(move || engine.serve(&requests))
            .map_err(|e| LlmError::Model(format!("starting the engine thread: {e}")))?;
        Ok(EmbeddedBackend {
            name: name.to_string(),
            queue: Some(queue),
            engine: Some(handle),
        })
    }

    /// The ChatML rendering of a conversation, ending where the assistant speaks.
    pub fn chatml(request: &ChatRequest) -> String {
        let mut prompt = String::new();
        for m in &request.messages {
            prompt.push_str(&format!("{IM_START}{}\n{}{IM_END}\n", m.role, m.content));
        }
        prompt.push_str(&format!("{IM_START}assistant\n"));
        prompt
    }
}

impl Drop for EmbeddedBackend {
    /// Closing the queue ends the engine once it has nothing left to decode.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
    }
}

impl ChatBackend for EmbeddedBackend {
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let work = Work {
                prompt: EmbeddedBackend::chatml(request),
                request: request.clone(),
                reply,
            };
            let queue = self.queue.as_ref().expect("open until dropped");
            let engine_gone = || LlmError::Model("the engine thread has stopped".into());
            queue.send(work).map_err(|_| engine_gone())?;
            let completion = answer.await.map_err(|_| engine_gone())??;
            Ok(ChatResponse {
                text: completion.text,
                model: self.name.clone(),
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
                finish_reason: Some(completion.finish.to_string()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    //! The engine against candle's own quantized llama (what the embedded backend ran before
    //! continuous batching) on the real SmolLM2 GGUF file, with every weight dequantized to
    //! f32: the same model, computed another way.

    use std::io::Cursor;

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;

    use super::*;
    use crate::llm::Message;

    fn model_path() -> std::path::PathBuf {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-models.sh",
            path.display()
        );
        path
    }

    fn request(question: &str, max_tokens: u32) -> ChatRequest {
        ChatRequest {
            model: "smollm2".into(),
            messages: vec![
                Message::new("system", "You are a helpful assistant."),
                Message::new("user", question),
            ],
            max_tokens: Some(max_tokens),
            seed: Some(1),
            ..ChatRequest::default()
        }
    }

    const QUESTIONS: [&str; 4] = [
        "Name one organ of the human body.",
        "Write one sentence about vitamin D and bone density.",
        "What does a ribosome do?",
        "Explain in two sentences why the sky is blue.",
    ];

    /// Greedy answers from candle's `quantized_llama` over the f32-dequantized file.
    fn candle_answers(max_tokens: usize) -> Vec<String> {
        let path = model_path();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let tokenizer = gguf_tokenizer(&content, &path).unwrap();
        let eos = tokenizer.token_to_id(IM_END).unwrap();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let tensors: Vec<(&str, QTensor)> = names
            .into_iter()
            .map(|name| {
                let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
                let f32 = QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32);
                (name.as_str(), f32.unwrap())
            })
            .collect();
        let metadata: Vec<(&str, &gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut buffer = Cursor::new(Vec::new());
        gguf_file::write(&mut buffer, &metadata, &refs).unwrap();
        buffer.set_position(0);
        let dense = gguf_file::Content::read(&mut buffer).unwrap();
        let mut model = ModelWeights::from_gguf(dense, &mut buffer, &Device::Cpu).unwrap();
        QUESTIONS
            .iter()
            .map(|q| {
                let prompt = EmbeddedBackend::chatml(&request(q, 0));
                let ids = tokenizer
                    .encode(prompt.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                model.clear_kv_cache();
                let (mut input, mut position, mut output) = (ids, 0, Vec::new());
                while output.len() < max_tokens {
                    let x = Tensor::new(input.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let logits = model.forward(&x, position).unwrap().squeeze(0).unwrap();
                    position += input.len();
                    let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                    if next == eos {
                        break;
                    }
                    output.push(next);
                    input = vec![next];
                }
                tokenizer.decode(&output, true).unwrap()
            })
            .collect()
    }

    fn answers(max_batch: usize, max_tokens: &[u32]) -> Vec<ChatResponse> {
        let options = EmbeddedOptions {
            max_batch,
            threads: Some(2),
        };
        let backend = EmbeddedBackend::open(&model_path(), "smollm2", options).unwrap();
        let requests: Vec<ChatRequest> = QUESTIONS
            .iter()
            .zip(max_tokens)
            .map(|(q, &n)| request(q, n))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(futures::future::join_all(
            requests.iter().map(|r| backend.complete(r)),
        ))
        .into_iter()
        .map(Result::unwrap)
        .collect()
    }

    /// A prompt past the model's context fails alone, naming both sizes; the requests beside
    /// it are answered, and a zero-token request comes back empty without running the model.
    #[test]
    fn a_prompt_too_long_fails_alone() {
        let options = EmbeddedOptions {
            max_batch: 4,
            threads: Some(2),
        };
        let backend = EmbeddedBackend::open(&model_path(), "smollm2", options).unwrap();
        let long = request(&"bone density ".repeat(5000), 8);
        let empty = request(QUESTIONS[1], 0);
        let fine = request(QUESTIONS[0], 8);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let [long, empty, fine] = rt
            .block_on(futures::future::join_all(
                [&long, &empty, &fine].map(|r| backend.complete(r)),
            ))
            .try_into()
            .unwrap();
        let error = long.unwrap_err().to_string();
        let tokens: usize = error
            .split("the prompt has ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{error}"));
        assert!(
            tokens > 8192 && error.contains("the model's context is 8192"),
            "{error}"
        );
        let empty = empty.unwrap();
        assert_eq!((empty.text.as_str(), empty.completion_tokens), ("", 0));
        assert_eq!(empty.finish_reason.as_deref(), Some("length"));
        assert_eq!(fine.unwrap().completion_tokens, 8);
    }

    #[test]
    fn greedy_answers_one_at_a_time_are_candles() {
        let expected = candle_answers(40);
        let ours = answers(1, &[40; 4]);
        for ((ours, expected), q) in ours.iter().zip(&expected).zip(QUESTIONS) {
            assert_eq!(&ours.text, expected, "{q}");
        }
    }

    #[test]
    fn batched_answers_are_the_answers_one_at_a_time() {
        // Different lengths: sequences leave the batch at different steps, and with two slots
        // the last requests join while others decode.
        let lengths = [40, 7, 25, 33];
        let alone = answers(1, &lengths);
        for max_batch in [2, 4] {
            let batched = answers(max_batch, &lengths);
            for (b, a) in batched.iter().zip(&alone) {
                assert_eq!(b.text, a.text, "max_batch {max_batch}");
                assert_eq!(
                    (b.prompt_tokens, b.completion_tokens, &b.finish_reason),
                    (a.prompt_tokens, a.completion_tokens, &a.finish_reason)
                );
            }
        }
        assert_eq!(alone[1].completion_tokens, 7);
        assert_eq!(alone[1].finish_reason.as_deref(), Some("length"));
    }
}
