//! `generate` in batches: files for an offline run (`batch_files`, the format vLLM's
//! `run_batch` reads) and the OpenAI Batch API (`batch_api`). Answers are journaled by request
//! hash exactly as single requests are.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BackendKind, Config, Failures, GenerateStage, check_seconds, import_answers};
use crate::llm::{
    self, Batch, BatchApi, Journal, JournalEntry, JournalIndex, Part, PartLimits, RequestParts,
    RetryPolicy,
};
use crate::pipeline::{ConfigError, StageContext, StageError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchFiles {
    pub input: PathBuf,
    pub output: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchApiConfig {
    /// Seconds between polls of the batches' status.
    #[serde(default = "default_poll")]
    poll_s: f64,
    /// How long the API may take (OpenAI accepts `24h`).
    #[serde(default = "default_window")]
    completion_window: String,
    /// Requests per batch: OpenAI takes at most 50,000.
    #[serde(default = "default_max_requests")]
    max_requests: usize,
    /// Megabytes (10^6 bytes) per batch input file: OpenAI takes at most 200.
    #[serde(default = "default_max_file_mb")]
    max_file_mb: f64,
    /// Batches submitted and unfinished at once (default: every batch). A provider's limit on
    /// the tokens queued for one model can refuse more.
    #[serde(default)]
    max_in_flight: Option<usize>,
}

fn default_poll() -> f64 {
    30.0
}

fn default_window() -> String {
    "24h".to_string()
}

fn default_max_requests() -> usize {
    50_000
}

fn default_max_file_mb() -> f64 {
    200.0
}

impl BatchApiConfig {
    fn limits(&self) -> PartLimits {
        PartLimits {
            requests: self.max_requests,
            bytes: (self.max_file_mb * 1e6) as u64,
        }
    }
}

/// The batch modes are for servers, and one at a time.
pub(super) fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (field, set) in [
        ("batch_files", config.batch_files.is_some()),
        ("batch_api", config.batch_api.is_some()),
    ] {
        if set && config.backend == BackendKind::Embedded {
            return Err(ConfigError::new(
                field,
                "batches are for servers (backend: openai); the embedded model answers in-process",
            ));
        }
    }
    if config.batch_files.is_some() && config.batch_api.is_some() {
        return Err(ConfigError::new(
            "batch_api",
            "choose batch_files (offline) or batch_api, not both",
        ));
    }
    if let Some(api) = &config.batch_api {
        check_seconds("batch_api.poll_s", api.poll_s, false)?;
        let counts = [
            ("batch_api.max_requests", Some(api.max_requests)),
            ("batch_api.max_in_flight", api.max_in_flight),
        ];
        if let Some((field, _)) = counts.into_iter().find(|(_, n)| *n == Some(0)) {
            return Err(ConfigError::new(field, "must be at least 1"));
        }
        if !(api.max_file_mb.is_finite() && api.limits().bytes > 0) {
            return Err(ConfigError::new(
                "batch_api.max_file_mb",
                format!(
                    "must be a positive number of megabytes, not {}",
                    api.max_file_mb
                ),
            ));
        }
    }
    Ok(())
}

/// Journals the answers in a batch output file to the `wanted` requests that the journal
/// lacks, one line in memory at a time; returns how many, and the failed results (an error, a
/// status other than 200), which stay pending.
pub(super) fn import_batch(
    path: &Path,
    wanted: &HashSet<String>,
    journal: &Journal,
    index: &mut JournalIndex,
) -> Result<(u64, Failures), StageError> {
    let mut failed = Failures::default();
    let results = llm::read_results(path)?;
    let answers = results.filter_map(|result| {
        let result = match result {
            Ok(result) => result,
            Err(e) => return Some(Err(StageError::from(e))),
        };
        if !wanted.contains(&result.hash) {
            return None;
        }
        match result.answer {
            Ok(response) => Some(Ok(JournalEntry {
                hash: result.hash,
                response,
                attempts: 1,
            })),
            Err(e) => {
                failed.add(|| format!("request {}: {e}", result.hash));
                None
            }
        }
    });
    let imported = import_answers(journal, index, answers)?;
    Ok((imported, failed))
}

/// The batches of a run, kept in the state directory from the moment their input files are
/// written: a killed run resumes polling them and never submits the same requests twice.
#[derive(Debug, Default, Serialize)]
struct InFlight {
    parts: Vec<PartState>,
}

/// One batch: its input file, then its ids at the API as they become known.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartState {
    /// The input file's name in the state directory.
    input: String,
    requests: usize,
    file_id: Option<String>,
    batch_id: Option<String>,
    /// Finished, its output and error files journaled.
    #[serde(default)]
    done: bool,
}

impl PartState {
    /// A part just written, not yet uploaded.
    fn new(part: &Part) -> PartState {
        PartState {
            input: part
                .path
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into(),
            requests: part.requests,
            file_id: None,
            batch_id: None,
            done: false,
        }
    }
}

/// `batch.json` as written now, or as runs before batches were split wrote it (one batch).
#[derive(Deserialize)]
#[serde(untagged)]
enum Saved {
    Parts { parts: Vec<PartState> },
    Single(SingleBatch),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SingleBatch {
    file_id: Option<String>,
    batch_id: Option<String>,
}

const IN_FLIGHT: &str = "batch.json";

impl InFlight {
    fn read(state_dir: &Path) -> Result<InFlight, StageError> {
        let path = state_dir.join(IN_FLIGHT);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(InFlight::default()),
            Err(e) => return Err(StageError::io(&path)(e)),
        };
        let saved = serde_json::from_str(&text)
            .map_err(|e| StageError::data(IN_FLIGHT, None, format!("{}: {e}", path.display())))?;
        let parts = match saved {
            Saved::Parts { parts } => parts,
            Saved::Single(SingleBatch {
                file_id: None,
                batch_id: None,
            }) => Vec::new(),
            // Its request count is unknown; only the progress bar reads it.
            Saved::Single(SingleBatch { file_id, batch_id }) => vec![PartState {
                input: "batch-input.jsonl".to_string(),
                requests: 0,
                file_id,
                batch_id,
                done: false,
            }],
        };
        Ok(InFlight { parts })
    }

    /// Written atomically and synced before the next call to the API depends on it.
    fn save(&self, state_dir: &Path) -> Result<(), StageError> {
        let path = state_dir.join(IN_FLIGHT);
        let text = serde_json::to_string(self).expect("state serializes");
        crate::table::write_file(&path, text.as_bytes()).map_err(StageError::io(&path))
    }

    fn all_done(&self) -> bool {
        self.parts.iter().all(|p| p.done)
    }

    /// The parts submitted and not yet journaled.
    fn open(&self) -> impl Iterator<Item = &PartState> {
        self.parts
            .iter()
            .filter(|p| !p.done && p.batch_id.is_some())
    }
}

/// For `status`: what a killed run left in flight, if anything.
pub(super) fn in_flight_note(state_dir: &Path) -> Option<String> {
    let state = InFlight::read(state_dir).ok()?;
    let batches: Vec<&str> = state.open().filter_map(|p| p.batch_id.as_deref()).collect();
    let mut notes = Vec::new();
    match batches.as_slice() {
        [] => {}
        [one] => notes.push(format!("batch {one} in flight (the next run polls it)")),
        many => notes.push(format!(
            "batches {} in flight (the next run polls them)",
            many.join(", ")
        )),
    }
    let unsubmitted = state
        .parts
        .iter()
        .filter(|p| !p.done && p.batch_id.is_none());
    let mut written = 0;
    for part in unsubmitted {
        match &part.file_id {
            Some(file) => notes.push(format!(
                "file {file} uploaded, its batch not recorded (the next run looks for it)"
            )),
            None => written += 1,
        }
    }
    if written > 0 {
        notes.push(format!("{written} batch input file(s) not yet submitted"));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// A run's batches at the API, and where their state is kept.
struct Batches {
    api: BatchApi,
    policy: RetryPolicy,
    state_dir: PathBuf,
    state: InFlight,
}

impl Batches {
    /// Uploads part `n`'s input file and creates its batch, each step recorded before the
    /// next depends on it. A run killed after creating the batch but before recording it, or
    /// a create retried after its answer was lost, finds the batch by its input file instead
    /// of creating a second one.
    async fn submit(&mut self, n: usize, window: &str) -> Result<(), StageError> {
        let (api, policy) = (&self.api, &self.policy);
        let file_id = match self.state.parts[n].file_id.clone() {
            Some(id) => id,
            None => {
                let input = self.state_dir.join(&self.state.parts[n].input);
                let id = policy.retry(|| api.upload(&input)).await.0?;
                self.state.parts[n].file_id = Some(id.clone());
                self.state.save(&self.state_dir)?;
                id
            }
        };
        // Looked for before every attempt: a create whose answer was lost may have made one.
        let batch = policy
            .retry(|| async {
                match api.find(&file_id).await? {
                    Some(batch) => Ok(batch),
                    None => api.create(&file_id, window).await,
                }
            })
            .await
            .0?;
        tracing::debug!(batch = %batch.id, file = %file_id, "batch in flight");
        self.state.parts[n].batch_id = Some(batch.id);
        self.state.save(&self.state_dir)
    }

    /// Downloads a finished batch's output and error files and journals every answer in them
    /// to a `wanted` request; then part `n` is done and its files are removed. Returns why
    /// the batch failed as a whole, if it did.
    async fn collect(
        &mut self,
        n: usize,
        batch: Batch,
        wanted: &HashSet<String>,
        journal: &Journal,
        index: &mut JournalIndex,
    ) -> Result<Option<String>, StageError> {
        let (api, policy) = (&self.api, &self.policy);
        let files = [&batch.output_file_id, &batch.error_file_id];
        let mut downloaded = Vec::new();
        for (k, file) in files.into_iter().flatten().enumerate() {
            let path = self.state_dir.join(format!("batch-output-{n}-{k}.jsonl"));
            policy.retry(|| api.download(file, &path)).await.0?;
            import_batch(&path, wanted, journal, index)?;
            downloaded.push(path);
        }
        self.state.parts[n].done = true;
        self.state.save(&self.state_dir)?;
        // The journal holds the answers now; the files are copies.
        let input = self.state_dir.join(&self.state.parts[n].input);
        for path in downloaded.iter().chain([&input]) {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StageError::io(path)(e));
                }
                _ => {}
            }
        }
        let failed = batch.status == "failed" && batch.output_file_id.is_none();
        Ok(failed.then(|| format!("{}: {}", batch.id, batch.errors.unwrap_or_default())))
    }
}

impl GenerateStage {
    /// Sends the `pending` requests through the Batch API in batches within the config's
    /// limits (or resumes the batches a killed run left in flight), at most `max_in_flight`
    /// at once, and journals every answer in their output to a `wanted` request as each
    /// batch finishes.
    pub(super) async fn run_batch(
        &self,
        ctx: &mut StageContext,
        config: &BatchApiConfig,
        pending: usize,
        wanted: &HashSet<String>,
        journal: &Journal,
        index: &mut JournalIndex,
    ) -> Result<(), StageError> {
        let state_dir = ctx.state_dir()?.to_path_buf();
        let mut state = InFlight::read(&state_dir)?;
        if state.parts.is_empty() {
            let mut parts = RequestParts::new(&state_dir, "batch-input", config.limits());
            self.each_pending_request(ctx, index, |hash, request| parts.add(hash, request))
                .await?;
            state.parts = parts.finish()?.iter().map(PartState::new).collect();
            state.save(&state_dir)?;
        }
        let mut batches = Batches {
            api: BatchApi::new(
                &self.config.endpoints[0],
                self.api_key()?,
                Duration::from_secs_f64(self.config.timeout_s),
            )?,
            policy: RetryPolicy {
                max_retries: self.config.max_retries,
                base_delay: Duration::from_secs_f64(self.config.backoff_s),
                ..RetryPolicy::default()
            },
            state_dir: state_dir.clone(),
            state,
        };
        let max_in_flight = config.max_in_flight.unwrap_or(usize::MAX);
        let total = batches.state.parts.len();
        // Batches a killed run journaled are not this run's progress. (A batch recorded by a
        // version that kept one has no request count: then the pending requests are the total.)
        let done_before: Vec<bool> = batches.state.parts.iter().map(|p| p.done).collect();
        let unfinished = batches.state.parts.iter().filter(|p| !p.done);
        let unfinished: u64 = unfinished.map(|p| p.requests as u64).sum();
        let bar = ctx.progress(
            Some(if unfinished > 0 {
                unfinished
            } else {
                pending as u64
            }),
            "requests (batch)",
        );
        let mut failures = Vec::new();
        while !batches.state.all_done() {
            let waiting = batches.state.parts.iter().enumerate();
            let waiting: Vec<usize> = waiting
                .filter(|(_, p)| !p.done && p.batch_id.is_none())
                .map(|(n, _)| n)
                .collect();
            let room = max_in_flight.saturating_sub(batches.state.open().count());
            for n in waiting.into_iter().take(room) {
                batches.submit(n, &config.completion_window).await?;
            }
            let (mut answered, mut statuses) = (0, Vec::new());
            for (n, &was_done) in done_before.iter().enumerate() {
                let part = &batches.state.parts[n];
                if part.done {
                    answered += if was_done { 0 } else { part.requests as u64 };
                    continue;
                }
                let Some(batch_id) = part.batch_id.clone() else {
                    continue;
                };
                let (api, policy) = (&batches.api, &batches.policy);
                let batch = policy.retry(|| api.get(&batch_id)).await.0?;
                let counts = batch.request_counts.unwrap_or_default();
                answered += counts.completed + counts.failed;
                if batch.is_finished() {
                    failures.extend(batches.collect(n, batch, wanted, journal, index).await?);
                } else {
                    statuses.push(batch.status);
                }
            }
            let done = batches.state.parts.iter().filter(|p| p.done).count();
            bar.set_position(answered);
            bar.set_message(format!(
                "{done} of {total} batches done; {}",
                statuses.join(", ")
            ));
            if batches.state.open().next().is_some() {
                tokio::time::sleep(Duration::from_secs_f64(config.poll_s)).await;
            }
        }
        bar.finish_and_clear();
        // Done with these batches: a rerun sends what they did not answer as new ones.
        let path = state_dir.join(IN_FLIGHT);
        std::fs::remove_file(&path).map_err(StageError::io(&path))?;
        if !failures.is_empty() {
            return Err(StageError::Llm(llm::LlmError::BatchFailed(
                failures.join("; "),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch a run before batches were split left in flight is resumed as one part.
    #[test]
    fn state_from_before_the_split_reads_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| std::fs::write(dir.path().join(IN_FLIGHT), text).unwrap();
        write(r#"{"file_id": "file-3", "batch_id": "batch-7"}"#);
        let parts = InFlight::read(dir.path()).unwrap().parts;
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].input, "batch-input.jsonl");
        assert_eq!(parts[0].file_id.as_deref(), Some("file-3"));
        assert_eq!(parts[0].batch_id.as_deref(), Some("batch-7"));
        assert!(!parts[0].done);
        assert_eq!(
            in_flight_note(dir.path()).unwrap(),
            "batch batch-7 in flight (the next run polls it)"
        );
        write(r#"{"file_id": null, "batch_id": null}"#);
        assert!(InFlight::read(dir.path()).unwrap().parts.is_empty());
        assert_eq!(in_flight_note(dir.path()), None);

        let state = InFlight {
            parts: vec![PartState {
                input: "batch-input-0.jsonl".to_string(),
                requests: 4,
                file_id: None,
                batch_id: None,
                done: false,
            }],
        };
        state.save(dir.path()).unwrap();
        let read = InFlight::read(dir.path()).unwrap().parts;
        assert_eq!(
            (read[0].input.as_str(), read[0].requests),
            ("batch-input-0.jsonl", 4)
        );
        assert_eq!(
            in_flight_note(dir.path()).unwrap(),
            "1 batch input file(s) not yet submitted"
        );
        write("{\"parts\": 3}");
        let error = InFlight::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("batch.json"), "{error}");
    }
}
