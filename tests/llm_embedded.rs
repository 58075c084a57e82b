//! The embedded backend runs the real SmolLM2-135M-Instruct GGUF file: a greedy completion is
//! non-empty, deterministic, and counts its tokens; sampled answers through the pipeline equal
//! the recorded ones in data-samples.

mod common;

use std::collections::HashMap;
use std::path::Path;

use synthrank::llm::{ChatBackend, ChatRequest, EmbeddedBackend, Journal, JournalEntry, Message};
use synthrank::pipeline::Selection;

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: "smollm2".into(),
        messages: vec![
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "Name one organ of the human body."),
        ],
        max_tokens: Some(max_tokens),
        seed: Some(1),
        ..ChatRequest::default()
    }
}

#[test]
fn chatml_template() {
    assert_eq!(
        EmbeddedBackend::chatml(&request(1)),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nName one organ of the human body.<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_completion_on_the_real_model() {
    let path = common::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let backend = EmbeddedBackend::open(
        &path,
        "SmolLM2-135M-Instruct",
        synthrank::llm::EmbeddedOptions {
            max_batch: 1,
            threads: None,
        },
    )
    .unwrap();
    let rt = common::runtime();
    let first = rt.block_on(backend.complete(&request(12))).unwrap();
    assert!(!first.text.trim().is_empty(), "empty completion");
    assert!(first.completion_tokens >= 1 && first.completion_tokens <= 12);
    assert!(
        first.prompt_tokens > 10,
        "prompt tokens {}",
        first.prompt_tokens
    );
    assert_eq!(first.model, "SmolLM2-135M-Instruct");
    let again = rt.block_on(backend.complete(&request(12))).unwrap();
    assert_eq!(first.text, again.text, "greedy decoding is deterministic");
}

/// The quickstart's passages regenerated through the pipeline (16 SciFact queries x 4 levels,
/// temperature 0.7, top_p 0.9, seed 7, 16 requests decoded together) are the recorded answers
/// in data-samples, word for word: they were written by the embedded backend before it
/// batched, one prompt at a time. Batching, the block kernels and the sampler change nothing a
/// user sees.
#[test]
fn sampled_answers_equal_the_recorded_journal() {
    let repo = common::repo();
    let model = common::demo_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(
        dir.path(),
        "p.yaml",
        &format!(
            "name: replay\nworkdir: work\nstages:\n  \
             - name: queries\n    kind: load_queries\n    config: {{path: {data}, split: train, sample: {{n: 16, seed: 1}}}}\n  \
             - name: prompts\n    kind: render_prompts\n    inputs: [queries]\n    config: {{template: {template}, mode: per_level, levels: [3, 2, 1, 0]}}\n  \
             - name: passages\n    kind: generate\n    inputs: [prompts]\n    config:\n      backend: embedded\n      \
             model: SmolLM2-135M-Instruct-Q4_1\n      model_file: {model}\n      temperature: 0.7\n      top_p: 0.9\n      \
             seed: 7\n      max_tokens: 120\n      concurrency: 16\n      threads: 2\n",
            data = repo.join("data-samples/scifact-mini").display(),
            template = repo.join("pipelines/prompts/graded-passages.j2").display(),
            model = model.display(),
        ),
    );
    let workdir = dir.path().join("work");
    common::run(&common::load(&spec, &workdir), Selection::All, false);
    let read = |path: &Path| -> HashMap<String, JournalEntry> {
        Journal::entries(path)
            .unwrap()
            .map(|e| e.map(|e| (e.hash.clone(), e)))
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let recorded = read(&repo.join("data-samples/scifact-mini/smollm2-journal.jsonl"));
    let generated = read(&workdir.join(".state/passages/journal.jsonl"));
    assert_eq!(generated.len(), 64);
    for (hash, entry) in &generated {
        let expected = &recorded
            .get(hash)
            .unwrap_or_else(|| panic!("request {hash} is not in the recording"))
            .response;
        assert_eq!(entry.response.text, expected.text, "request {hash}");
        assert_eq!(
            (
                entry.response.completion_tokens,
                &entry.response.finish_reason
            ),
            (expected.completion_tokens, &expected.finish_reason),
            "request {hash}"
        );
    }
}
