//! Deciding, for each stage, whether it is fresh, stale (and why) or missing.

use crate::table::{FileStamp, Manifest};

use super::fingerprint::{self, Components, Computed};
use super::{Pipeline, PipelineError, PlannedStage};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageState {
    Fresh,
    Stale(Vec<String>),
    Missing,
}

#[derive(Debug, Clone)]
pub struct Assessment {
    pub stage: String,
    pub state: StageState,
    pub manifest: Option<Manifest>,
    /// The components the stage would run with now (absent when an input is not built yet).
    pub components: Option<Components>,
    /// The first input stage that is not built yet, if any.
    pub missing_input: Option<String>,
}

impl StageState {
    pub(crate) fn describe(&self) -> String {
        match self {
            StageState::Fresh => "fresh".to_string(),
            StageState::Missing => "missing".to_string(),
            StageState::Stale(reasons) => format!("stale: {}", reasons.join("; ")),
        }
    }
}

impl Pipeline {
    /// Assesses one stage. `pending` lists stages that will run (or are stale) before it: their
    /// outputs will change, so the stage is stale without looking further.
    pub fn assess(
        &self,
        stage: &PlannedStage,
        pending: &[String],
    ) -> Result<Assessment, PipelineError> {
        let manifest = stage.manifest();
        let previous: Option<Components> = manifest
            .as_ref()
            .and_then(|m| serde_json::from_value(m.components.clone()).ok());
        let producers: Vec<&PlannedStage> = self.stages.iter().collect();
        let computed = fingerprint::compute(stage, &producers, previous.as_ref())?;
        let (components, missing_input) = match computed {
            Computed::Ready(c) => (Some(c), None),
            Computed::InputMissing(stage) => (None, Some(stage)),
        };
        let assessment = |state| Assessment {
            stage: stage.name().to_string(),
            state,
            manifest: manifest.clone(),
            components: components.clone(),
            missing_input: missing_input.clone(),
        };
        let Some(m) = &manifest else {
            return Ok(assessment(StageState::Missing));
        };
        let upstream: Vec<String> = stage
            .inputs
            .iter()
            .filter(|i| pending.contains(&i.stage))
            .map(|i| format!("upstream `{}` is stale", i.stage))
            .collect();
        if !upstream.is_empty() {
            return Ok(assessment(StageState::Stale(upstream)));
        }
        let mut reasons = output_problems(stage, m);
        match (&components, &previous) {
            (Some(now), Some(before)) if now.fingerprint() != m.fingerprint => {
                reasons.extend(now.differences(before));
            }
            (Some(_), Some(_)) => {}
            (Some(_), None) => reasons.push("manifest from an incompatible version".to_string()),
            (None, _) => reasons.push("an input is not built".to_string()),
        }
        Ok(assessment(if reasons.is_empty() {
            StageState::Fresh
        } else {
            StageState::Stale(reasons)
        }))
    }

    /// Assesses every stage in order, propagating staleness downstream.
    pub fn assess_all(&self) -> Result<Vec<Assessment>, PipelineError> {
        let mut pending: Vec<String> = Vec::new();
        let mut all = Vec::new();
        for stage in &self.stages {
            let a = self.assess(stage, &pending)?;
            if a.state != StageState::Fresh {
                pending.push(stage.name().to_string());
            }
            all.push(a);
        }
        Ok(all)
    }
}

/// A stage whose output files were removed or edited by hand is stale.
fn output_problems(stage: &PlannedStage, manifest: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    for output in &stage.outputs {
        let Some(entry) = manifest.tables.get(&output.name) else {
            problems.push(format!("output `{}` was never written", output.name));
            continue;
        };
        match FileStamp::of(&stage.dir.join(&entry.file)) {
            Err(_) => problems.push(format!("output `{}` is missing", entry.file)),
            Ok(stamp) if stamp != entry.stamp => problems.push(format!(
                "output `{}` was modified outside synthrank",
                entry.file
            )),
            Ok(_) => {}
        }
    }
    problems
}
