//! `evaluate`: runs + qrels -> metrics, per query and mean, with trec_eval semantics.

use std::path::Path;

use arrow::array::{Float64Array, Int32Array, RecordBatch, StringArray};
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::metrics::{self, EvalOptions, Measure, Qrels, Run};
use crate::pipeline::{
    ConfigError, InputRole, InputRoles, OutputDecl, Stage, StageContext, StageError, StageKind,
    parse_config,
};
use crate::table::{self, columns};

pub(crate) struct Evaluate;

const INPUTS: &[InputRole] = &[
    InputRole {
        name: "runs",
        kind: Some("runs"),
        required: true,
    },
    InputRole {
        name: "qrels",
        kind: Some("qrels"),
        required: true,
    },
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// trec_eval measure names (`ndcg_cut.10`, `recall.100`, `P.5,10`, ...).
    #[serde(default)]
    measures: Vec<String>,
    #[serde(default = "default_level")]
    relevance_level: i32,
    /// Score judged queries absent from the run as zeros (trec_eval -c).
    #[serde(default)]
    complete: bool,
}

fn default_level() -> i32 {
    1
}

impl StageKind for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Fixed(INPUTS)
    }
    fn prepare(&self, config: &serde_json::Value, _: &Path) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        let specs: Vec<&str> = if config.measures.is_empty() {
            metrics::DEFAULT_MEASURES.to_vec()
        } else {
            config.measures.iter().map(String::as_str).collect()
        };
        let mut measures = Vec::new();
        for spec in specs {
            measures.extend(
                Measure::parse_list(spec)
                    .map_err(|e| ConfigError::new("measures", e.to_string()))?,
            );
        }
        let options = EvalOptions {
            relevance_level: config.relevance_level,
            complete: config.complete,
        };
        Ok(Box::new(EvaluateStage { measures, options }))
    }
}

struct EvaluateStage {
    measures: Vec<Measure>,
    options: EvalOptions,
}

impl Stage for EvaluateStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl::of_kind("metrics")]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.evaluate(ctx))
    }
}

impl EvaluateStage {
    async fn evaluate(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let mut qrels = Qrels::default();
        for batch in ctx.read_input("qrels").await? {
            let queries = columns::get::<StringArray>(&batch, "query_id");
            let docs = columns::get::<StringArray>(&batch, "doc_id");
            let relevance = columns::get::<Int32Array>(&batch, "relevance");
            for row in 0..batch.num_rows() {
                qrels.insert(queries.value(row), docs.value(row), relevance.value(row));
            }
        }
        let mut run = Run::default();
        for batch in ctx.read_input("runs").await? {
            run.append(
                columns::get::<StringArray>(&batch, "query_id"),
                columns::get::<StringArray>(&batch, "doc_id"),
                columns::get::<Float64Array>(&batch, "score"),
            );
        }
        // trec_eval's measures assume a document is retrieved once per query.
        if let Some(repeat) = run.first_repeat() {
            return Err(StageError::Data {
                input: "runs".to_string(),
                row: Some(repeat.row + 1),
                message: repeat.to_string(),
            });
        }
        let per_query = metrics::evaluate(&qrels, &run, &self.measures, self.options);
        let means = metrics::mean(&per_query);

        let mut rows: Vec<(String, String, f64)> = Vec::new();
        for (query, values) in &per_query {
            for m in &self.measures {
                rows.push((query.clone(), m.name(), values[&m.name()]));
            }
        }
        for m in &self.measures {
            rows.push((
                "all".to_string(),
                m.name(),
                means.get(&m.name()).copied().unwrap_or(0.0),
            ));
        }
        let schema = table::schema("metrics")?.arrow();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(rows.iter().map(|r| r.0.as_str())),
                columns::utf8(rows.iter().map(|r| r.1.as_str())),
                columns::float64(rows.iter().map(|r| r.2)),
            ],
        )
        .expect("columns follow the metrics kind");
        ctx.set_stat("queries_evaluated", per_query.len() as u64);
        ctx.set_stat(
            "mean",
            serde_json::to_value(&means).expect("numbers serialize"),
        );
        ctx.write_table("metrics", schema, &[batch])
    }
}
