//! `train`: tokenized training lists -> a trained encoder (a Hugging Face model directory beside
//! the `model` table) and a `train_log`. Checkpoints in the stage's state directory let a killed
//! run resume where it stopped, with the same result as an uninterrupted run.

mod lists;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::RecordBatch;
use futures::future::BoxFuture;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::encoder::{
    DeviceChoice, ModelDir, OnnxOps, Pooling, Precision, device_label, export_onnx,
};
use crate::loss::LossKind;
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::stages::{blocking, with_threads};
use crate::table::{self, columns};
use crate::train::{
    AdamWConfig, Decay, Schedule, StepStats, TrainConfig, TrainGroup, Trainer, Warmup,
    warmup_steps_for_ratio, write_synced,
};
use lists::{ListsBuilder, TrainLists};

pub(crate) struct Train;

const INPUTS: &[InputRole] = &[InputRole {
    name: "tokens",
    kind: Some("tokens"),
    required: true,
}];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The base model directory.
    model: String,
    #[serde(default = "default_loss")]
    loss: LossKind,
    #[serde(default = "one")]
    temperature: f64,
    #[serde(default = "yes")]
    in_batch_negatives: bool,
    /// Default: the model directory's (sentence-transformers) pooling.
    #[serde(default)]
    pooling: Option<Pooling>,
    /// Default: whether the model directory normalizes.
    #[serde(default)]
    normalize: Option<bool>,
    /// Training groups (queries) per loss computation: the loss's in-batch negatives and, for
    /// Wasserstein, its Gaussians span them all.
    batch_size: usize,
    /// GradCache chunks: embed this many groups at a time (memory of one chunk's activations,
    /// gradients of the whole batch's loss). Default: the whole batch at once.
    #[serde(default)]
    chunk_size: Option<usize>,
    #[serde(default = "one_usize")]
    grad_accumulation: usize,
    #[serde(default = "one_usize")]
    epochs: usize,
    /// Stop after this many optimizer steps (default: all epochs).
    #[serde(default)]
    max_steps: Option<u64>,
    lr: f64,
    #[serde(default)]
    warmup: Warmup,
    #[serde(default)]
    warmup_steps: Option<u64>,
    #[serde(default)]
    warmup_ratio: Option<f64>,
    #[serde(default)]
    decay: Decay,
    #[serde(default = "default_betas")]
    betas: [f64; 2],
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default)]
    max_grad_norm: Option<f64>,
    /// Dropout during training (the model's probabilities); off trains in evaluation mode.
    #[serde(default = "yes")]
    dropout: bool,
    #[serde(default)]
    seed: u64,
    /// Save a resumable checkpoint every N steps (0: only at the end).
    #[serde(default)]
    checkpoint_every: u64,
    /// Also write model.onnx into the model directory (for the `embed` stage's onnx backend).
    #[serde(default)]
    export_onnx: bool,
    /// Token ids of the `tokens` table up to this many MiB are held in memory; more are
    /// written to an unlinked file in the stage's state directory and mapped. Not part of the
    /// run key: where the ids are kept does not change the training.
    #[serde(default = "default_tokens_in_memory_mb", skip_serializing)]
    tokens_in_memory_mb: u64,
    /// Worker threads for the tensor engine (default: all cores).
    #[serde(default)]
    threads: Option<usize>,
    /// `auto` (default: the GPU when the build has CUDA and one answers), `cpu`, `cuda:N`.
    /// Not part of the run key: a checkpoint written on one device resumes on another.
    #[serde(default, skip_serializing)]
    device: DeviceChoice,
    /// `f32` (default, the reference's) or `bf16`: the precision of the encoder's matrix
    /// products; master weights, norms, softmax and the loss stay f32. Part of the run key
    /// (left out when f32, so older keys still match).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    precision: Precision,
}

fn default_loss() -> LossKind {
    LossKind::Wasserstein
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_tokens_in_memory_mb() -> u64 {
    4096
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

impl StageKind for Train {
    fn kind(&self) -> &'static str {
        "train"
    }
    /// 2: epochs of the `tokens` table; warmup steps of a ratio rounded up. 3: dropout masks
    /// drawn anew (per call key and stream; attention's per sequence and head).
    fn version(&self) -> u32 {
        3
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
        for (field, bad) in [
            ("batch_size", config.batch_size == 0),
            ("grad_accumulation", config.grad_accumulation == 0),
            ("epochs", config.epochs == 0),
            ("lr", !config.lr.is_finite() || config.lr <= 0.0),
            (
                "temperature",
                config.temperature.is_nan() || config.temperature <= 0.0,
            ),
            ("threads", config.threads == Some(0)),
            ("chunk_size", config.chunk_size == Some(0)),
            (
                "warmup_ratio",
                config
                    .warmup_ratio
                    .is_some_and(|r| !(0.0..=1.0).contains(&r)),
            ),
        ] {
            if bad {
                return Err(ConfigError::new(field, "out of range"));
            }
        }
        if config.warmup_steps.is_some() && config.warmup_ratio.is_some() {
            return Err(ConfigError::new(
                "warmup_ratio",
                "give warmup_steps or warmup_ratio, not both",
            ));
        }
        if config.loss == LossKind::Wasserstein
            && config.in_batch_negatives
            && config.batch_size < 2
        {
            return Err(ConfigError::new(
                "batch_size",
                "the Wasserstein loss fits Gaussians over the batch: use at least 2",
            ));
        }
        config
            .device
            .check()
            .map_err(|e| ConfigError::new("device", e.to_string()))?;
        if config.precision == Precision::F16 {
            return Err(ConfigError::new(
                "precision",
                "f16 training needs loss scaling, which synthrank does not do: use bf16 \
                 (same speed on GPUs that have it, f32's range)",
            ));
        }
        let model_path = clean_path(&base_dir.join(&config.model));
        let model =
            ModelDir::open(&model_path).map_err(|e| ConfigError::new("model", e.to_string()))?;
        Ok(Box::new(TrainStage { config, model }))
    }
}

struct TrainStage {
    config: Config,
    model: ModelDir,
}

impl Stage for TrainStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![
            OutputDecl::of_kind("train_log"),
            OutputDecl::of_kind("model"),
        ]
    }

    fn files(&self) -> Vec<NamedFile> {
        self.model
            .files()
            .into_iter()
            .map(|path| NamedFile::new("model", path))
            .collect()
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.train(ctx))
    }

    fn state_summary(&self, state_dir: &Path, _: u64) -> Option<String> {
        let latest = checkpoints(state_dir).into_iter().next()?;
        let state = std::fs::read_to_string(latest.join("trainer_state.json")).ok()?;
        let step = serde_json::from_str::<serde_json::Value>(&state).ok()?["step"].as_u64()?;
        Some(format!("checkpoint at step {step}"))
    }

    /// The model is committed: the checkpoints (weights and moments, three times the model's
    /// size) and the step log are no longer needed. Failing to remove them loses nothing.
    fn release_state(&self, state_dir: &Path) {
        for path in [state_dir.join(CHECKPOINTS), state_dir.join(LOG)] {
            if let Err(e) = remove_path(&path) {
                tracing::warn!(path = %path.display(), "could not remove finished training state: {e}");
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LogRow {
    step: u64,
    epoch: u32,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    samples_per_s: f64,
}

impl TrainStage {
    fn train_config(&self, total_steps: u64) -> TrainConfig {
        let c = &self.config;
        let warmup_steps = c
            .warmup_steps
            .or(c
                .warmup_ratio
                .map(|r| warmup_steps_for_ratio(r, total_steps)))
            .unwrap_or(0);
        TrainConfig {
            loss: c.loss,
            temperature: c.temperature,
            in_batch_negatives: c.in_batch_negatives,
            pooling: c.pooling.unwrap_or(self.model.pooling),
            normalize: c.normalize.unwrap_or(self.model.normalize),
            dropout: c.dropout,
            adamw: AdamWConfig {
                beta1: c.betas[0],
                beta2: c.betas[1],
                eps: c.eps,
                weight_decay: c.weight_decay,
            },
            schedule: Schedule {
                lr: c.lr,
                warmup: c.warmup,
                warmup_steps,
                decay: c.decay,
                total_steps,
            },
            max_grad_norm: c.max_grad_norm,
            seed: c.seed,
            chunk_size: c.chunk_size,
        }
    }

    /// Steps per epoch of the table and steps in all, from the groups and the config.
    fn step_plan(&self, lists: usize) -> Result<(u64, u64), StageError> {
        let c = &self.config;
        let per_step = c.batch_size * c.grad_accumulation;
        let steps_per_epoch = (lists / per_step) as u64;
        if steps_per_epoch == 0 {
            return Err(StageError::data(
                "tokens",
                None,
                format!(
                    "{lists} training groups are fewer than one step's batch_size x grad_accumulation = {per_step}"
                ),
            ));
        }
        let total = steps_per_epoch * c.epochs as u64;
        Ok((
            steps_per_epoch,
            c.max_steps.map_or(total, |max| total.min(max)),
        ))
    }

    /// A checkpoint belongs to one (config, input, base weights) triple; anything else starts
    /// over (base weights replaced under the same path included).
    fn run_key(&self, tokens_path: &Path) -> Result<String, StageError> {
        let config = serde_json::to_string(&self.config).expect("config serializes");
        Ok(format!(
            "{}:{}:{}",
            blake3::hash(config.as_bytes()),
            table::hash_file(tokens_path)?,
            table::hash_file(&self.model.weights_path()?)?
        ))
    }

    /// The `tokens` table's lists, read a record batch at a time.
    async fn read_lists(&self, ctx: &mut StageContext) -> Result<TrainLists, StageError> {
        let memory_limit = self.config.tokens_in_memory_mb << 20;
        let mut builder = ListsBuilder::new(memory_limit, ctx.state_dir()?);
        let mut input = ctx.stream_input("tokens").await?;
        while let Some(batch) = input.next().await? {
            builder.add(&batch)?;
        }
        let lists = builder.finish()?;
        ctx.set_stat("tokens_mapped_bytes", lists.mapped_bytes());
        Ok(lists)
    }

    async fn train(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let tokens_path = ctx
            .inputs()
            .find(|i| i.role == "tokens")
            .map(|i| i.path.clone())
            .expect("required input");
        let lists = self.read_lists(ctx).await?;
        let groups = lists.lists();
        let (steps_per_epoch, total_steps) = self.step_plan(groups)?;
        let run = TrainingRun {
            lists,
            steps_per_epoch,
            total_steps,
            config: self.config.clone(),
            train_config: self.train_config(total_steps),
            model_dir: self.model.clone(),
            state: ctx.state_dir()?.to_path_buf(),
            run_key: self.run_key(&tokens_path)?,
            model_out: ctx.output_path("model")?,
            bar: ctx.progress(Some(total_steps), "steps"),
        };
        let bar = run.bar.clone();
        let model_out = run.model_out.clone();
        // Training holds a core (or the GPU) for minutes: off the async workers.
        let outcome = blocking(move || run.run()).await?;
        bar.finish_and_clear();
        tracing::debug!(steps = outcome.steps, "training finished");

        let log = &outcome.log;
        let schema = table::schema("train_log")?.arrow();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::int64(log.iter().map(|r| r.step as i64)),
                columns::int32(log.iter().map(|r| r.epoch as i32)),
                columns::float64(log.iter().map(|r| r.loss)),
                columns::float64(log.iter().map(|r| r.lr)),
                columns::float64(log.iter().map(|r| r.grad_norm)),
                columns::float64(log.iter().map(|r| r.samples_per_s)),
            ],
        )
        .expect("columns follow the train_log kind");
        ctx.write_table("train_log", schema, &[batch])?;

        let weights = table::hash_file(&model_out.join("model.safetensors"))?;
        let schema = table::schema("model")?.arrow();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(["model"]),
                columns::utf8([weights.as_str()]),
                columns::utf8([self.config.model.as_str()]),
                columns::int64([outcome.steps as i64]),
            ],
        )
        .expect("columns follow the model kind");
        ctx.set_stat("steps", outcome.steps);
        ctx.set_stat("device", outcome.device);
        ctx.set_stat("precision", self.config.precision.name());
        ctx.set_stat("resumed_from_step", outcome.resumed_from);
        ctx.set_stat("groups", groups as u64);
        if let Some(last) = log.last() {
            ctx.set_stat("final_loss", last.loss);
        }
        ctx.write_table("model", schema, &[batch])
    }
}

/// Everything the training loop needs, owned, so it runs on a blocking thread.
struct TrainingRun {
    lists: TrainLists,
    steps_per_epoch: u64,
    total_steps: u64,
    config: Config,
    train_config: TrainConfig,
    model_dir: ModelDir,
    state: PathBuf,
    run_key: String,
    model_out: PathBuf,
    bar: indicatif::ProgressBar,
}

struct TrainingOutcome {
    log: Vec<LogRow>,
    steps: u64,
    resumed_from: u64,
    device: String,
}

impl TrainingRun {
    fn run(self) -> Result<TrainingOutcome, StageError> {
        let c = &self.config;
        let device = c.device.open()?;
        let _span = tracing::debug_span!("training", device = %device_label(&device)).entered();
        let model = self
            .model_dir
            .load_model(&device)?
            .with_precision(c.precision);
        let pad = self.model_dir.tokenizer()?.pad_id();
        let mut trainer = Trainer::new(model, self.train_config, pad)?;
        let mut log = resume(&mut trainer, &self.state, &self.run_key)?;
        let resumed_from = trainer.steps();
        self.bar.set_position(resumed_from);
        let mut order = EpochOrder::new(c.seed);
        while trainer.steps() < self.total_steps {
            let step = trainer.steps();
            let epoch = step / self.steps_per_epoch;
            // Epoch e trains on the table's lists for e, cycling through its epochs.
            let table_epoch = epoch as usize % self.lists.epochs();
            let order = order.of(epoch, self.lists.lists());
            let micro = self.micro_batches(table_epoch, order, step);
            let refs: Vec<&[TrainGroup]> = micro.iter().map(Vec::as_slice).collect();
            let started = Instant::now();
            let stats: StepStats = with_threads(c.threads, || trainer.step(&refs))?;
            let row = LogRow {
                step: stats.step,
                epoch: epoch as u32,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                samples_per_s: refs.iter().map(|m| m.len()).sum::<usize>() as f64
                    / started.elapsed().as_secs_f64(),
            };
            append_log(&self.state, &row)?;
            self.bar.set_message(format!("loss {:.4}", row.loss));
            self.bar.inc(1);
            log.push(row);
            let done = trainer.steps() == self.total_steps;
            if done || (c.checkpoint_every > 0 && trainer.steps() % c.checkpoint_every == 0) {
                save_checkpoint(&trainer, &self.state, &self.run_key)?;
            }
        }
        self.save_model(&trainer)?;
        Ok(TrainingOutcome {
            log,
            steps: trainer.steps(),
            resumed_from,
            device: device_label(&device),
        })
    }

    /// The step's groups, split into its accumulation micro-batches.
    fn micro_batches(
        &self,
        table_epoch: usize,
        order: &[usize],
        step: u64,
    ) -> Vec<Vec<TrainGroup>> {
        let c = &self.config;
        let per_step = c.batch_size * c.grad_accumulation;
        let first = ((step % self.steps_per_epoch) as usize) * per_step;
        order[first..first + per_step]
            .chunks(c.batch_size)
            .map(|idx| {
                idx.iter()
                    .map(|&i| self.lists.group(table_epoch, i))
                    .collect()
            })
            .collect()
    }

    fn save_model(&self, trainer: &Trainer) -> Result<(), StageError> {
        let config = &self.train_config;
        self.model_dir.save(
            trainer.model(),
            &self.model_out,
            config.pooling,
            config.normalize,
            self.model_dir.max_seq_length.unwrap_or(512),
        )?;
        if self.config.export_onnx {
            export_onnx(
                trainer.model(),
                &self.model_out.join("model.onnx"),
                OnnxOps::OnnxRuntime,
            )?;
        }
        Ok(())
    }
}

/// The shuffled order of an epoch's groups: a function of (seed, epoch) alone, so a resumed
/// run sees the order an uninterrupted one did.
struct EpochOrder {
    seed: u64,
    epoch: Option<u64>,
    order: Vec<usize>,
}

impl EpochOrder {
    fn new(seed: u64) -> EpochOrder {
        EpochOrder {
            seed,
            epoch: None,
            order: Vec::new(),
        }
    }

    fn of(&mut self, epoch: u64, groups: usize) -> &[usize] {
        if self.epoch != Some(epoch) {
            self.order = (0..groups).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch);
            self.order.shuffle(&mut rng);
            self.epoch = Some(epoch);
        }
        &self.order
    }
}

/// Complete checkpoints live in `STATE/checkpoints/step-NNNNNNNNNN/`, each with the run key it
/// belongs to inside; one is written beside the last under a hidden name and renamed into
/// place when complete, so a kill at any moment leaves the previous checkpoint usable.
const CHECKPOINTS: &str = "checkpoints";
const RUN_KEY: &str = "run_key";
const LOG: &str = "train_log.jsonl";

/// The complete checkpoints under `state`, newest first.
fn checkpoints(state: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(state.join(CHECKPOINTS))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs
}

fn save_checkpoint(trainer: &Trainer, state: &Path, run_key: &str) -> Result<(), StageError> {
    let root = state.join(CHECKPOINTS);
    let name = format!("step-{:010}", trainer.steps());
    let partial = root.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(StageError::io(&partial))?;
    }
    trainer.save_checkpoint(&partial)?;
    write_synced(&partial.join(RUN_KEY), run_key.as_bytes()).map_err(StageError::io(&partial))?;
    let done = root.join(&name);
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(StageError::io(&done))?;
    }
    std::fs::rename(&partial, &done).map_err(StageError::io(&done))?;
    std::fs::File::open(&root)
        .and_then(|d| d.sync_all())
        .map_err(StageError::io(&root))?;
    tracing::debug!(step = trainer.steps(), path = %done.display(), "checkpoint saved");
    // Older checkpoints go only once the new one is in place.
    for old in checkpoints(state).into_iter().filter(|d| *d != done) {
        std::fs::remove_dir_all(&old).map_err(StageError::io(&old))?;
    }
    Ok(())
}

/// Restores the newest checkpoint of this run (same config, input and base weights) and the
/// log up to it; otherwise clears stale state and starts from step 0.
fn resume(trainer: &mut Trainer, state: &Path, run_key: &str) -> Result<Vec<LogRow>, StageError> {
    let log_path = state.join(LOG);
    let ours = checkpoints(state)
        .into_iter()
        .find(|d| std::fs::read_to_string(d.join(RUN_KEY)).is_ok_and(|k| k == run_key));
    let Some(dir) = ours else {
        for path in [state.join(CHECKPOINTS), log_path] {
            remove_path(&path).map_err(StageError::io(&path))?;
        }
        return Ok(Vec::new());
    };
    let step = trainer.load_checkpoint(&dir)?;
    tracing::info!("resuming training from the checkpoint at step {step}");
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    // Steps logged after the checkpoint are redone; a torn last line is dropped. The kept
    // lines replace the log atomically.
    let log: Vec<LogRow> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<LogRow>(l).ok())
        .filter(|r| r.step <= step)
        .collect();
    let kept: String = log
        .iter()
        .map(|row| serde_json::to_string(row).expect("serializes") + "\n")
        .collect();
    let tmp = state.join(format!("{LOG}.tmp"));
    write_synced(&tmp, kept.as_bytes()).map_err(StageError::io(&tmp))?;
    std::fs::rename(&tmp, &log_path).map_err(StageError::io(&log_path))?;
    Ok(log)
}

/// Removes a file or a directory tree; one that does not exist is already removed.
fn remove_path(path: &Path) -> std::io::Result<()> {
    let removed = match path.is_dir() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn append_log(state: &Path, row: &LogRow) -> Result<(), StageError> {
    let path = state.join(LOG);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(StageError::io(&path))?;
    writeln!(file, "{}", serde_json::to_string(row).expect("serializes"))
        .map_err(StageError::io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run reads the log rows before its checkpoint back from JSON: they must be the
    /// exact numbers written, or its `train_log` differs from an uninterrupted run's. (This
    /// gradient norm came back one ulp off from serde_json's default float parser.)
    #[test]
    fn log_rows_round_trip_exactly_through_json() {
        for grad_norm in [10.045_893_788_382_985, 7.919_246_626_792_002_5, 1e-300, 0.1] {
            let row = LogRow {
                step: 1,
                epoch: 0,
                loss: 0.312_425_961_496_295_03,
                lr: 0.000_037_500_000_000_000_003,
                grad_norm,
                samples_per_s: 3.0,
            };
            let back: LogRow = serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
            assert_eq!(back.grad_norm.to_bits(), grad_norm.to_bits(), "{grad_norm}");
            assert_eq!(back.lr.to_bits(), row.lr.to_bits());
        }
    }
}
