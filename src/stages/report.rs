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

use crate::metrics::{PairedTest, paired_test};
use crate::pipeline::{
    ConfigError, InputRoles, OutputDecl, Stage, StageContext, StageError, StageKind, parse_config,
};
use crate::plot::{self, Series, escape};
use crate::table::columns;

pub(crate) struct Report;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_title")]
    title: String,
    /// Measures to show (names as in the metrics tables, e.g. `ndcg_cut_10`); default: all.
    #[serde(default)]
    measures: Vec<String>,
    /// The run every other run is tested against (paired, per measure, on the queries both
    /// evaluated); without one, no tests (runs on different query sets are not comparable).
    #[serde(default)]
    baseline: Option<String>,
    /// Sign flips for the permutation test: all 2^n when that is at most this, else this many
    /// random ones.
    #[serde(default = "default_permutations")]
    permutations: u64,
    #[serde(default)]
    seed: u64,
    /// Extra rows: the mean over some runs of their means (e.g. the BEIR average).
    #[serde(default)]
    averages: Vec<Average>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Average {
    name: String,
    runs: Vec<String>,
}

fn default_permutations() -> u64 {
    10_000
}

fn default_title() -> String {
    "synthrank report".to_string()
}

impl StageKind for Report {
    fn kind(&self) -> &'static str {
        "report"
    }
    /// 2: the `significance` table.
    fn version(&self) -> u32 {
        2
    }
    fn inputs(&self) -> InputRoles {
        InputRoles::Any
    }
    fn prepare(&self, config: &serde_json::Value, _: &Path) -> Result<Box<dyn Stage>, ConfigError> {
        let config: Config = parse_config(config)?;
        if config.permutations == 0 {
            return Err(ConfigError::new("permutations", "must be at least 1"));
        }
        for (i, a) in config.averages.iter().enumerate() {
            if a.runs.is_empty() {
                return Err(ConfigError::new(
                    format!("averages[{i}].runs"),
                    "name at least one run",
                ));
            }
        }
        Ok(Box::new(ReportStage { config }))
    }
}

struct ReportStage {
    config: Config,
}

impl Stage for ReportStage {
    fn outputs(&self) -> Vec<OutputDecl> {
        ["summary", "significance"]
            .into_iter()
            .map(|name| OutputDecl {
                name: name.to_string(),
                kind: None,
            })
            .collect()
    }

    fn run<'a>(&'a self, ctx: &'a mut StageContext) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(self.report(ctx))
    }
}

/// One run's metrics: measure -> mean, and measure -> query -> value.
struct RunMetrics {
    name: String,
    means: BTreeMap<String, f64>,
    per_query: BTreeMap<String, BTreeMap<String, f64>>,
}

/// What one `generations` input's stage bought, from its manifest's counters.
struct Spending {
    name: String,
    answers: u64,
    rejects: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// With `price_per_mtok` configured on that stage.
    cost_usd: Option<f64>,
}

impl Spending {
    fn cost(&self) -> String {
        self.cost_usd.map_or("–".to_string(), |c| format!("{c:.4}"))
    }
}

/// A run tested against the baseline on one measure.
struct Comparison {
    run: String,
    measure: String,
    test: PairedTest,
}

impl ReportStage {
    async fn report(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let roles: Vec<String> = ctx
            .inputs()
            .filter(|i| i.kind == Some("metrics"))
            .map(|i| i.role.clone())
            .collect();
        if roles.is_empty() {
            return Err(StageError::config(
                "inputs",
                "a report needs at least one input of kind `metrics`",
            ));
        }
        let mut runs = Vec::new();
        for role in &roles {
            runs.push(self.read_run(ctx, role).await?);
        }
        let baseline = self.config.baseline.clone().unwrap_or_default();
        if !baseline.is_empty() && !roles.contains(&baseline) {
            return Err(StageError::config(
                "baseline",
                format!(
                    "`{baseline}` is not a metrics input (inputs: {})",
                    roles.join(", ")
                ),
            ));
        }
        let averages = self.averages(&runs)?;
        let training = self.training_plots(ctx).await?;
        let spending = spending(ctx)?;
        let measures = self.measures(&runs);
        self.write_plots(ctx, &runs, &measures)?;
        let comparisons = self.comparisons(&runs, &baseline, &measures);
        runs.extend(averages);
        let mut markdown = markdown_table(&runs, &measures);
        markdown.push_str(&markdown_significance(&baseline, &comparisons));
        markdown.push_str(&markdown_spending(&spending));
        std::fs::write(ctx.output_path("summary.md")?, &markdown)
            .map_err(StageError::io("summary.md"))?;
        std::fs::write(
            ctx.output_path("summary.tex")?,
            latex_table(&runs, &measures),
        )
        .map_err(StageError::io("summary.tex"))?;
        std::fs::write(
            ctx.output_path("report.html")?,
            self.html(
                &runs,
                &measures,
                &training,
                &baseline,
                &comparisons,
                &spending,
            ),
        )
        .map_err(StageError::io("report.html"))?;
        write_significance(ctx, &baseline, &comparisons)?;
        self.write_summary(ctx, &runs, &measures)
    }

    /// The configured measures, or every measure with a mean or per-query values (a table may
    /// lack `all` rows).
    fn measures(&self, runs: &[RunMetrics]) -> Vec<String> {
        if !self.config.measures.is_empty() {
            return self.config.measures.clone();
        }
        let mut all: Vec<String> = runs
            .iter()
            .flat_map(|r| r.means.keys().chain(r.per_query.keys()).cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Bars of the means, and per measure each run's per-query values, best first.
    fn write_plots(
        &self,
        ctx: &StageContext,
        runs: &[RunMetrics],
        measures: &[String],
    ) -> Result<(), StageError> {
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
            plot::grouped_bars(&self.config.title, "mean over queries", measures, &bars),
        )
        .map_err(StageError::io("plots/metrics.svg"))?;
        for measure in measures {
            let lines: Vec<Series> = runs
                .iter()
                .map(|r| {
                    let mut values: Vec<f64> = r
                        .per_query
                        .get(measure)
                        .map(|q| q.values().copied().collect())
                        .unwrap_or_default();
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
        Ok(())
    }

    /// One row per configured average: the mean of the named runs' means, per measure that
    /// every one of them has.
    fn averages(&self, runs: &[RunMetrics]) -> Result<Vec<RunMetrics>, StageError> {
        self.config
            .averages
            .iter()
            .map(|average| {
                let members: Vec<&RunMetrics> = average
                    .runs
                    .iter()
                    .map(|name| {
                        runs.iter().find(|r| &r.name == name).ok_or_else(|| {
                            StageError::config(
                                "averages",
                                format!(
                                    "average `{}` names `{name}`, which is not a metrics input",
                                    average.name
                                ),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
                let mut means = BTreeMap::new();
                for measure in members[0].means.keys() {
                    let values: Option<Vec<f64>> = members
                        .iter()
                        .map(|r| r.means.get(measure).copied())
                        .collect();
                    if let Some(values) = values {
                        means.insert(
                            measure.clone(),
                            values.iter().sum::<f64>() / values.len() as f64,
                        );
                    }
                }
                Ok(RunMetrics {
                    name: average.name.clone(),
                    means,
                    per_query: BTreeMap::new(),
                })
            })
            .collect()
    }

    /// Every other run against the baseline, per measure, over the queries both evaluated.
    fn comparisons(
        &self,
        runs: &[RunMetrics],
        baseline: &str,
        measures: &[String],
    ) -> Vec<Comparison> {
        let Some(base) = runs.iter().find(|r| r.name == baseline) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for run in runs.iter().filter(|r| r.name != baseline) {
            for measure in measures {
                let (Some(a), Some(b)) = (base.per_query.get(measure), run.per_query.get(measure))
                else {
                    continue;
                };
                let (x, y): (Vec<f64>, Vec<f64>) = a
                    .iter()
                    .filter_map(|(q, &va)| b.get(q).map(|&vb| (va, vb)))
                    .unzip();
                if x.is_empty() {
                    continue;
                }
                out.push(Comparison {
                    run: run.name.clone(),
                    measure: measure.clone(),
                    test: paired_test(&x, &y, self.config.permutations, self.config.seed),
                });
            }
        }
        out
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
                        .insert(query.to_string(), value);
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
                    let n = r.per_query.get(m).map_or(0, BTreeMap::len) as i64;
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

    /// The report page, section by section in the order a reader sees them: one sequence of
    /// writes is easier to follow than the same page spread over helpers.
    fn html(
        &self,
        runs: &[RunMetrics],
        measures: &[String],
        training: &[String],
        baseline: &str,
        comparisons: &[Comparison],
        spending: &[Spending],
    ) -> String {
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
            let queries = run.per_query.values().map(BTreeMap::len).max().unwrap_or(0);
            let _ = writeln!(html, "<td>{queries}</td></tr>");
        }
        html.push_str("</table>\n<p><img src=\"plots/metrics.svg\" alt=\"metrics per run\"></p>\n");
        if !comparisons.is_empty() {
            let _ = write!(
                html,
                "<h2>Against {}</h2>\n<p>Paired over the queries both runs evaluated: mean \
                 difference, its standard error, two-sided p-values of the t-test and of the \
                 sign-flip permutation test.</p>\n<table><tr><th>run</th><th>measure</th>\
                 <th>queries</th><th>difference</th><th>std. error</th><th>p (t-test)</th>\
                 <th>p (permutation)</th></tr>\n",
                escape(baseline)
            );
            for c in comparisons {
                let t = &c.test;
                let _ = writeln!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+.4}</td><td>{:.4}</td>\
                     <td>{}</td><td>{}</td></tr>",
                    escape(&c.run),
                    escape(&c.measure),
                    t.queries,
                    t.difference,
                    t.std_error,
                    p_value(t.p_t_test),
                    p_value(t.p_permutation)
                );
            }
            html.push_str("</table>\n");
        }
        html.push_str("<h2>Per query</h2>\n");
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
        html.push_str(&html_spending(spending));
        html.push_str("<p>Also: <a href=\"summary.md\">summary.md</a>, <a href=\"summary.tex\">summary.tex</a>.</p>\n</body></html>\n");
        html
    }
}

/// The counters of every `generations` input's stage, in role order.
fn spending(ctx: &StageContext) -> Result<Vec<Spending>, StageError> {
    let roles: Vec<String> = ctx
        .inputs()
        .filter(|i| i.kind == Some("generations"))
        .map(|i| i.role.clone())
        .collect();
    roles
        .into_iter()
        .map(|role| {
            let stats = ctx.input_stats(&role)?;
            let count = |key: &str| stats.get(key).and_then(serde_json::Value::as_u64);
            Ok(Spending {
                answers: count("requests_answered").unwrap_or(0)
                    + count("requests_from_journal").unwrap_or(0),
                rejects: count("rejects").unwrap_or(0),
                prompt_tokens: count("prompt_tokens").unwrap_or(0),
                completion_tokens: count("completion_tokens").unwrap_or(0),
                cost_usd: stats.get("cost_usd").and_then(serde_json::Value::as_f64),
                name: role,
            })
        })
        .collect()
}

const SPENDING_COLUMNS: [&str; 5] = [
    "answers",
    "rejects",
    "prompt tokens",
    "completion tokens",
    "cost (USD)",
];

fn spending_cells(s: &Spending) -> [String; 5] {
    [
        s.answers.to_string(),
        s.rejects.to_string(),
        s.prompt_tokens.to_string(),
        s.completion_tokens.to_string(),
        s.cost(),
    ]
}

fn markdown_spending(spending: &[Spending]) -> String {
    if spending.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nGeneration:\n\n| stage | {} |\n|---|---:|---:|---:|---:|---:|\n",
        SPENDING_COLUMNS.join(" | ")
    );
    for s in spending {
        let _ = writeln!(out, "| {} | {} |", s.name, spending_cells(s).join(" | "));
    }
    out
}

fn html_spending(spending: &[Spending]) -> String {
    if spending.is_empty() {
        return String::new();
    }
    let mut html = String::from("<h2>Generation</h2>\n<table><tr><th>stage</th>");
    for column in &SPENDING_COLUMNS {
        let _ = write!(html, "<th>{column}</th>");
    }
    html.push_str("</tr>\n");
    for s in spending {
        let _ = write!(html, "<tr><td>{}</td>", escape(&s.name));
        for cell in spending_cells(s) {
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}

/// p-values as papers print them: four decimals, or `< 0.0001`.
fn p_value(p: f64) -> String {
    if p.is_nan() {
        "–".to_string()
    } else if p < 1e-4 {
        "< 0.0001".to_string()
    } else {
        format!("{p:.4}")
    }
}

fn markdown_significance(baseline: &str, comparisons: &[Comparison]) -> String {
    if comparisons.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nAgainst `{baseline}` (paired; two-sided p-values):\n\n\
         | run | measure | queries | difference | std. error | p (t-test) | p (permutation) |\n\
         |---|---|---:|---:|---:|---:|---:|\n"
    );
    for c in comparisons {
        let t = &c.test;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:+.4} | {:.4} | {} | {} |",
            c.run,
            c.measure,
            t.queries,
            t.difference,
            t.std_error,
            p_value(t.p_t_test),
            p_value(t.p_permutation)
        );
    }
    out
}

/// The comparisons as a table, for SQL.
fn write_significance(
    ctx: &mut StageContext,
    baseline: &str,
    comparisons: &[Comparison],
) -> Result<(), StageError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("baseline", DataType::Utf8, false),
        Field::new("run", DataType::Utf8, false),
        Field::new("measure", DataType::Utf8, false),
        Field::new("queries", DataType::Int64, false),
        Field::new("difference", DataType::Float64, false),
        Field::new("std_error", DataType::Float64, false),
        Field::new("t", DataType::Float64, false),
        Field::new("p_t_test", DataType::Float64, false),
        Field::new("p_permutation", DataType::Float64, false),
        Field::new("permutations", DataType::Int64, false),
    ]));
    let tests = || comparisons.iter().map(|c| c.test);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            columns::utf8(comparisons.iter().map(|_| baseline)),
            columns::utf8(comparisons.iter().map(|c| c.run.as_str())),
            columns::utf8(comparisons.iter().map(|c| c.measure.as_str())),
            columns::int64(tests().map(|t| t.queries as i64)),
            columns::float64(tests().map(|t| t.difference)),
            columns::float64(tests().map(|t| t.std_error)),
            columns::float64(tests().map(|t| t.t)),
            columns::float64(tests().map(|t| t.p_t_test)),
            columns::float64(tests().map(|t| t.p_permutation)),
            columns::int64(tests().map(|t| t.permutations as i64)),
        ],
    )
    .expect("significance columns");
    ctx.write_table("significance", schema, &[batch])
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
