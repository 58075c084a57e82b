//! Running a pipeline: stale stages in dependency order, each into a staging directory that
//! replaces its previous output only when complete.

use std::io::Write;
use std::time::Instant;

use crate::table::{MANIFEST_FILE, Manifest, ManifestTable, StagingDir, recover_interrupted};

use super::fingerprint::PROGRAM_VERSION;
use super::lock::WorkdirLock;
use super::plan::{Assessment, StageState};
use super::stage::{BoundInput, StageContext, StageError};
use super::{Pipeline, PipelineError, PlannedStage};

/// Which stages a run considers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    /// One stage; its inputs must already be built.
    Only(String),
    /// A stage and everything downstream of it.
    From(String),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub selection: Selection,
    /// Run selected stages even when fresh.
    pub force: bool,
    /// Say what would run and why; run nothing.
    pub dry_run: bool,
    /// When another run holds the work directory, wait for it instead of failing.
    pub wait_for_lock: bool,
}

#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub ran: Vec<String>,
    pub skipped_fresh: Vec<String>,
}

impl Pipeline {
    fn selected(&self, selection: &Selection) -> Result<Vec<String>, PipelineError> {
        Ok(match selection {
            Selection::All => self.stage_names().iter().map(ToString::to_string).collect(),
            Selection::Only(name) => vec![self.stage(name)?.name().to_string()],
            Selection::From(name) => {
                self.stage(name)?;
                self.downstream_of(name)
            }
        })
    }

    /// Runs (or, with `dry_run`, describes) the selected stages. Progress goes to `log`.
    pub async fn run(
        &self,
        options: &RunOptions,
        log: &mut dyn Write,
    ) -> Result<RunSummary, PipelineError> {
        // Repairing an interrupted commit needs the lock (a live run may be mid-commit). A dry
        // run only repairs when no run is live, and does not keep the lock while it assesses.
        let lock = match WorkdirLock::acquire(self.workdir(), options.wait_for_lock).await {
            Ok(lock) => {
                recover_interrupted(self.workdir())?;
                Some(lock)
            }
            Err(PipelineError::Locked { .. }) if options.dry_run => None,
            Err(e) => return Err(e),
        };
        let _lock = lock.filter(|_| !options.dry_run);
        let selected = self.selected(&options.selection)?;
        let mut summary = RunSummary::default();
        // In a dry run, the stages that would have run: their outputs would change. (A real run
        // reassesses after each stage, so a stage whose new output is identical stops the wave.)
        let mut pending: Vec<String> = Vec::new();
        let verb = if options.dry_run {
            "would run"
        } else {
            "running"
        };

        for stage in &self.stages {
            let name = stage.name().to_string();
            if !selected.contains(&name) {
                continue;
            }
            let _span =
                tracing::debug_span!("stage", name = %name, kind = %stage.spec.kind).entered();
            let assessment = self.assess(stage, &pending)?;
            tracing::debug!(state = %assessment.state.describe(), force = options.force, "assessed");
            let reason = match (&assessment.state, options.force) {
                (StageState::Fresh, false) => {
                    let _ = writeln!(log, "{name}: fresh, skipped");
                    summary.skipped_fresh.push(name);
                    continue;
                }
                (StageState::Fresh, true) => "forced".to_string(),
                (state, _) => state.describe(),
            };
            let _ = writeln!(log, "{name} ({}): {verb} — {reason}", stage.spec.kind);
            if options.dry_run {
                if let Some(note) = self.state_summary(stage) {
                    let _ = writeln!(log, "  {note}");
                }
                pending.push(name);
                continue;
            }
            if let Some(input) = assessment.missing_input {
                return Err(PipelineError::InputNotBuilt { stage: name, input });
            }
            self.warn_stale_inputs(stage, &selected, log)?;
            let manifest = self.execute(stage, &assessment).await?;
            let _ = writeln!(
                log,
                "{name}: done — {} rows in {:.2}s",
                manifest.rows(),
                manifest.duration_s
            );
            summary.ran.push(name);
        }
        Ok(summary)
    }

    /// With `--only`, a stage may run on inputs that are themselves stale; say so.
    fn warn_stale_inputs(
        &self,
        stage: &PlannedStage,
        selected: &[String],
        log: &mut dyn Write,
    ) -> Result<(), PipelineError> {
        for input in &stage.inputs {
            if selected.contains(&input.stage) {
                continue;
            }
            let producer = self.stage(&input.stage)?;
            if let StageState::Stale(_) = self.assess(producer, &[])?.state {
                let _ = writeln!(
                    log,
                    "  warning: input stage `{}` is stale; using its current output",
                    input.stage
                );
            }
        }
        Ok(())
    }

    async fn execute(
        &self,
        stage: &PlannedStage,
        assessment: &Assessment,
    ) -> Result<Manifest, PipelineError> {
        let components = assessment
            .components
            .clone()
            .expect("inputs were checked to be built");
        let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let clock = Instant::now();
        let staging = StagingDir::create(&stage.dir)?;
        let inputs = stage
            .inputs
            .iter()
            .map(|i| BoundInput {
                role: i.role.clone(),
                stage: i.stage.clone(),
                table: i.table.clone(),
                path: self
                    .workdir()
                    .join(&i.stage)
                    .join(format!("{}.parquet", i.table)),
                kind: i.kind,
                filter: i.filter.as_ref().map(|(text, _)| text.clone()),
            })
            .collect();
        let mut ctx = StageContext::new(
            stage.name(),
            inputs,
            stage.outputs.clone(),
            staging.path(),
            &self.state_dir(stage.name()),
        );
        let failed = |source: StageError| PipelineError::Stage {
            stage: stage.name().to_string(),
            source: Box::new(source),
        };
        stage.stage.run(&mut ctx).await.map_err(failed)?;
        let (written, stats) = ctx.into_results();

        let mut tables = std::collections::BTreeMap::new();
        for output in &stage.outputs {
            let table = written
                .iter()
                .find(|w| w.name == output.name)
                .ok_or_else(|| {
                    failed(StageError::Contract(format!(
                        "the stage did not write its table `{}`",
                        output.name
                    )))
                })?;
            tables.insert(
                output.name.clone(),
                ManifestTable {
                    file: format!("{}.parquet", output.name),
                    kind: table.kind.clone(),
                    rows: table.rows,
                    hash: table.hash.clone(),
                    stamp: table.stamp,
                },
            );
        }
        let manifest = Manifest {
            stage: stage.name().to_string(),
            kind: stage.spec.kind.clone(),
            fingerprint: components.fingerprint(),
            components: serde_json::to_value(&components).expect("components serialize"),
            tables,
            started_at,
            duration_s: clock.elapsed().as_secs_f64(),
            program_version: PROGRAM_VERSION.to_string(),
            stats,
        };
        manifest.write(&staging.path().join(MANIFEST_FILE))?;
        staging.commit()?;
        stage.stage.release_state(&self.state_dir(stage.name()));
        Ok(manifest)
    }
}
