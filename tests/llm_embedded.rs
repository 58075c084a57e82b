//! The embedded backend runs the real SmolLM2-135M-Instruct GGUF file: a greedy completion is
//! non-empty, deterministic, and counts its tokens.

mod common;

use synthrank::llm::{ChatBackend, ChatRequest, EmbeddedBackend, Message};

fn request(max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: "smollm2".into(),
        messages: vec![
            Message {
                role: "system".into(),
                content: "You are a helpful assistant.".into(),
            },
            Message {
                role: "user".into(),
                content: "Name one organ of the human body.".into(),
            },
        ],
        temperature: None,
        top_p: None,
        max_tokens: Some(max_tokens),
        seed: Some(1),
        stop: vec![],
        response_format: None,
        guided_json: None,
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
