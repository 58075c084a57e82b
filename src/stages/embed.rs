//! `embed`: corpus or queries + a model -> embeddings. Texts are read in windows; each window is
//! tokenized, sorted by length and packed into batches under a token budget (padding stays
//! small), and written as it is embedded, so memory is bounded by one window. Backends: candle (the training encoder) or
//! ONNX Runtime (an .onnx export; synthrank exports its own models on demand).

use std::path::{Path, PathBuf};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use candle_core::Device;
use futures::future::BoxFuture;
use indicatif::ProgressBar;
use serde::Deserialize;

use crate::encoder::{
    CandleEmbedder, DeviceChoice, Embedder, ModelDir, OnnxOps, OrtEmbedder, Pooling, Precision,
    TextTokenizer, device_label, export_onnx,
};
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::stages::tokenize::passage_text;
use crate::stages::{blocking, with_threads};
use crate::table::{self, TableWriter, columns};

pub(crate) struct Embed;

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
    /// `auto` (default), `cpu`, `cuda:N`: where the encoder runs (the onnx backend on a GPU
    /// through ONNX Runtime's CUDA provider).
    #[serde(default)]
    device: DeviceChoice,
    /// The candle backend's matrix products: `f32` (default), `f16` or `bf16` (GPUs).
    #[serde(default)]
    precision: Precision,
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
        // ONNX Runtime brings its own CUDA (the onnxruntime-gpu library): only candle needs a
        // synthrank built with it.
        if config.backend == Backend::Candle {
            config
                .device
                .check()
                .map_err(|e| ConfigError::new("device", e.to_string()))?;
        }
        if config.backend == Backend::Onnx && !config.precision.is_f32() {
            return Err(ConfigError::new(
                "precision",
                "the onnx backend runs the export's own precision: f32, or `onnx_weights: int8`",
            ));
        }
        if config.backend == Backend::Onnx && library.is_none() {
            return Err(ConfigError::new(
                "onnxruntime",
                "the onnx backend needs libonnxruntime: set `onnxruntime` or ORT_DYLIB_PATH",
            ));
        }
        Ok(Box::new(EmbedStage {
            config,
            model,
            library,
        }))
    }
}

struct EmbedStage {
    config: Config,
    model: Option<ModelDir>,
    library: Option<PathBuf>,
}

impl Stage for EmbedStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("embeddings")]
    }

    fn files(&self) -> Vec<NamedFile> {
        let mut files: Vec<NamedFile> = self
            .model
            .iter()
            .flat_map(ModelDir::files)
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

impl EmbedStage {
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
            (Some(_), Some(_)) => Err(StageError::config(
                "model",
                "give `model` in the config or bind the input `model`, not both",
            )),
            (None, None) => Err(StageError::config(
                "model",
                "no model: set `model` in the config or bind the input `model`",
            )),
            (Some(m), None) => Ok(m.clone()),
            (None, Some(table_path)) => {
                let batches = ctx.read_input("model").await?;
                let row = batches
                    .iter()
                    .find(|b| b.num_rows() > 0)
                    .map(|b| columns::get::<StringArray>(b, "path").value(0).to_string())
                    .ok_or_else(|| StageError::data("model", None, "no rows"))?;
                let base = table_path.parent().unwrap_or(Path::new("."));
                Ok(ModelDir::open(&base.join(row))?)
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
        let pad = model.tokenizer()?.pad_id();
        match c.backend {
            Backend::Candle => {
                let device = c.device.open()?;
                tracing::debug!("embedding on {}", device_label(&device));
                let bert = model.load_model(&device)?.with_precision(c.precision);
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
                        let key = table::hash_file(&model.weights_path()?)?;
                        let ops = match c.onnx_weights {
                            OnnxWeights::F32 => OnnxOps::OnnxRuntime,
                            OnnxWeights::Int8 => OnnxOps::OnnxRuntimeInt8,
                        };
                        let onnx = state.join(format!("{}-{}.onnx", &key[..16], ops.tag()));
                        if !onnx.is_file() {
                            if !link_sibling_export(state, &onnx) {
                                let bert = model.load_model(&Device::Cpu)?;
                                export_onnx(&bert, &onnx, ops)?;
                            }
                            remove_stale_exports(state, &onnx, ops);
                        }
                        onnx
                    }
                };
                let threads = c.threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
                });
                let library = self.library.as_ref().expect("checked in prepare");
                let embedder = OrtEmbedder::open(
                    library,
                    &onnx,
                    model.config.hidden_size,
                    pooling,
                    normalize,
                    pad,
                    threads,
                    c.device,
                )?;
                let device = embedder.device().to_string();
                Ok((Box::new(embedder), device))
            }
        }
    }

    async fn embed(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let (role, id_column) = match (ctx.has_input("corpus"), ctx.has_input("queries")) {
            (true, false) => ("corpus", "doc_id"),
            (false, true) => ("queries", "query_id"),
            _ => {
                return Err(StageError::config(
                    "inputs",
                    "bind exactly one of the inputs `corpus` and `queries`",
                ));
            }
        };
        let model = self.model_dir(ctx).await?;
        let state = ctx.state_dir()?.to_path_buf();
        let c = &self.config;
        let dim = model.config.hidden_size;
        let schema = table::schema("embeddings")?.arrow_with_dim(Some(dim as i32));
        let (embedder, device) = self.embedder(&model, &state)?;
        ctx.set_stat("device", device);
        let mut window = Window {
            max_len: c
                .max_length
                .or(model.max_seq_length)
                .unwrap_or(512)
                .min(model.config.max_position_embeddings),
            batch_tokens: c.batch_tokens,
            max_batch: c.max_batch,
            threads: c.threads,
            tokenizer: model.tokenizer()?,
            embedder,
            writer: ctx.create_table("embeddings", schema.clone())?,
            schema,
            bar: ctx.progress(ctx.input_rows(role), role),
            ids: Vec::new(),
            texts: Vec::new(),
        };
        // The model is loaded: what follows is the encoding rate users compare.
        let started = std::time::Instant::now();
        let mut input = ctx.stream_input(role).await?;
        let mut written = 0;
        while let Some(batch) = input.next().await? {
            let id = columns::get::<StringArray>(&batch, id_column);
            let text = columns::get::<StringArray>(&batch, "text");
            let title = (role == "corpus").then(|| columns::get::<StringArray>(&batch, "title"));
            for i in 0..batch.num_rows() {
                window.ids.push(id.value(i).to_string());
                let body = match title {
                    Some(t) => passage_text(t.value(i), text.value(i)),
                    None => text.value(i).to_string(),
                };
                window.texts.push(format!("{}{body}", c.prefix));
            }
            if window.texts.len() >= WINDOW {
                written += window.texts.len();
                window = blocking(move || window.embed()).await?;
            }
        }
        written += window.texts.len();
        let window = blocking(move || window.embed()).await?;
        window.bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        ctx.set_stat("texts", written as u64);
        ctx.set_stat("encode_s", seconds);
        ctx.set_stat("texts_per_s", written as f64 / seconds.max(1e-9));
        ctx.set_stat("backend", format!("{:?}", c.backend).to_lowercase());
        ctx.finish_table(window.writer)
    }
}

/// Texts embedded at a time: memory is bounded by one window's texts and token ids, and
/// sorting within it by length keeps padding small.
const WINDOW: usize = 16_384;

/// The embedding work of the stage: the texts read but not yet embedded, and what embeds and
/// writes them (moved to a blocking thread and back, one window at a time).
struct Window {
    max_len: usize,
    batch_tokens: usize,
    max_batch: usize,
    threads: Option<usize>,
    tokenizer: TextTokenizer,
    embedder: Box<dyn Embedder>,
    writer: TableWriter,
    schema: SchemaRef,
    bar: ProgressBar,
    ids: Vec<String>,
    texts: Vec<String>,
}

impl Window {
    /// Embeds and writes the window's texts, longest first (a batch that does not fit fails at
    /// once), in batches of at most `batch_tokens` padded tokens.
    fn embed(mut self) -> Result<Window, StageError> {
        let texts = std::mem::take(&mut self.texts);
        tracing::debug!(texts = texts.len(), "embedding a window");
        let ids = std::mem::take(&mut self.ids);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = self.tokenizer.encode_batch(&refs, self.max_len)?;
        drop(texts);
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(tokens[i].len()), i));
        let dim = self.embedder.dim();
        let mut start = 0;
        while start < order.len() {
            let longest = tokens[order[start]].len().max(1);
            let fit = (self.batch_tokens / longest).clamp(1, self.max_batch);
            tracing::trace!(texts = fit, longest, "embedding batch");
            let batch = &order[start..(start + fit).min(order.len())];
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| tokens[i].as_slice()).collect();
            let embedder = &mut self.embedder;
            let vectors = with_threads(self.threads, || embedder.embed(&seqs))?;
            let out = RecordBatch::try_new(
                self.schema.clone(),
                vec![
                    columns::utf8(batch.iter().map(|&i| ids[i].as_str())),
                    columns::vectors(vectors, dim),
                ],
            )
            .expect("columns follow the embeddings kind");
            self.writer.write(&out)?;
            self.bar.inc(batch.len() as u64);
            start += batch.len();
        }
        Ok(self)
    }
}

/// Links in another embed stage's export of the same weights and flavor, if one exists: the
/// stages embedding a corpus and its queries with one model (or a model across many datasets)
/// share one file on disk and export it once. Exports are renamed into place whole, so any
/// file under the name is complete. True if one was linked.
fn link_sibling_export(state: &Path, onnx: &Path) -> bool {
    let (Some(root), Some(name)) = (state.parent(), onnx.file_name()) else {
        return false;
    };
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p != onnx && p.is_file())
        .any(|p| std::fs::hard_link(&p, onnx).is_ok())
}

/// Exports of the same flavor for other weights (an earlier base or trained model) would
/// otherwise pile up, one model-sized file per retraining: only `current` is kept.
fn remove_stale_exports(state: &Path, current: &Path, ops: OnnxOps) {
    let suffix = format!("-{}.onnx", ops.tag());
    let stale = std::fs::read_dir(state)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p != current && p.to_string_lossy().ends_with(&suffix));
    for path in stale {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "could not remove a stale ONNX export: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_export_of_a_flavor_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "aaaa-ort.onnx",
            "bbbb-ort.onnx",
            "aaaa-ort-int8.onnx",
            "journal.jsonl",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let current = dir.path().join("bbbb-ort.onnx");
        remove_stale_exports(dir.path(), &current, OnnxOps::OnnxRuntime);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["aaaa-ort-int8.onnx", "bbbb-ort.onnx", "journal.jsonl"]
        );
    }
}
