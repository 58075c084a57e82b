//! Stage kinds, one module each; each adapts tables to a lower-level module and back.

mod assemble;
mod embed;
mod evaluate;
mod generate;
mod load;
mod render_prompts;
mod report;
mod search;
mod spill_vec;
mod sql;
mod tokenize;
mod train;

use crate::pipeline::Registry;

/// Every stage kind synthrank knows.
pub fn registry() -> Registry {
    Registry::new(vec![
        Box::new(load::LoadQueries),
        Box::new(load::LoadCorpus),
        Box::new(load::LoadQrels),
        Box::new(render_prompts::RenderPrompts),
        Box::new(generate::Generate),
        Box::new(sql::SqlStage),
        Box::new(assemble::Assemble),
        Box::new(tokenize::Tokenize),
        Box::new(train::Train),
        Box::new(embed::Embed),
        Box::new(search::Search),
        Box::new(evaluate::Evaluate),
        Box::new(report::Report),
    ])
}

/// Runs `f` on a thread pool of `threads` workers when asked (candle and gemm use rayon).
/// The paper's relevance levels, best first: what prompts ask for and answers are read as.
pub(crate) fn default_levels() -> Vec<i32> {
    vec![3, 2, 1, 0]
}

use crate::pipeline::StageError;

/// Runs CPU-bound work on tokio's blocking pool, off the async workers (on any runtime
/// flavor); a panic in it resumes in the caller.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StageError> + Send + 'static,
) -> Result<T, StageError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StageError::Contract(format!(
            "a blocking task was cancelled: {e}"
        ))),
    }
}

pub(crate) fn with_threads<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> T {
    match threads.and_then(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().ok()) {
        Some(pool) => pool.install(f),
        None => f(),
    }
}
