//! The embedded backend: a GGUF chat model (llama architecture, e.g. SmolLM2-135M-Instruct)
//! run in-process on the CPU with candle's quantized llama, prompts in the ChatML template.
//! No server needed, so the quickstart runs offline. Requests run one at a time (the model
//! uses every core for each token).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::io::Cursor;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use futures::future::BoxFuture;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::{ChatBackend, ChatRequest, ChatResponse, LlmError};

/// ChatML's turn delimiters (SmolLM2, Qwen and others).
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const DEFAULT_MAX_TOKENS: u32 = 512;

struct Loaded {
    weights: ModelWeights,
    tokenizer: Tokenizer,
    eos: u32,
    context: usize,
}

pub struct EmbeddedBackend {
    path: PathBuf,
    name: String,
    model: Arc<Mutex<Loaded>>,
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

/// The model with every weight dequantized to f32, as an in-memory GGUF file. candle's
/// quantized kernels are scalar unless the binary is built for AVX (and Q4_1 has no SIMD path
/// at all); f32 weights go through the runtime-dispatched GEMM instead: several times faster
/// on small models, at 4 bytes a parameter (about 0.5 GB for 135M).
fn dequantized(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
) -> candle_core::Result<(gguf_file::Content, Cursor<Vec<u8>>)> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let weights = content.tensor(file, name, &Device::Cpu)?;
        let weights = match weights.dtype() {
            GgmlDType::F32 => weights,
            _ => QTensor::quantize(&weights.dequantize(&Device::Cpu)?, GgmlDType::F32)?,
        };
        tensors.push((name.as_str(), weights));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &refs)?;
    buffer.set_position(0);
    let content = gguf_file::Content::read(&mut buffer)?;
    Ok((content, buffer))
}

impl EmbeddedBackend {
    /// Loads the GGUF file; `name` is the model name responses report.
    pub fn open(path: &Path, name: &str) -> Result<EmbeddedBackend, LlmError> {
        let mut file = std::fs::File::open(path).map_err(|e| model_error(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| model_error(path, e))?;
        let tokenizer = gguf_tokenizer(&content, path)?;
        let eos = tokenizer
            .token_to_id(IM_END)
            .ok_or_else(|| model_error(path, format!("the vocabulary has no {IM_END}")))?;
        let context = content
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;
        let (content, mut reader) =
            dequantized(&content, &mut file).map_err(|e| model_error(path, e))?;
        let weights = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
            .map_err(|e| model_error(path, e))?;
        Ok(EmbeddedBackend {
            path: path.to_path_buf(),
            name: name.to_string(),
            model: Arc::new(Mutex::new(Loaded {
                weights,
                tokenizer,
                eos,
                context,
            })),
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

fn generate(
    loaded: &mut Loaded,
    request: &ChatRequest,
    path: &Path,
) -> Result<(String, u64, u64, String), LlmError> {
    let engine = |e: candle_core::Error| LlmError::Model(format!("{}: {e}", path.display()));
    let prompt = EmbeddedBackend::chatml(request);
    let encoding = loaded
        .tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| model_error(path, e))?;
    let prompt_ids = encoding.get_ids().to_vec();
    let max_new = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize;
    if prompt_ids.len() + 1 >= loaded.context {
        return Err(LlmError::Model(format!(
            "the prompt has {} tokens, the model's context is {}",
            prompt_ids.len(),
            loaded.context
        )));
    }
    let sampling = match request.temperature {
        None => Sampling::ArgMax,
        Some(t) if t <= 0.0 => Sampling::ArgMax,
        Some(temperature) => match request.top_p {
            Some(p) if p < 1.0 => Sampling::TopP { p, temperature },
            _ => Sampling::All { temperature },
        },
    };
    let mut sampler = LogitsProcessor::from_sampling(request.seed.unwrap_or(0), sampling);
    loaded.weights.clear_kv_cache();
    let mut output: Vec<u32> = Vec::new();
    let mut input = prompt_ids.clone();
    let mut position = 0;
    let mut finish = "length";
    while output.len() < max_new && position + input.len() < loaded.context {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(engine)?;
        let logits = loaded
            .weights
            .forward(&x, position)
            .and_then(|l| l.squeeze(0))
            .map_err(engine)?;
        position += input.len();
        let next = sampler.sample(&logits).map_err(engine)?;
        if next == loaded.eos {
            finish = "stop";
            break;
        }
        output.push(next);
        input = vec![next];
        if !request.stop.is_empty() {
            let text = loaded.tokenizer.decode(&output, true).unwrap_or_default();
            if request.stop.iter().any(|s| text.ends_with(s.as_str())) {
                finish = "stop";
                break;
            }
        }
    }
    let mut text = loaded
        .tokenizer
        .decode(&output, true)
        .map_err(|e| model_error(path, e))?;
    for s in &request.stop {
        if let Some(cut) = text.find(s.as_str()) {
            text.truncate(cut);
        }
    }
    Ok((
        text,
        prompt_ids.len() as u64,
        output.len() as u64,
        finish.to_string(),
    ))
}

impl ChatBackend for EmbeddedBackend {
    fn complete<'a>(
        &'a self,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatResponse, LlmError>> {
        let model = Arc::clone(&self.model);
        let request = request.clone();
        let path = self.path.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let (text, prompt_tokens, completion_tokens, finish) =
                tokio::task::spawn_blocking(move || {
                    let mut loaded = model
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    generate(&mut loaded, &request, &path)
                })
                .await
                .map_err(|e| LlmError::Model(format!("generation task failed: {e}")))??;
            Ok(ChatResponse {
                text,
                model: name,
                prompt_tokens,
                completion_tokens,
                finish_reason: Some(finish),
            })
        })
    }
}
