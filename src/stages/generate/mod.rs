//! `generate`: prompts -> LLM answers (journaled) -> generations, graded_docs and rejects.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Int32Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

mod batch;

use batch::{BatchApiConfig, BatchFiles, import_batch};

use crate::llm::{
    Answered, ChatBackend, ChatRequest, ChatResponse, EmbeddedBackend, EmbeddedOptions,
    GradedPassage, Journal, JournalEntry, JournalIndex, LlmError, Message, OpenAiBackend,
    OpenAiConfig, ParseError, RequestFile, RetryPolicy, Secret, StructuredOutput,
    graded_passages_schema, parse_all_levels, parse_single_level,
};
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, NamedFile, OutputDecl, Stage, StageContext, StageError,
    StageKind, parse_config,
};
use crate::spec::clean_path;
use crate::table::{self, columns};

pub(crate) struct Generate;

const INPUTS: &[InputRole] = &[InputRole {
    name: "prompts",
    kind: Some("prompts"),
    required: true,
}];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_backend")]
    backend: BackendKind,
    /// Base URLs of OpenAI-compatible servers (`http://host:8000/v1`); requests are spread
    /// over them.
    #[serde(default)]
    endpoints: Vec<String>,
    /// The GGUF chat model the embedded backend runs.
    #[serde(default)]
    model_file: Option<String>,
    /// Responses recorded earlier (a journal file): requests they answer are not sent again.
    #[serde(default)]
    recorded_journal: Option<String>,
    model: String,
    /// The environment variable holding the API key (never the key itself).
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    /// Requests in flight at once (with the embedded backend: sequences decoded together).
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    /// Threads the embedded model runs on (default: every core).
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default = "default_timeout")]
    timeout_s: f64,
    #[serde(default = "default_retries")]
    max_retries: u32,
    /// Base of the exponential backoff between retries.
    #[serde(default = "default_backoff")]
    backoff_s: f64,
    #[serde(default)]
    requests_per_second: Option<f64>,
    /// The levels an all-levels answer must contain.
    #[serde(default = "crate::stages::default_levels")]
    levels: Vec<i32>,
    /// How all-levels answers are constrained to the JSON the parser reads (openai backend):
    /// `json_schema` (default), `guided_json` (older vLLM) or `none`.
    #[serde(default)]
    structured_output: StructuredOutput,
    /// Stop sending once the journal's answers total this many tokens (prompt + completion);
    /// requests already in flight finish.
    #[serde(default)]
    max_total_tokens: Option<u64>,
    /// Prices per million tokens, for the cost shown by `status` and recorded in the manifest.
    #[serde(default)]
    price_per_mtok: Option<Price>,
    /// Offline batches instead of HTTP requests: the pending requests are written to `input`
    /// in the OpenAI Batch format (what vLLM's `run_batch` reads) and the answers read back
    /// from `output` when it exists.
    #[serde(default)]
    batch_files: Option<BatchFiles>,
    /// The OpenAI Batch API at the first endpoint instead of one request per prompt.
    #[serde(default)]
    batch_api: Option<BatchApiConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    prompt: f64,
    completion: f64,
}

/// Tokens bought, and what they cost at a price.
#[derive(Debug, Default, Clone, Copy)]
struct Spend {
    prompt: u64,
    completion: u64,
}

impl Spend {
    fn add(&mut self, response: &ChatResponse) {
        self.prompt += response.prompt_tokens;
        self.completion += response.completion_tokens;
    }

    fn cost(&self, price: Price) -> f64 {
        (self.prompt as f64 * price.prompt + self.completion as f64 * price.completion) / 1e6
    }

    fn describe(&self, price: Option<Price>) -> String {
        let mut text = format!(
            "{} prompt + {} completion tokens",
            self.prompt, self.completion
        );
        if let Some(price) = price {
            text.push_str(&format!(" (${:.4})", self.cost(price)));
        }
        text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BackendKind {
    /// Any OpenAI-compatible /v1/chat/completions server.
    Openai,
    /// A GGUF chat model run in-process on the CPU.
    Embedded,
}

fn default_backend() -> BackendKind {
    BackendKind::Openai
}

fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    0.5
}

impl StageKind for Generate {
    fn kind(&self) -> &'static str {
        "generate"
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
        let model_file = config
            .model_file
            .as_ref()
            .map(|f| clean_path(&base_dir.join(f)));
        let recorded = config
            .recorded_journal
            .as_ref()
            .map(|f| clean_path(&base_dir.join(f)));
        match config.backend {
            BackendKind::Openai if config.endpoints.is_empty() && config.batch_files.is_none() => {
                return Err(ConfigError::new("endpoints", "list at least one endpoint"));
            }
            BackendKind::Embedded if model_file.is_none() => {
                return Err(ConfigError::new(
                    "model_file",
                    "the embedded backend needs a GGUF model file",
                ));
            }
            _ => {}
        }
        if config.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1"));
        }
        if config.threads == Some(0) {
            return Err(ConfigError::new("threads", "must be at least 1"));
        }
        check_seconds("timeout_s", config.timeout_s, false)?;
        if let Some(p) = config.price_per_mtok
            && !(p.prompt >= 0.0 && p.completion >= 0.0 && (p.prompt + p.completion).is_finite())
        {
            return Err(ConfigError::new(
                "price_per_mtok",
                "prices are non-negative numbers (per million tokens)",
            ));
        }
        check_seconds("backoff_s", config.backoff_s, true)?;
        if let Some(rps) = config.requests_per_second {
            // One request per interval: the interval must be a duration too.
            check_seconds("requests_per_second", 1.0 / rps, false)
                .map_err(|_| ConfigError::new("requests_per_second", RATE_RANGE))?;
        }
        batch::check_config(&config)?;
        let batch_files = config.batch_files.as_ref().map(|b| BatchFiles {
            input: clean_path(&base_dir.join(&b.input)),
            output: clean_path(&base_dir.join(&b.output)),
        });
        Ok(Box::new(GenerateStage {
            config,
            model_file,
            recorded,
            batch_files,
        }))
    }
}

/// The longest duration a field may ask for: a week.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
const RATE_RANGE: &str =
    "must be a number of requests per second between 1/604800 (one a week) and infinity";

/// A duration field: finite, positive (or zero where `zero_ok`), at most a week.
fn check_seconds(field: &str, seconds: f64, zero_ok: bool) -> Result<(), ConfigError> {
    let positive = seconds > 0.0 || (zero_ok && seconds == 0.0);
    if positive && seconds <= MAX_SECONDS {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "must be a number of seconds {} 0 and at most {MAX_SECONDS} (a week), not {seconds:?}",
                if zero_ok { "from" } else { "above" }
            ),
        ))
    }
}

struct GenerateStage {
    config: Config,
    model_file: Option<PathBuf>,
    recorded: Option<PathBuf>,
    /// `config.batch_files` resolved against the spec's directory.
    batch_files: Option<BatchFiles>,
}

impl Stage for GenerateStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        ["generations", "graded_docs", "rejects"]
            .iter()
            .map(|k| OutputDecl {
                name: k.to_string(),
                kind: Some(table::schema(k).expect("built-in kind").kind.as_str()),
            })
            .collect()
    }

    fn files(&self) -> Vec<NamedFile> {
        // The model file names the model, not the data: requests are keyed by `model`, so a
        // changed GGUF file does not invalidate answers already journaled.
        self.recorded
            .iter()
            .map(|path| NamedFile::new("recorded_journal", path.clone()))
            .collect()
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.generate(ctx))
    }

    fn state_summary(&self, state_dir: &Path, prompts: u64) -> Option<String> {
        /// The part of a journal line that counts tokens.
        #[derive(Deserialize)]
        struct Usage {
            response: ChatResponse,
        }
        let journal = std::fs::File::open(state_dir.join(JOURNAL)).ok()?;
        let (mut answered, mut spend) = (0u64, Spend::default());
        for line in std::io::BufRead::lines(std::io::BufReader::new(journal)).map_while(Result::ok)
        {
            if let Ok(usage) = serde_json::from_str::<Usage>(&line) {
                answered += 1;
                spend.add(&usage.response);
            }
        }
        let failed = std::fs::read_to_string(state_dir.join(FAILURES))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let pending = prompts.saturating_sub(answered);
        let mut note = format!(
            "{answered} answered, {pending} pending, {failed} failed in the last run; {}",
            spend.describe(self.config.price_per_mtok)
        );
        // What the rest would cost, at the mean of the answers bought so far.
        if answered > 0 && pending > 0 {
            let estimate = Spend {
                prompt: spend.prompt * pending / answered,
                completion: spend.completion * pending / answered,
            };
            note.push_str(&format!(
                "; the {pending} pending: about {}",
                estimate.describe(self.config.price_per_mtok)
            ));
        }
        if let Some(batch) = batch::in_flight_note(state_dir) {
            note.push_str(&format!("; {batch}"));
        }
        Some(note)
    }
}

const JOURNAL: &str = "journal.jsonl";

/// What the requests of one run share: the backend, the retry policy, the journal, and the
/// counters behind the progress message and the token budget.
struct Sender<'a> {
    backend: Box<dyn ChatBackend>,
    policy: RetryPolicy,
    journal: &'a Journal,
    bar: indicatif::ProgressBar,
    budget: Option<u64>,
    /// Tokens of every answer in the journal, this run's as they arrive.
    spent: AtomicU64,
    completion_tokens: AtomicU64,
    failures: AtomicU64,
    started: Instant,
    last_sync: std::sync::Mutex<Instant>,
}

impl Sender<'_> {
    /// Sends one request (with retries) and journals its answer; the error says why not.
    async fn send(&self, job: &Job) -> Result<Answered, String> {
        if let Some(max) = self.budget
            && self.spent.load(Ordering::Relaxed) >= max
        {
            self.bar.inc(1);
            return Err(format!(
                "not sent: the journal's answers reached max_total_tokens ({max})"
            ));
        }
        let (result, attempts) = self.policy.run(self.backend.as_ref(), &job.request).await;
        match result {
            Ok(response) => {
                let entry = JournalEntry {
                    hash: job.hash.clone(),
                    response,
                    attempts,
                };
                let journaled = self.journal.append(&entry).map_err(|e| e.to_string());
                let completion = entry.response.completion_tokens;
                self.count(journaled.as_ref().ok().map(|a| (a.tokens, completion)));
                journaled
            }
            Err(e) => {
                self.count(None);
                Err(format!("{e} (after {attempts} attempts)"))
            }
        }
    }

    /// Counts a request: `Some((tokens, completion tokens))` for a journaled answer.
    fn count(&self, answered: Option<(u64, u64)>) {
        match answered {
            Some((tokens, completion)) => {
                self.spent.fetch_add(tokens, Ordering::Relaxed);
                let total = self
                    .completion_tokens
                    .fetch_add(completion, Ordering::Relaxed)
                    + completion;
                let rate = total as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
                self.bar.set_message(format!(
                    "{rate:.0} tok/s, {} failed",
                    self.failures.load(Ordering::Relaxed)
                ));
            }
            None => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.bar.inc(1);
        // Answers reach the disk at least every 2 s, whatever the request rate.
        let mut last = self.last_sync.lock().expect("sync clock");
        if last.elapsed() > Duration::from_secs(2) {
            let _ = self.journal.sync();
            *last = Instant::now();
        }
    }
}

/// Requests that failed: how many, and what went wrong with the first.
#[derive(Default)]
struct Failures {
    count: usize,
    first: Option<String>,
}

impl Failures {
    fn add(&mut self, describe: impl FnOnce() -> String) {
        self.count += 1;
        self.first.get_or_insert_with(describe);
    }
}

/// After `sent` requests (one at a time or as a batch): the counts `status` and the manifest
/// show, and the error naming the first failure when any failed.
fn settle(
    ctx: &mut StageContext,
    state_dir: &Path,
    journal: &Journal,
    sent: usize,
    failed: Failures,
) -> Result<(), StageError> {
    ctx.set_stat("requests_answered", (sent - failed.count) as u64);
    let path = state_dir.join(FAILURES);
    let Some(first) = failed.first else {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    };
    std::fs::write(&path, failed.count.to_string()).map_err(StageError::io(&path))?;
    Err(StageError::RequestsFailed {
        failed: failed.count,
        total: sent,
        journal: journal.path().to_path_buf(),
        first,
    })
}
/// How many requests failed in the last run (absent after a run with none).
const FAILURES: &str = "failed";

/// Which prompts' requests are to be sent: those the journal does not answer, each request
/// once however many prompts make it.
struct Unanswered<'a> {
    index: &'a JournalIndex,
    seen: HashSet<String>,
}

impl<'a> Unanswered<'a> {
    fn new(index: &'a JournalIndex) -> Unanswered<'a> {
        Unanswered {
            index,
            seen: HashSet::new(),
        }
    }

    fn admits(&mut self, job: &Job) -> bool {
        !self.index.contains(&job.hash) && self.seen.insert(job.hash.clone())
    }
}

/// Prompts per batch of the output tables.
const WRITE_CHUNK: usize = 8192;

/// A prompt row and the request it becomes.
struct Job {
    prompt_id: String,
    query_id: String,
    level: Option<i32>,
    request: ChatRequest,
    hash: String,
}

impl GenerateStage {
    /// The key from the environment variable `api_key_env` names.
    fn api_key(&self) -> Result<Option<Secret>, StageError> {
        let Some(var) = &self.config.api_key_env else {
            return Ok(None);
        };
        let key = std::env::var(var).map_err(|_| {
            StageError::config(
                "api_key_env",
                format!("the environment variable `{var}` is not set"),
            )
        })?;
        Ok(Some(Secret::new(key)))
    }

    fn backend(&self) -> Result<Box<dyn ChatBackend>, StageError> {
        if self.config.backend == BackendKind::Embedded {
            let path = self.model_file.as_ref().expect("checked in prepare");
            let options = EmbeddedOptions {
                max_batch: self.config.concurrency,
                threads: self.config.threads,
            };
            return EmbeddedBackend::open(path, &self.config.model, options)
                .map(|b| Box::new(b) as Box<dyn ChatBackend>)
                .map_err(StageError::from);
        }
        OpenAiBackend::new(OpenAiConfig {
            endpoints: self.config.endpoints.clone(),
            api_key: self.api_key()?,
            timeout: Duration::from_secs_f64(self.config.timeout_s),
            requests_per_second: self.config.requests_per_second,
        })
        .map(|b| Box::new(b) as Box<dyn ChatBackend>)
        .map_err(StageError::from)
    }

    /// The jobs of one batch of prompts. Their requests are as hashed, without the output
    /// constraint ([`GenerateStage::constrain`] adds it to those sent): most passes need only
    /// the hash, and the constraint's schema is a tree of allocations per request.
    fn jobs(&self, batch: &RecordBatch) -> Vec<Job> {
        let prompt_ids = columns::get::<StringArray>(batch, "prompt_id");
        let query_ids = columns::get::<StringArray>(batch, "query_id");
        let levels = columns::get::<Int32Array>(batch, "level");
        let systems = columns::get::<StringArray>(batch, "system");
        let users = columns::get::<StringArray>(batch, "user");
        let mut jobs = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let mut messages = Vec::new();
            if !arrow::array::Array::is_null(systems, row) {
                messages.push(Message::new("system", systems.value(row)));
            }
            messages.push(Message::new("user", users.value(row)));
            let level = (!arrow::array::Array::is_null(levels, row)).then(|| levels.value(row));
            let request = ChatRequest {
                model: self.config.model.clone(),
                messages,
                temperature: self.config.temperature,
                top_p: self.config.top_p,
                max_tokens: self.config.max_tokens,
                seed: self.config.seed,
                stop: self.config.stop.clone(),
                response_format: None,
                guided_json: None,
            };
            jobs.push(Job {
                prompt_id: prompt_ids.value(row).to_string(),
                query_id: query_ids.value(row).to_string(),
                level,
                hash: request.hash(),
                request,
            });
        }
        jobs
    }

    /// Adds the output constraint a request is sent with: the embedded model decodes freely; a
    /// server constrains an all-levels answer.
    fn constrain(&self, job: &mut Job) {
        if job.level.is_none() && self.config.backend == BackendKind::Openai {
            self.config.structured_output.apply(
                &mut job.request,
                graded_passages_schema(&self.config.levels),
            );
        }
    }

    /// Calls `each` with every prompt's job in order, one input batch in memory at a time.
    async fn each_job(
        &self,
        ctx: &mut StageContext,
        mut each: impl FnMut(Job) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        let mut input = ctx.stream_input("prompts").await?;
        while let Some(batch) = input.next().await? {
            self.jobs(&batch).into_iter().try_for_each(&mut each)?;
        }
        Ok(())
    }

    /// The prompts' jobs that the journal does not answer, each request once, as `each` sees
    /// them.
    async fn each_pending(
        &self,
        ctx: &mut StageContext,
        index: &JournalIndex,
        mut each: impl FnMut(Job) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        let mut unanswered = Unanswered::new(index);
        self.each_job(ctx, |job| match unanswered.admits(&job) {
            true => each(job),
            false => Ok(()),
        })
        .await
    }

    /// Calls `add` with each pending request as it would be sent (constrained), keyed by its
    /// hash: how batch input files are written.
    async fn each_pending_request(
        &self,
        ctx: &mut StageContext,
        index: &JournalIndex,
        mut add: impl FnMut(&str, &ChatRequest) -> Result<(), LlmError>,
    ) -> Result<(), StageError> {
        self.each_pending(ctx, index, |mut job| {
            self.constrain(&mut job);
            Ok(add(&job.hash, &job.request)?)
        })
        .await
    }

    /// The prompts' work, in passes over the prompts that hold one input batch at a time:
    /// every request's hash first (what the journal must answer), then the pending requests
    /// (sent, or written to a batch file), then the tables, their answers read back from the
    /// journal. What stays in memory is per request (hashes, places in the journal), never
    /// the prompts' or answers' text: MS MARCO's 500k prompts fit however long the answers.
    async fn generate(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let state_dir = ctx.state_dir()?.to_path_buf();
        let opened = Journal::open(&state_dir.join(JOURNAL))?;
        let (journal, mut index) = (opened.journal, opened.index);
        if opened.skipped_lines > 0 {
            ctx.set_stat("journal_lines_skipped", opened.skipped_lines as u64);
        }
        if let Some(recorded) = &self.recorded {
            let entries = Journal::entries(recorded)?.map(|e| e.map_err(StageError::from));
            let imported = import_answers(&journal, &mut index, entries)?;
            ctx.set_stat("imported_from_recording", imported);
        }
        let (mut prompts, mut wanted) = (0, HashSet::new());
        self.each_job(ctx, |job| {
            prompts += 1;
            wanted.insert(job.hash);
            Ok(())
        })
        .await?;
        let mut batch_failures = Failures::default();
        if let Some(files) = &self.batch_files
            && files.output.exists()
        {
            let (imported, failed) = import_batch(&files.output, &wanted, &journal, &mut index)?;
            ctx.set_stat("imported_from_batch", imported);
            batch_failures = failed;
        }
        let pending = wanted.iter().filter(|h| !index.contains(h)).count();
        let cached = prompts - pending;
        tracing::debug!(
            prompts,
            from_journal = cached,
            to_send = pending,
            "generation planned"
        );
        if let Some(files) = &self.batch_files
            && pending > 0
        {
            let mut file = RequestFile::create(&files.input)?;
            self.each_pending_request(ctx, &index, |hash, request| file.add(hash, request))
                .await?;
            let written = file.finish()?;
            return Err(StageError::BatchPending {
                written,
                input: files.input.clone(),
                output: files.output.clone(),
                model: self.config.model.clone(),
                failed: batch_failures.count,
                first_failure: batch_failures.first.unwrap_or_default(),
            });
        }
        if let Some(api) = &self.config.batch_api
            && pending > 0
        {
            self.run_batch(ctx, api, pending, &wanted, &journal, &mut index)
                .await?;
            let mut failed = Failures::default();
            self.each_pending(ctx, &index, |job| {
                failed.add(|| {
                    format!(
                        "prompt `{}`: no answer in the batch's output or error files",
                        job.prompt_id
                    )
                });
                Ok(())
            })
            .await?;
            settle(ctx, &state_dir, &journal, pending, failed)?;
        } else if pending > 0 {
            drop(wanted);
            self.send_pending(ctx, pending, &journal, &mut index)
                .await?;
        }
        ctx.set_stat("requests_from_journal", cached as u64);
        self.write_tables(ctx, &journal, &index).await
    }

    /// Sends the pending requests, `concurrency` in flight from first to last, and journals
    /// their answers as they arrive.
    async fn send_pending(
        &self,
        ctx: &mut StageContext,
        pending: usize,
        journal: &Journal,
        index: &mut JournalIndex,
    ) -> Result<(), StageError> {
        let state_dir = ctx.state_dir()?.to_path_buf();
        let sender = Sender {
            backend: self.backend()?,
            policy: RetryPolicy {
                max_retries: self.config.max_retries,
                base_delay: Duration::from_secs_f64(self.config.backoff_s),
                ..RetryPolicy::default()
            },
            journal,
            bar: ctx.progress(Some(pending as u64), "requests"),
            budget: self.config.max_total_tokens,
            spent: AtomicU64::new(index.tokens()),
            completion_tokens: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            started: Instant::now(),
            last_sync: std::sync::Mutex::new(Instant::now()),
        };
        // The prompts stream in as requests go out: a batch of them in memory at a time.
        let input = ctx.stream_input("prompts").await?;
        let batches = futures::stream::try_unfold(input, |mut input| async move {
            Ok::<_, StageError>(input.next().await?.map(|batch| (batch, input)))
        });
        let mut unanswered = Unanswered::new(index);
        let jobs = batches
            .map_ok(|batch| {
                futures::stream::iter(self.jobs(&batch).into_iter().map(Ok::<_, StageError>))
            })
            .try_flatten()
            .try_filter(move |job| futures::future::ready(unanswered.admits(job)));
        let sender_ref = &sender;
        let mut outcomes = Box::pin(
            jobs.map(|job| async move {
                let mut job = job?;
                self.constrain(&mut job);
                let outcome = sender_ref.send(&job).await;
                Ok::<_, StageError>((job, outcome))
            })
            .buffer_unordered(self.config.concurrency),
        );
        let (mut answered, mut failed) = (Vec::new(), Failures::default());
        while let Some(sent) = outcomes.next().await {
            let (job, outcome) = sent?;
            match outcome {
                Ok(place) => answered.push((job.hash, place)),
                Err(e) => failed.add(|| format!("prompt `{}`: {e}", job.prompt_id)),
            }
        }
        drop(outcomes);
        sender.bar.finish_and_clear();
        journal.sync()?;
        for (hash, place) in answered {
            index.insert(hash, place);
        }
        // The rate of this run's answers (the journal's earlier ones are not timed here).
        let sending_s = sender.started.elapsed().as_secs_f64().max(1e-3);
        let bought = sender.completion_tokens.load(Ordering::Relaxed);
        ctx.set_stat("completion_tokens_per_s", bought as f64 / sending_s);
        settle(ctx, &state_dir, journal, pending, failed)
    }

    /// The three output tables, in prompt order, written 8,192 prompts at a time with their
    /// answers read back from the journal.
    async fn write_tables(
        &self,
        ctx: &mut StageContext,
        journal: &Journal,
        index: &JournalIndex,
    ) -> Result<(), StageError> {
        let mut writers = Vec::new();
        for kind in ["generations", "graded_docs", "rejects"] {
            writers.push(ctx.create_table(kind, table::schema(kind)?.arrow())?);
        }
        let mut spend = Spend::default();
        let mut rejected = 0;
        let mut chunk = Vec::with_capacity(WRITE_CHUNK);
        let mut write = |chunk: &mut Vec<Job>| -> Result<(), StageError> {
            let responses = chunk
                .iter()
                .map(|job| {
                    let place = index.get(&job.hash).ok_or_else(|| {
                        StageError::Contract(format!("prompt `{}` has no answer", job.prompt_id))
                    })?;
                    Ok(journal.entry(place)?.response)
                })
                .collect::<Result<Vec<ChatResponse>, StageError>>()?;
            let answers: Vec<(&Job, &ChatResponse)> = chunk.iter().zip(&responses).collect();
            answers.iter().for_each(|(_, r)| spend.add(r));
            let (docs, rejects) = self.parse_answers(&answers);
            rejected += rejects.len();
            let batches = [
                generations_batch(writers[0].schema(), &answers),
                graded_docs_batch(writers[1].schema(), &docs),
                rejects_batch(writers[2].schema(), &rejects),
            ];
            for (writer, batch) in writers.iter_mut().zip(&batches) {
                writer.write(batch)?;
            }
            chunk.clear();
            Ok(())
        };
        self.each_job(ctx, |job| {
            chunk.push(job);
            match chunk.len() == WRITE_CHUNK {
                true => write(&mut chunk),
                false => Ok(()),
            }
        })
        .await?;
        write(&mut chunk)?;
        for writer in writers {
            ctx.finish_table(writer)?;
        }
        ctx.set_stat("prompt_tokens", spend.prompt);
        ctx.set_stat("completion_tokens", spend.completion);
        if let Some(price) = self.config.price_per_mtok {
            ctx.set_stat("cost_usd", spend.cost(price));
        }
        ctx.set_stat("rejects", rejected as u64);
        Ok(())
    }

    /// The passages the answers hold, and what is wrong with the rest.
    #[allow(clippy::type_complexity)]
    fn parse_answers<'a>(
        &self,
        answers: &[(&'a Job, &'a ChatResponse)],
    ) -> (Vec<GradedDoc<'a>>, Vec<(&'a Job, ParseError, &'a str)>) {
        let (mut docs, mut rejects) = (Vec::new(), Vec::new());
        for &(job, response) in answers {
            let (passages, problems) = match job.level {
                None => parse_all_levels(&response.text, &self.config.levels),
                Some(level) => match parse_single_level(&response.text, level) {
                    Ok(p) => (vec![p], Vec::new()),
                    Err(e) => (Vec::new(), vec![e]),
                },
            };
            for passage in passages {
                let doc_id = format!("{}:{}:{}", job.query_id, passage.level, &job.hash[..12]);
                docs.push(GradedDoc {
                    job,
                    doc_id,
                    passage,
                    model: &response.model,
                });
            }
            for problem in problems {
                rejects.push((job, problem, response.text.as_str()));
            }
        }
        (docs, rejects)
    }
}

/// Adds to the journal the answers it lacks, in the order they come; returns how many.
fn import_answers(
    journal: &Journal,
    index: &mut JournalIndex,
    entries: impl IntoIterator<Item = Result<JournalEntry, StageError>>,
) -> Result<u64, StageError> {
    let mut imported = 0;
    for entry in entries {
        let entry = entry?;
        if !index.contains(&entry.hash) {
            let place = journal.append(&entry)?;
            index.insert(entry.hash, place);
            imported += 1;
        }
    }
    journal.sync()?;
    Ok(imported)
}

/// A passage of an answer, with the prompt it answers.
struct GradedDoc<'a> {
    job: &'a Job,
    doc_id: String,
    passage: GradedPassage,
    model: &'a str,
}

fn generations_batch(schema: SchemaRef, answers: &[(&Job, &ChatResponse)]) -> RecordBatch {
    RecordBatch::try_new(
        schema,
        vec![
            columns::utf8(answers.iter().map(|(j, _)| j.prompt_id.as_str())),
            columns::utf8(answers.iter().map(|(j, _)| j.query_id.as_str())),
            columns::nullable_int32(answers.iter().map(|(j, _)| j.level)),
            columns::utf8(answers.iter().map(|(j, _)| j.hash.as_str())),
            columns::utf8(answers.iter().map(|(_, r)| r.model.as_str())),
            columns::utf8(answers.iter().map(|(_, r)| r.text.as_str())),
            columns::int64(answers.iter().map(|(_, r)| r.prompt_tokens as i64)),
            columns::int64(answers.iter().map(|(_, r)| r.completion_tokens as i64)),
        ],
    )
    .expect("columns follow the generations kind")
}

fn graded_docs_batch(schema: SchemaRef, docs: &[GradedDoc]) -> RecordBatch {
    RecordBatch::try_new(
        schema,
        vec![
            columns::utf8(docs.iter().map(|d| d.job.query_id.as_str())),
            columns::utf8(docs.iter().map(|d| d.doc_id.as_str())),
            columns::int32(docs.iter().map(|d| d.passage.level)),
            columns::utf8(docs.iter().map(|d| d.passage.title.as_str())),
            columns::utf8(docs.iter().map(|d| d.passage.text.as_str())),
            columns::utf8(docs.iter().map(|d| d.model)),
            columns::utf8(docs.iter().map(|d| d.job.prompt_id.as_str())),
            columns::utf8(docs.iter().map(|d| d.job.hash.as_str())),
        ],
    )
    .expect("columns follow the graded_docs kind")
}

fn rejects_batch(schema: SchemaRef, rejects: &[(&Job, ParseError, &str)]) -> RecordBatch {
    RecordBatch::try_new(
        schema,
        vec![
            columns::utf8(rejects.iter().map(|r| r.0.prompt_id.as_str())),
            columns::utf8(rejects.iter().map(|r| r.0.query_id.as_str())),
            columns::nullable_int32(rejects.iter().map(|r| r.1.level)),
            columns::utf8(rejects.iter().map(|r| r.0.hash.as_str())),
            columns::utf8(rejects.iter().map(|r| r.1.reason.as_str())),
            columns::utf8(rejects.iter().map(|r| r.2)),
        ],
    )
    .expect("columns follow the rejects kind")
}
