//! `generate` in batches: files for an offline run (`batch_files`, the format vLLM's
//! `run_batch` reads) and the OpenAI Batch API (`batch_api`). Answers are journaled by request
//! hash exactly as single requests are.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BackendKind, Config, Failures, GenerateStage, check_seconds, import_answers};
use crate::llm::{self, BatchApi, Journal, JournalEntry, JournalIndex, RetryPolicy};
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
    /// Seconds between polls of the batch's status.
    #[serde(default = "default_poll")]
    poll_s: f64,
    /// How long the API may take (OpenAI accepts `24h`).
    #[serde(default = "default_window")]
    completion_window: String,
}

fn default_poll() -> f64 {
    30.0
}

fn default_window() -> String {
    "24h".to_string()
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

/// The batch in flight, kept in the state directory from the upload on: a killed run resumes
/// polling it and never submits the same requests twice.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InFlight {
    file_id: Option<String>,
    batch_id: Option<String>,
}

const IN_FLIGHT: &str = "batch.json";

impl InFlight {
    fn read(state_dir: &Path) -> Result<InFlight, StageError> {
        let path = state_dir.join(IN_FLIGHT);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| StageError::data(IN_FLIGHT, None, format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(InFlight::default()),
            Err(e) => Err(StageError::io(&path)(e)),
        }
    }

    /// Written atomically and synced before the next call to the API depends on it.
    fn save(&self, state_dir: &Path) -> Result<(), StageError> {
        let path = state_dir.join(IN_FLIGHT);
        let text = serde_json::to_string(self).expect("state serializes");
        crate::table::write_file(&path, text.as_bytes()).map_err(StageError::io(&path))
    }
}

/// For `status`: the batch a killed run left in flight, if any.
pub(super) fn in_flight_note(state_dir: &Path) -> Option<String> {
    let state = InFlight::read(state_dir).ok()?;
    match (state.batch_id, state.file_id) {
        (Some(batch), _) => Some(format!("batch {batch} in flight (the next run polls it)")),
        (None, Some(file)) => Some(format!(
            "file {file} uploaded, its batch not recorded (the next run looks for it)"
        )),
        (None, None) => None,
    }
}

impl GenerateStage {
    /// Sends the `pending` requests as one batch through the Batch API (or resumes the batch
    /// a killed run left in flight), waits for it, and journals every answer in its output to
    /// a `wanted` request.
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
        let api = BatchApi::new(
            &self.config.endpoints[0],
            self.api_key()?,
            Duration::from_secs_f64(self.config.timeout_s),
        )?;
        let policy = RetryPolicy {
            max_retries: self.config.max_retries,
            base_delay: Duration::from_secs_f64(self.config.backoff_s),
            ..RetryPolicy::default()
        };
        let mut in_flight = InFlight::read(&state_dir)?;
        if in_flight.file_id.is_none() {
            let input = state_dir.join("batch-input.jsonl");
            self.write_pending(ctx, &input, index).await?;
            in_flight.file_id = Some(policy.retry(|| api.upload(&input)).await.0?);
            in_flight.save(&state_dir)?;
        }
        let file_id = in_flight.file_id.clone().expect("uploaded above");
        let batch_id = match in_flight.batch_id.clone() {
            Some(id) => id,
            None => {
                // A run killed after creating the batch but before recording it finds it here.
                let batch = match policy.retry(|| api.find(&file_id)).await.0? {
                    Some(batch) => batch,
                    None => {
                        let window = config.completion_window.as_str();
                        policy.retry(|| api.create(&file_id, window)).await.0?
                    }
                };
                in_flight.batch_id = Some(batch.id.clone());
                in_flight.save(&state_dir)?;
                batch.id
            }
        };
        tracing::debug!(batch = %batch_id, file = %file_id, "batch in flight");
        let bar = ctx.progress(Some(pending as u64), "requests (batch)");
        let batch = loop {
            let batch = policy.retry(|| api.get(&batch_id)).await.0?;
            let counts = batch.request_counts.unwrap_or_default();
            bar.set_position(counts.completed + counts.failed);
            bar.set_message(batch.status.clone());
            if batch.is_finished() {
                break batch;
            }
            tokio::time::sleep(Duration::from_secs_f64(config.poll_s)).await;
        };
        bar.finish_and_clear();
        let files = [&batch.output_file_id, &batch.error_file_id];
        for (n, file) in files.into_iter().flatten().enumerate() {
            let path = state_dir.join(format!("batch-output-{n}.jsonl"));
            let bytes = policy.retry(|| api.download(file)).await.0?;
            crate::table::write_file(&path, &bytes).map_err(StageError::io(&path))?;
            import_batch(&path, wanted, journal, index)?;
        }
        // Done with this batch: a rerun sends what it did not answer as a new one.
        std::fs::remove_file(state_dir.join(IN_FLIGHT))
            .map_err(StageError::io(state_dir.join(IN_FLIGHT)))?;
        if batch.status == "failed" && batch.output_file_id.is_none() {
            return Err(StageError::Llm(llm::LlmError::BatchFailed(format!(
                "{}: {}",
                batch.id,
                batch.errors.unwrap_or_default()
            ))));
        }
        Ok(())
    }
}
