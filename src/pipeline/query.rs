//! Read-only SQL over every built table of a pipeline.

use std::sync::Arc;

use datafusion::catalog::MemorySchemaProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{
    DataFrame, ParquetReadOptions, SQLOptions, SessionConfig, SessionContext,
};

use super::{Pipeline, PipelineError};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("`synthrank sql` is read-only: {0}")]
    ReadOnly(String),
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

impl QueryError {
    /// A query that writes, or does not plan (exit 2), rather than one that failed running.
    pub(crate) fn is_usage(&self) -> bool {
        match self {
            QueryError::ReadOnly(_) => true,
            QueryError::DataFusion(e) => is_plan_error(e),
            QueryError::Pipeline(e) => e.is_usage(),
        }
    }
}

/// SQL that does not parse or plan (a misspelt column, say): the query is wrong, not the work.
pub(crate) fn is_plan_error(e: &DataFusionError) -> bool {
    matches!(
        e.find_root(),
        DataFusionError::Plan(_) | DataFusionError::SQL(..) | DataFusionError::SchemaError(..)
    )
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> QueryError {
        QueryError::DataFusion(Box::new(e))
    }
}

/// A session where each built stage's primary table is `stage` and every table is also
/// `stage.table` (a schema per stage).
pub async fn query_session(pipeline: &Pipeline) -> Result<SessionContext, QueryError> {
    let config = SessionConfig::new().with_information_schema(true);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    let ctx = SessionContext::new_with_state(state);
    let catalog = ctx
        .catalog("datafusion")
        .expect("the default catalog exists");
    for stage in &pipeline.stages {
        let Some(manifest) = stage.manifest() else {
            continue;
        };
        catalog
            .register_schema(stage.name(), Arc::new(MemorySchemaProvider::new()))
            .map_err(QueryError::from)?;
        for (i, output) in stage.outputs.iter().enumerate() {
            let Some(entry) = manifest.tables.get(&output.name) else {
                continue;
            };
            let path = stage.dir.join(&entry.file).to_string_lossy().into_owned();
            let options = ParquetReadOptions::default();
            ctx.register_parquet(
                format!("{}.{}", stage.name(), output.name),
                &path,
                options.clone(),
            )
            .await?;
            if i == 0 {
                ctx.register_parquet(stage.name(), &path, options).await?;
            }
        }
    }
    Ok(ctx)
}

/// Plans `sql` and refuses anything but queries: no DDL (CREATE, DROP), DML (INSERT, COPY) or
/// session statements (SET).
pub async fn read_only_sql(ctx: &SessionContext, sql: &str) -> Result<DataFrame, QueryError> {
    let plan = ctx.state().create_logical_plan(sql).await?;
    verify_read_only(&plan).map_err(QueryError::ReadOnly)?;
    Ok(ctx.execute_logical_plan(plan).await?)
}

/// Why `plan` is not a plain query, if it is not: DDL (CREATE, including external tables over
/// any path), DML (INSERT, COPY ... TO a path) and session statements (SET) are refused, so SQL
/// reads only the tables registered for it and writes nothing.
pub(crate) fn verify_read_only(plan: &LogicalPlan) -> Result<(), String> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| {
            e.strip_backtrace()
                .trim_start_matches("Error during planning: ")
                .to_string()
        })
}
