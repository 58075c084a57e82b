//! The command line: parses arguments, runs a command, and maps every error to a one-line
//! message and an exit code (never a panic or a backtrace for a user's mistake).

mod eval;
mod output;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::pipeline::{
    Pipeline, PipelineError, QueryError, RunOptions, Selection, StageState, query_session,
    read_only_sql,
};
use crate::spec::PipelineSpec;
use crate::stages;
use crate::table::{self, TableError};
use output::RowFormat;

#[derive(Parser)]
#[command(
    name = "synthrank",
    version,
    about = "Train dense retrievers on LLM-written passages of graded relevance (SyCL), as a pipeline over Parquet tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stale stages of a pipeline, in dependency order.
    Run {
        pipeline: PathBuf,
        /// Run only this stage (its inputs must already be built).
        #[arg(long, conflicts_with = "from")]
        only: Option<String>,
        /// Run this stage and everything downstream of it.
        #[arg(long)]
        from: Option<String>,
        /// Run the selected stages even when they are fresh.
        #[arg(long)]
        force: bool,
        /// Say what would run and why; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// If another run holds the work directory, wait for it to finish (default: exit 2).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Show each stage: fresh, stale (and why) or missing; rows; last run.
    Status {
        pipeline: PathBuf,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Read-only SQL over every built table; a stage's tables are `stage` and `stage.table`.
    Sql {
        pipeline: PathBuf,
        query: String,
        #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
        format: SqlFormat,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Evaluate a TREC run file against qrels with trec_eval semantics.
    Eval {
        /// Qrels: BEIR TSV or TREC format.
        #[arg(long)]
        qrels: PathBuf,
        /// Run: TREC format (`qid Q0 doc rank score tag`).
        #[arg(long)]
        run: PathBuf,
        /// Measures in trec_eval names (`ndcg_cut.10`, `P.5,10`, `map`, `recip_rank`, `mrr_cut.10`,
        /// `recall.100`, `success.1`, `Rprec`, `ndcg`, `map_cut.10`). Default: ndcg_cut.10
        /// recall.100 map mrr_cut.10.
        #[arg(long, short = 'm', num_args = 1..)]
        measure: Vec<String>,
        /// Judgments at or above this level are relevant for binary measures (trec_eval -l).
        #[arg(long, short = 'l', default_value_t = 1)]
        relevance_level: i32,
        /// Score judged queries missing from the run as zeros (trec_eval -c).
        #[arg(short = 'c', long)]
        complete: bool,
        /// Also print each query's values (trec_eval -q).
        #[arg(short = 'q', long)]
        per_query: bool,
    },
    /// Print the schema of a table kind, or list the kinds.
    Schema { kind: Option<String> },
    /// Export a BERT-family model directory (e.g. one synthrank trained) to ONNX, for the
    /// `embed` stage's onnx backend and any ONNX Runtime user.
    ExportOnnx {
        /// The model directory (config.json, model.safetensors).
        model: PathBuf,
        /// Output file (default: MODEL/model.onnx).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Standard ONNX ops only, for runtimes other than ONNX Runtime (default: ONNX
        /// Runtime's fused Attention, SkipLayerNormalization and BiasGelu, which run faster).
        #[arg(long, conflicts_with = "int8")]
        standard_ops: bool,
        /// 8-bit weights (ONNX Runtime's QAttention and DynamicQuantizeMatMul): about 1.7x
        /// faster on CPU, embeddings approximate (cosine ~0.99 to the f32 model's).
        #[arg(long)]
        int8: bool,
    },
    /// Write a table (`stage` or `stage.table`) in another format.
    Export {
        pipeline: PathBuf,
        table: String,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Run tag (last column of a TREC run file); default: the stage name.
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
}

/// How a spec is read: its work directory and variable overrides.
#[derive(clap::Args)]
struct SpecArgs {
    /// Use this work directory instead of the spec's `workdir`.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Replace a variable of the spec's `vars:` (VALUE is YAML: `--var beir='[scifact, fiqa]'`).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not NAME=VALUE"))
}

#[derive(Clone, Copy, ValueEnum)]
enum SqlFormat {
    Table,
    Csv,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ExportFormat {
    Jsonl,
    Csv,
    Tsv,
    /// TREC run (`qid Q0 doc rank score tag`) or qrels (`qid 0 doc rel`) lines.
    Trec,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Table(#[from] TableError),
    /// Writing results to standard output or a file failed.
    #[error("{0}")]
    Output(String),
    /// A malformed run or qrels file given to `eval`.
    #[error(transparent)]
    Format(#[from] crate::formats::FormatError),
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Encoder(#[from] crate::encoder::EncoderError),
}

impl CliError {
    /// 2: the spec or the request is wrong; 1: work failed.
    fn exit_code(&self) -> i32 {
        let usage = match self {
            CliError::Pipeline(e) => e.is_usage(),
            CliError::Query(e) => e.is_usage(),
            CliError::Usage(_) => true,
            CliError::Table(e) => e.is_usage(),
            CliError::Encoder(e) => e.is_usage(),
            CliError::Output(_) | CliError::Format(_) | CliError::Io { .. } => false,
        };
        if usage { 2 } else { 1 }
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNTHRANK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                // Outputs are replaced atomically, so exiting here loses nothing: the stage in
                // progress keeps its previous table and stays stale.
                eprintln!("\ninterrupted: the stage in progress keeps its previous output");
                std::process::exit(130);
            }
        });
        match execute(cli.command).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        }
    })
}

fn load(path: &Path, args: &SpecArgs) -> Result<Pipeline, CliError> {
    let mut spec = PipelineSpec::load_with_vars(path, &args.vars).map_err(PipelineError::from)?;
    if let Some(w) = &args.workdir {
        spec.workdir = w.clone();
    }
    Ok(Pipeline::bind(spec, &stages::registry())?)
}

/// One arm per command, each a few lines that unpack its arguments and call the function that
/// does the work: long only because the commands are many.
async fn execute(command: Command) -> Result<(), CliError> {
    match command {
        Command::Run {
            pipeline,
            only,
            from,
            force,
            dry_run,
            wait,
            spec,
        } => {
            let selection = match (only, from) {
                (Some(s), _) => Selection::Only(s),
                (None, Some(s)) => Selection::From(s),
                (None, None) => Selection::All,
            };
            let options = RunOptions {
                selection,
                force,
                dry_run,
                wait_for_lock: wait,
            };
            run(&load(&pipeline, &spec)?, &options).await
        }
        Command::Status { pipeline, spec } => print_status(&load(&pipeline, &spec)?),
        Command::Sql {
            pipeline,
            query,
            format,
            spec,
        } => {
            let pipeline = load(&pipeline, &spec)?;
            let ctx = query_session(&pipeline).await?;
            let frame = read_only_sql(&ctx, &query).await?;
            let stream = frame.execute_stream().await.map_err(QueryError::from)?;
            let format = match format {
                SqlFormat::Table => RowFormat::Table,
                SqlFormat::Csv => RowFormat::Csv,
                SqlFormat::Json => RowFormat::JsonLines,
            };
            output::write_rows(stream, format, &mut std::io::stdout().lock()).await
        }
        Command::Schema { kind } => print_schema(kind.as_deref()),
        Command::ExportOnnx {
            model,
            output,
            standard_ops,
            int8,
        } => {
            let ops = match (standard_ops, int8) {
                (true, _) => crate::encoder::OnnxOps::Standard,
                (false, true) => crate::encoder::OnnxOps::OnnxRuntimeInt8,
                (false, false) => crate::encoder::OnnxOps::OnnxRuntime,
            };
            export_onnx(&model, output, ops)
        }
        Command::Eval {
            qrels,
            run,
            measure,
            relevance_level,
            complete,
            per_query,
        } => {
            let options = crate::metrics::EvalOptions {
                relevance_level,
                complete,
            };
            eval::run(&qrels, &run, &measure, options, per_query)
        }
        Command::Export {
            pipeline,
            table,
            format,
            output,
            tag,
            spec,
        } => {
            let tag = tag.unwrap_or_else(|| table.split('.').next().unwrap_or("run").to_string());
            export(
                &load(&pipeline, &spec)?,
                &table,
                RowFormat::of_export(format, &tag),
                output,
            )
            .await
        }
    }
}

async fn run(pipeline: &Pipeline, options: &RunOptions) -> Result<(), CliError> {
    if options.dry_run {
        pipeline.run(options, &mut std::io::stdout()).await?;
        return Ok(());
    }
    let summary = pipeline.run(options, &mut std::io::stderr()).await?;
    eprintln!(
        "{} stage(s) ran, {} fresh; tables in {}",
        summary.ran.len(),
        summary.skipped_fresh.len(),
        pipeline.workdir().display()
    );
    Ok(())
}

fn export_onnx(
    model: &Path,
    output: Option<PathBuf>,
    ops: crate::encoder::OnnxOps,
) -> Result<(), CliError> {
    let dir = crate::encoder::ModelDir::open(model)?;
    let bert = dir.load_model(&candle_core::Device::Cpu)?;
    let path = output.unwrap_or_else(|| model.join("model.onnx"));
    crate::encoder::export_onnx(&bert, &path, ops)?;
    println!("{}", path.display());
    Ok(())
}

/// Writes a table to standard output or, atomically, to a file (a failed export leaves no
/// partial file).
async fn export(
    pipeline: &Pipeline,
    table: &str,
    format: RowFormat<'_>,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    pipeline.table_path(table)?;
    let ctx = query_session(pipeline).await?;
    let frame = ctx.table(table).await.map_err(QueryError::from)?;
    let stream = frame.execute_stream().await.map_err(QueryError::from)?;
    let Some(path) = output else {
        return output::write_rows(stream, format, &mut std::io::stdout().lock()).await;
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::Io { path, source }
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let partial = path.with_file_name(name);
    let file = std::fs::File::create(&partial).map_err(io(&partial))?;
    let mut writer = std::io::BufWriter::new(file);
    let written = output::write_rows(stream, format, &mut writer).await;
    let finished = written.and_then(|()| {
        let file = writer
            .into_inner()
            .map_err(|e| io(&partial)(e.into_error()))?;
        file.sync_all().map_err(io(&partial))
    });
    match finished {
        Ok(()) => std::fs::rename(&partial, &path).map_err(io(&path)),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn print_status(pipeline: &Pipeline) -> Result<(), CliError> {
    let assessments = pipeline.assess_all()?;
    println!(
        "pipeline `{}` ({}), workdir {}",
        pipeline.spec.name,
        pipeline.spec.path.display(),
        pipeline.workdir().display()
    );
    if let Some(description) = &pipeline.spec.description {
        println!("{}", description.trim());
    }
    let rows: Vec<[String; 5]> = pipeline
        .stages
        .iter()
        .zip(&assessments)
        .map(|(stage, a)| {
            let (rows, last) = match &a.manifest {
                Some(m) => (
                    m.rows().to_string(),
                    match m.stats.get("device").and_then(|d| d.as_str()) {
                        Some(device) => {
                            format!("{} ({:.2}s on {device})", m.started_at, m.duration_s)
                        }
                        None => format!("{} ({:.2}s)", m.started_at, m.duration_s),
                    },
                ),
                None => ("-".to_string(), "-".to_string()),
            };
            [
                stage.name().to_string(),
                stage.spec.kind.clone(),
                a.state.describe(),
                rows,
                last,
            ]
        })
        .collect();
    output::aligned(&["STAGE", "KIND", "STATE", "ROWS", "LAST RUN"], &rows);
    for (stage, note) in pipeline.state_summaries() {
        println!("{stage}: {note}");
    }
    let stale = assessments
        .iter()
        .filter(|a| a.state != StageState::Fresh)
        .count();
    if stale > 0 {
        println!(
            "{stale} stage(s) to run: synthrank run {}",
            pipeline.spec.path.display()
        );
    }
    Ok(())
}

fn print_schema(kind: Option<&str>) -> Result<(), CliError> {
    match kind {
        None => {
            let rows: Vec<[String; 2]> = table::kinds()
                .into_iter()
                .map(|k| {
                    [
                        k.to_string(),
                        table::schema(k).expect("listed").description.clone(),
                    ]
                })
                .collect();
            output::aligned(&["KIND", "DESCRIPTION"], &rows);
        }
        Some(kind) => {
            let schema = table::schema(kind)?;
            println!("{}: {}", schema.kind, schema.description);
            let rows: Vec<[String; 4]> = schema
                .columns
                .iter()
                .map(|c| {
                    [
                        c.name.clone(),
                        c.data_type.describe(),
                        if c.nullable { "null" } else { "not null" }.to_string(),
                        c.description.clone(),
                    ]
                })
                .collect();
            output::aligned(&["COLUMN", "TYPE", "NULLS", "DESCRIPTION"], &rows);
        }
    }
    Ok(())
}
