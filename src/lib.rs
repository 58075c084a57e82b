//! synthrank: train dense retrievers on LLM-written passages of graded relevance (SyCL), as a
//! dataflow pipeline of declarative stages over Arrow/Parquet tables.
//!
//! Layering (see ARCHITECTURE.md): `spec` and `table` know nothing of stages; `pipeline` runs
//! stages through a narrow contract; `stages` adapt tables to the pipeline-free modules
//! (`formats`, ...); `cli` maps everything to commands, messages and exit codes.

pub mod allocator;
pub mod cli;
pub mod encoder;
pub mod formats;
pub mod linalg;
pub mod llm;
pub mod loss;
pub mod metrics;
pub mod pipeline;
pub(crate) mod plot;
pub mod retrieval;
pub mod spec;
pub mod stages;
pub mod table;
pub mod train;
