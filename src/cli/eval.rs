//! `synthrank eval`: trec_eval on files, without a pipeline.

use std::path::Path;

use crate::formats::{self, FormatError};
use crate::metrics::{self, EvalOptions, Measure, Qrels, Run, RunBuilder};

use super::CliError;

pub(crate) fn read_qrels(path: &Path) -> Result<Qrels, CliError> {
    let mut qrels = Qrels::default();
    for row in formats::qrels(path)? {
        let row = row?;
        let relevance = row.fields[2].trim().parse::<i32>().map_err(|_| {
            CliError::from(FormatError::record(
                path,
                row.at,
                format!("relevance `{}` is not an integer", row.fields[2]),
            ))
        })?;
        qrels.insert(&row.fields[0], &row.fields[1], relevance);
    }
    Ok(qrels)
}

pub(crate) fn read_run(path: &Path) -> Result<Run, CliError> {
    let mut run = RunBuilder::default();
    let mut lines = Vec::new();
    for row in formats::trec_run(path)? {
        let row = row?;
        run.insert(
            &row.fields[0],
            &row.fields[1],
            row.fields[2].parse().expect("checked by the reader"),
        );
        lines.push(row.at);
    }
    let run = run.finish();
    // Checked once the run is built, query by query (`Run::first_repeat`, as the `evaluate`
    // stage checks a `runs` table): a set of every (query, document) pair read had held two
    // strings per line of the file.
    if let Some(repeat) = run.first_repeat() {
        return Err(CliError::from(FormatError::record(
            path,
            lines[repeat.row],
            repeat.to_string(),
        )));
    }
    Ok(run)
}

pub(crate) fn parse_measures(specs: &[String]) -> Result<Vec<Measure>, CliError> {
    let specs: Vec<&str> = if specs.is_empty() {
        metrics::DEFAULT_MEASURES.to_vec()
    } else {
        specs.iter().map(String::as_str).collect()
    };
    let mut measures = Vec::new();
    for spec in specs {
        measures.extend(Measure::parse_list(spec).map_err(|e| CliError::Usage(e.to_string()))?);
    }
    Ok(measures)
}

/// Prints trec_eval's three-column format: `measure  query  value`, means under `all`.
pub(crate) fn print(per_query: &metrics::PerQuery, measures: &[Measure], show_queries: bool) {
    if show_queries {
        for (query, values) in per_query {
            for m in measures {
                println!("{:<22}\t{query}\t{:.4}", m.name(), values[&m.name()]);
            }
        }
    }
    let means = metrics::mean(per_query);
    println!("{:<22}\tall\t{}", "num_q", per_query.len());
    for m in measures {
        println!(
            "{:<22}\tall\t{:.4}",
            m.name(),
            means.get(&m.name()).copied().unwrap_or(0.0)
        );
    }
}

pub fn run(
    qrels: &Path,
    run_file: &Path,
    measures: &[String],
    options: EvalOptions,
    per_query: bool,
) -> Result<(), CliError> {
    let measures = parse_measures(measures)?;
    let qrels = read_qrels(qrels)?;
    let run = read_run(run_file)?;
    let results = metrics::evaluate(&qrels, &run, &measures, options);
    print(&results, &measures, per_query);
    Ok(())
}
