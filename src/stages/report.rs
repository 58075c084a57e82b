//! `report`: metrics tables of several runs -> an HTML report with SVG plots, and the comparison
//! as a table, Markdown and LaTeX.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::pipeline::{
    ConfigError, InputRoles, OutputDecl, Stage, StageContext, StageError, StageKind, parse_config,
};
use crate::plot::{self, Series};
use crate::table::columns;

pub struct Report;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_title")]
    title: String,
    /// Measures to show (names as in the metrics tables, e.g. `ndcg_cut_10`); default: all.
    #[serde(default)]
    measures: Vec<String>,
}

fn default_title() -> String {
    "synthrank report".to_string()
}

impl StageKind for Report {
    fn kind(&self) -> &'static str {
        "report"
    }
    fn summary(&self) -> &'static str {
        "HTML report with plots and a comparison table of metrics across runs"
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Any
    }
    fn prepare(&self, config: &serde_json::Value, _: &Path) -> Result<Box<dyn Stage>, ConfigError> {
        Ok(Box::new(Prepared {
            config: parse_config(config)?,
        }))
    }
}

struct Prepared {
    config: Config,
}

impl Stage for Prepared {
    fn outputs(&self) -> Vec<OutputDecl> {
        vec![OutputDecl {
            name: "summary".to_string(),
            kind: None,
        }]
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.report(ctx))
    }
}

/// One run's metrics: measure -> (mean, per-query values).
struct RunMetrics {
    name: String,
    means: BTreeMap<String, f64>,
    per_query: BTreeMap<String, Vec<f64>>,
}

impl Prepared {
    async fn report(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let roles: Vec<String> = ctx
            .inputs()
            .filter(|i| i.kind == Some("metrics"))
            .map(|i| i.role.clone())
            .collect();
        if roles.is_empty() {
            return Err(StageError::Invalid(
                "a report needs at least one input of kind `metrics`".to_string(),
            ));
        }
        let mut runs = Vec::new();
        for role in roles {
            runs.push(self.read_run(ctx, &role).await?);
        }
        let training = self.training_plots(ctx).await?;
        let measures: Vec<String> = if self.config.measures.is_empty() {
            let mut all: Vec<String> = runs.iter().flat_map(|r| r.means.keys().cloned()).collect();
            all.sort();
            all.dedup();
            all
        } else {
            self.config.measures.clone()
        };

        let bars: Vec<Series> = runs
            .iter()
            .map(|r| Series {
                name: r.name.clone(),
                values: measures
                    .iter()
                    .map(|m| r.means.get(m).copied().unwrap_or(f64::NAN))
                    .collect(),
            })
            .collect();
        std::fs::write(
            ctx.output_path("plots/metrics.svg")?,
            plot::grouped_bars(&self.config.title, "mean over queries", &measures, &bars),
        )
        .map_err(StageError::io("plots/metrics.svg"))?;
        for measure in &measures {
            let lines: Vec<Series> = runs
                .iter()
                .map(|r| {
                    let mut values = r.per_query.get(measure).cloned().unwrap_or_default();
                    values.sort_by(|a, b| b.total_cmp(a));
                    Series {
                        name: r.name.clone(),
                        values,
                    }
                })
                .collect();
            let file = format!("plots/per_query_{measure}.svg");
            std::fs::write(
                ctx.output_path(&file)?,
                plot::lines(
                    &format!("{measure} per query"),
                    "queries, best first",
                    measure,
                    &lines,
                ),
            )
            .map_err(StageError::io(&file))?;
        }
        let markdown = markdown_table(&runs, &measures);
        std::fs::write(ctx.output_path("summary.md")?, &markdown)
            .map_err(StageError::io("summary.md"))?;
        std::fs::write(
            ctx.output_path("summary.tex")?,
            latex_table(&runs, &measures),
        )
        .map_err(StageError::io("summary.tex"))?;
        std::fs::write(
            ctx.output_path("report.html")?,
            self.html(&runs, &measures, &training),
        )
        .map_err(StageError::io("report.html"))?;
        self.write_summary(ctx, &runs, &measures)
    }

    async fn read_run(&self, ctx: &mut StageContext, role: &str) -> Result<RunMetrics, StageError> {
        let mut run = RunMetrics {
            name: role.to_string(),
            means: BTreeMap::new(),
            per_query: BTreeMap::new(),
        };
        for batch in ctx.read_input(role).await? {
            let queries = columns::get::<StringArray>(&batch, "query_id");
            let names = columns::get::<StringArray>(&batch, "measure");
            let values = columns::get::<Float64Array>(&batch, "value");
            for row in 0..batch.num_rows() {
                let (query, measure, value) =
                    (queries.value(row), names.value(row), values.value(row));
                if query == "all" {
                    run.means.insert(measure.to_string(), value);
                } else {
                    run.per_query
                        .entry(measure.to_string())
                        .or_default()
                        .push(value);
                }
            }
        }
        Ok(run)
    }

    fn write_summary(
        &self,
        ctx: &mut StageContext,
        runs: &[RunMetrics],
        measures: &[String],
    ) -> Result<(), StageError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("run", DataType::Utf8, false),
            Field::new("measure", DataType::Utf8, false),
            Field::new("value", DataType::Float64, true),
            Field::new("queries", DataType::Int64, false),
        ]));
        let rows: Vec<(&str, &str, Option<f64>, i64)> = runs
            .iter()
            .flat_map(|r| {
                measures.iter().map(move |m| {
                    let n = r.per_query.get(m).map_or(0, Vec::len) as i64;
                    (r.name.as_str(), m.as_str(), r.means.get(m).copied(), n)
                })
            })
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                columns::utf8(rows.iter().map(|r| r.0)),
                columns::utf8(rows.iter().map(|r| r.1)),
                columns::nullable_float64(rows.iter().map(|r| r.2)),
                columns::int64(rows.iter().map(|r| r.3)),
            ],
        )
        .expect("summary columns");
        ctx.write_table("summary", schema, &[batch])
    }

    /// Loss and learning-rate curves of every `train_log` input; returns the plot files.
    async fn training_plots(&self, ctx: &mut StageContext) -> Result<Vec<String>, StageError> {
        let roles: Vec<String> = ctx
            .inputs()
            .filter(|i| i.kind == Some("train_log"))
            .map(|i| i.role.clone())
            .collect();
        let mut files = Vec::new();
        for role in roles {
            let (mut loss, mut lr) = (Vec::new(), Vec::new());
            for batch in ctx.read_input(&role).await? {
                loss.extend(columns::get::<Float64Array>(&batch, "loss").values().iter());
                lr.extend(columns::get::<Float64Array>(&batch, "lr").values().iter());
            }
            for (what, values) in [("loss", loss), ("lr", lr)] {
                let file = format!("plots/train_{role}_{what}.svg");
                let series = [Series {
                    name: role.clone(),
                    values,
                }];
                std::fs::write(
                    ctx.output_path(&file)?,
                    plot::lines(&format!("{role}: {what}"), "optimizer step", what, &series),
                )
                .map_err(StageError::io(&file))?;
                files.push(file);
            }
        }
        Ok(files)
    }

    fn html(&self, runs: &[RunMetrics], measures: &[String], training: &[String]) -> String {
        let mut html = String::new();
        let title = escape(&self.config.title);
        let _ = write!(
            html,
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n\
             <style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}}table{{border-collapse:collapse}}\
             td,th{{padding:4px 10px;border-bottom:1px solid #ccc;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>\n\
             </head><body>\n<h1>{title}</h1>\n<h2>Mean over queries</h2>\n<table><tr><th>run</th>"
        );
        for m in measures {
            let _ = write!(html, "<th>{}</th>", escape(m));
        }
        html.push_str("<th>queries</th></tr>\n");
        for run in runs {
            let _ = write!(html, "<tr><td>{}</td>", escape(&run.name));
            for m in measures {
                let _ = write!(
                    html,
                    "<td>{}</td>",
                    run.means
                        .get(m)
                        .map_or("–".to_string(), |v| format!("{v:.4}"))
                );
            }
            let queries = run.per_query.values().map(Vec::len).max().unwrap_or(0);
            let _ = writeln!(html, "<td>{queries}</td></tr>");
        }
        html.push_str("</table>\n<p><img src=\"plots/metrics.svg\" alt=\"metrics per run\"></p>\n<h2>Per query</h2>\n");
        for m in measures {
            let _ = writeln!(
                html,
                "<p><img src=\"plots/per_query_{}.svg\" alt=\"{} per query\"></p>",
                escape(m),
                escape(m)
            );
        }
        if !training.is_empty() {
            html.push_str("<h2>Training</h2>\n");
            for file in training {
                let _ = writeln!(
                    html,
                    "<p><img src=\"{}\" alt=\"training curve\"></p>",
                    escape(file)
                );
            }
        }
        html.push_str("<p>Also: <a href=\"summary.md\">summary.md</a>, <a href=\"summary.tex\">summary.tex</a>.</p>\n</body></html>\n");
        html
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cell(run: &RunMetrics, measure: &str) -> String {
    run.means
        .get(measure)
        .map_or("–".to_string(), |v| format!("{v:.4}"))
}

fn markdown_table(runs: &[RunMetrics], measures: &[String]) -> String {
    let mut out = format!(
        "| run | {} |\n|---|{}\n",
        measures.join(" | "),
        "---:|".repeat(measures.len())
    );
    for run in runs {
        let cells: Vec<String> = measures.iter().map(|m| cell(run, m)).collect();
        let _ = writeln!(out, "| {} | {} |", run.name, cells.join(" | "));
    }
    out
}

fn latex_table(runs: &[RunMetrics], measures: &[String]) -> String {
    let tex = |s: &str| s.replace('_', "\\_");
    let mut out = format!(
        "\\begin{{tabular}}{{l{}}}\n\\toprule\nrun & {} \\\\\n\\midrule\n",
        "r".repeat(measures.len()),
        measures
            .iter()
            .map(|m| tex(m))
            .collect::<Vec<_>>()
            .join(" & ")
    );
    for run in runs {
        let cells: Vec<String> = measures.iter().map(|m| cell(run, m)).collect();
        let _ = writeln!(out, "{} & {} \\\\", tex(&run.name), cells.join(" & "));
    }
    out.push_str("\\bottomrule\n\\end{tabular}\n");
    out
}
