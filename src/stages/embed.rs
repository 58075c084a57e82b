//! `embed`: corpus or queries + a model -> embeddings. Texts are tokenized, sorted by length and
//! packed into batches under a token budget (padding stays small), and written as they are
//! embedded, so memory is bounded by the token ids. Backends: candle (the training encoder) or
//! ONNX Runtime (an .onnx export; synthrank exports its own models on demand).

use std::path::{Path, PathBuf};

use arrow::array::{RecordBatch, StringArray};
use candle_core::Device;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::encoder::{
    CandleEmbedder, DeviceChoice, Embedder, ModelDir, OnnxOps, OrtEmbedder, Pooling, device_label,
    export_onnx,
};
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::stages::tokenize::passage_text;
use crate::stages::with_threads;
use crate::table::{self, columns};

pub struct Embed;

const INPUTS: &[InputRole] = &[
    InputRole {
        name: "corpus",
        kind: Some("corpus"),
        required: false,
    },
    InputRole {
        name: "queries",
        kind: Some("queries"),
        required: false,
    },
    InputRole {
        name: "model",
        kind: Some("model"),
        required: false,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Backend {
    Candle,
    Onnx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnnxWeights {
    #[default]
    F32,
    Int8,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A model directory (or bind the input `model` to a train stage's `model` table).
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "default_backend")]
    backend: Backend,
    /// The ONNX model inside the model directory (exported from the weights when absent).
    #[serde(default = "default_onnx_file")]
    onnx_file: String,
    /// `int8`: run an export with 8-bit weights instead (made from the model's weights and
    /// cached; `onnx_file` is not read): faster, embeddings approximate.
    #[serde(default)]
    onnx_weights: OnnxWeights,
    /// libonnxruntime.so for the onnx backend (default: $ORT_DYLIB_PATH).
    #[serde(default)]
    onnxruntime: Option<String>,
    /// Tokens per text (default: the model directory's max_seq_length, else 512).
    #[serde(default)]
    max_length: Option<usize>,
    /// Padded tokens per batch.
    #[serde(default = "default_batch_tokens")]
    batch_tokens: usize,
    #[serde(default = "default_max_batch")]
    max_batch: usize,
    #[serde(default)]
    pooling: Option<Pooling>,
    #[serde(default)]
    normalize: Option<bool>,
    /// Prepended to every text (e.g. "query: ").
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    threads: Option<usize>,
    /// `auto` (default), `cpu`, `cuda:N`: where the candle backend runs. The onnx backend runs
    /// ONNX Runtime's CPU provider.
    #[serde(default)]
    device: DeviceChoice,
}

fn default_backend() -> Backend {
    Backend::Candle
}
fn default_onnx_file() -> String {
    "model.onnx".to_string()
}
/// Measured on 2 cores with all-MiniLM-L6-v2 at 256 tokens: 1,024 padded tokens per batch
/// embedded SciFact fastest in ONNX Runtime (21 docs/s; 16,384: 16 docs/s), and keeps candle's
/// attention tensors small.
fn default_batch_tokens() -> usize {
    1024
}
fn default_max_batch() -> usize {
    128
}

impl StageKind for Embed {
    fn kind(&self) -> &'static str {
        "embed"
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Fixed(INPUTS)
    }
    fn prepare(
        &self,
        config: &serde_json::Value,
        base_dir: &Path,
    ) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        if config.batch_tokens == 0 || config.max_batch == 0 {
            return Err(ConfigError::new("batch_tokens", "must be positive"));
        }
        if config.threads == Some(0) {
            return Err(ConfigError::new("threads", "must be at least 1"));
        }
        let model = match &config.model {
            Some(m) => Some(
                ModelDir::open(&clean_path(&base_dir.join(m)))
                    .map_err(|e| ConfigError::new("model", e.to_string()))?,
            ),
            None => None,
        };
        let library = config
            .onnxruntime
            .as_ref()
            .map(|p| clean_path(&base_dir.join(p)))
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
        if config.backend == Backend::Candle && config.onnx_weights == OnnxWeights::Int8 {
            return Err(ConfigError::new(
                "onnx_weights",
                "8-bit weights are an ONNX export: set `backend: onnx`",
            ));
        }
        config
            .device
            .check()
            .map_err(|e| ConfigError::new("device", e.to_string()))?;
        if config.backend == Backend::Onnx && matches!(config.device, DeviceChoice::Cuda(_)) {
            return Err(ConfigError::new(
                "device",
                "the onnx backend runs ONNX Runtime's CPU provider: use `backend: candle` on a GPU",
            ));
        }
        if config.backend == Backend::Onnx && library.is_none() {
            return Err(ConfigError::new(
                "onnxruntime",
                "the onnx backend needs libonnxruntime: set `onnxruntime` or ORT_DYLIB_PATH",
            ));
        }
        Ok(Box::new(Prepared {
            config,
            model,
            library,
        }))
    }
}

struct Prepared {
    config: Config,
    model: Option<ModelDir>,
    library: Option<PathBuf>,
}

impl Stage for Prepared {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("embeddings")]
    }

    fn files(&self) -> Vec<NamedFile> {
        let mut files: Vec<NamedFile> = self
            .model
            .iter()
            .flat_map(|m| m.files())
            .map(|path| NamedFile::new("model", path))
            .collect();
        if let Some(m) = &self.model
            && self.config.backend == Backend::Onnx
            && let Some(onnx) = self.given_onnx_file(m)
        {
            files.push(NamedFile::new("onnx_file", onnx));
        }
        files
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.embed(ctx))
    }
}

fn invalid(e: impl std::fmt::Display) -> StageError {
    StageError::Invalid(e.to_string())
}

impl Prepared {
    /// The model directory's own ONNX file, when one is there and the config runs it.
    fn given_onnx_file(&self, model: &ModelDir) -> Option<PathBuf> {
        let file = model.path.join(&self.config.onnx_file);
        (self.config.onnx_weights == OnnxWeights::F32 && file.is_file()).then_some(file)
    }

    /// The model directory: from config, or the one a train stage wrote beside its `model` table.
    async fn model_dir(&self, ctx: &mut StageContext) -> Result<ModelDir, StageError> {
        let bound = ctx
            .inputs()
            .find(|i| i.role == "model")
            .map(|i| i.path.clone());
        match (&self.model, bound) {
            (Some(_), Some(_)) => Err(StageError::Invalid(
                "give `model` in the config or bind the input `model`, not both".into(),
            )),
            (None, None) => Err(StageError::Invalid(
                "no model: set `model` in the config or bind the input `model`".into(),
            )),
            (Some(m), None) => Ok(m.clone()),
            (None, Some(table_path)) => {
                let batches = ctx.read_input("model").await?;
                let row = batches
                    .iter()
                    .find(|b| b.num_rows() > 0)
                    .map(|b| columns::get::<StringArray>(b, "path").value(0).to_string())
                    .ok_or_else(|| invalid("input `model` has no rows"))?;
                let base = table_path.parent().unwrap_or(Path::new("."));
                ModelDir::open(&base.join(row)).map_err(invalid)
            }
        }
    }

    /// The embedder and the device it runs on (for the manifest).
    fn embedder(
        &self,
        model: &ModelDir,
        state: &Path,
    ) -> Result<(Box<dyn Embedder>, String), StageError> {
        let c = &self.config;
        let pooling = c.pooling.unwrap_or(model.pooling);
        let normalize = c.normalize.unwrap_or(model.normalize);
        let pad = model.tokenizer().map_err(invalid)?.pad_id();
        match c.backend {
            Backend::Candle => {
                let device = c.device.open().map_err(invalid)?;
                tracing::debug!("embedding on {}", device_label(&device));
                let bert = model.load_model(&device).map_err(invalid)?;
                Ok((
                    Box::new(CandleEmbedder::new(bert, pooling, normalize, pad)),
                    device_label(&device),
                ))
            }
            Backend::Onnx => {
                let onnx = match self.given_onnx_file(model) {
                    Some(file) => file,
                    None => {
                        // Export once per weights file and flavor; the state directory keeps
                        // it across runs.
                        let key = table::hash_file(&model.weights_path().map_err(invalid)?)?;
                        let ops = match c.onnx_weights {
                            OnnxWeights::F32 => OnnxOps::OnnxRuntime,
                            OnnxWeights::Int8 => OnnxOps::OnnxRuntimeInt8,
                        };
                        let onnx = state.join(format!("{}-{}.onnx", &key[..16], ops.tag()));
                        if !onnx.is_file() {
                            let bert = model.load_model(&Device::Cpu).map_err(invalid)?;
                            export_onnx(&bert, &onnx, ops).map_err(invalid)?;
                        }
                        onnx
                    }
                };
                let threads = c
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                let library = self.library.as_ref().expect("checked in prepare");
                let embedder = OrtEmbedder::open(
                    library,
                    &onnx,
                    model.config.hidden_size,
                    pooling,
                    normalize,
                    pad,
                    threads,
                )
                .map_err(invalid)?;
                Ok((Box::new(embedder), "cpu".to_string()))
            }
        }
    }

    async fn embed(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let (role, id_column) = match (ctx.has_input("corpus"), ctx.has_input("queries")) {
            (true, false) => ("corpus", "doc_id"),
            (false, true) => ("queries", "query_id"),
            _ => {
                return Err(invalid(
                    "bind exactly one of the inputs `corpus` and `queries`",
                ));
            }
        };
        let model = self.model_dir(ctx).await?;
        let state = ctx.state_dir()?.to_path_buf();
        let mut ids = Vec::new();
        let mut texts = Vec::new();
        for batch in ctx.read_input(role).await? {
            let id = columns::get::<StringArray>(&batch, id_column);
            let text = columns::get::<StringArray>(&batch, "text");
            let title = (role == "corpus").then(|| columns::get::<StringArray>(&batch, "title"));
            for i in 0..batch.num_rows() {
                ids.push(id.value(i).to_string());
                let body = match title {
                    Some(t) => passage_text(t.value(i), text.value(i)),
                    None => text.value(i).to_string(),
                };
                texts.push(format!("{}{body}", self.config.prefix));
            }
        }
        let max_len = self
            .config
            .max_length
            .or(model.max_seq_length)
            .unwrap_or(512)
            .min(model.config.max_position_embeddings);
        let mut tokenizer = model.tokenizer().map_err(invalid)?;
        let c = &self.config;
        let dim = model.config.hidden_size;
        let schema = table::schema("embeddings")?.arrow_with_dim(Some(dim as i32));
        let mut writer = ctx.create_table("embeddings", schema.clone())?;
        let bar = ctx.progress(Some(ids.len() as u64), role);
        let (embedder, device) = self.embedder(&model, &state)?;
        ctx.set_stat("device", device);
        let written = tokio::task::block_in_place(|| -> Result<usize, StageError> {
            let mut embedder = embedder;
            let mut tokens = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(4096) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                tokens.extend(tokenizer.encode_batch(&refs, max_len).map_err(invalid)?);
            }
            drop(texts);
            // Longest first: a batch that does not fit fails at once, not at the end.
            let mut order: Vec<usize> = (0..tokens.len()).collect();
            order.sort_by_key(|&i| (std::cmp::Reverse(tokens[i].len()), i));
            let mut start = 0;
            while start < order.len() {
                let longest = tokens[order[start]].len().max(1);
                let fit = (c.batch_tokens / longest).clamp(1, c.max_batch);
                let batch: Vec<usize> = order[start..(start + fit).min(order.len())].to_vec();
                let seqs: Vec<&[u32]> = batch.iter().map(|&i| tokens[i].as_slice()).collect();
                let vectors = with_threads(c.threads, || embedder.embed(&seqs)).map_err(invalid)?;
                let out = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        columns::utf8(batch.iter().map(|&i| ids[i].as_str())),
                        columns::vectors(vectors, dim),
                    ],
                )
                .expect("columns follow the embeddings kind");
                writer.write(&out)?;
                bar.inc(batch.len() as u64);
                start += batch.len();
            }
            Ok(order.len())
        })?;
        bar.finish_and_clear();
        ctx.set_stat("texts", written as u64);
        ctx.set_stat("backend", format!("{:?}", c.backend).to_lowercase());
        ctx.finish_table(writer)
    }
}
