//! Stage kinds, one module each; each adapts tables to a lower-level module and back.

mod evaluate;
mod generate;
mod load;
mod render_prompts;
mod report;
mod search;
mod sql;

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
        Box::new(search::Search),
        Box::new(evaluate::Evaluate),
        Box::new(report::Report),
    ])
}
