//! Any bytes as a `/v1/chat/completions` body, through the gateway's own steps: JSON parsing, validation, the
//! Qwen3 chat template and the tokenizer. The answer is prompt token ids or a client error: never a panic.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tandem_gateway::prompt_input::ChatPromptPipeline;

fn pipeline() -> &'static ChatPromptPipeline {
    static PIPELINE: OnceLock<ChatPromptPipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/qwen3-tokenizer");
        // The built-in model's shape: 40960 tokens of context, Qwen3's vocabulary; the gateway's body limit.
        ChatPromptPipeline::load(&dir, 40_960, 151_936, tandem_gateway::DEFAULT_BODY_LIMIT_BYTES)
            .expect("the shipped Qwen3 tokenizer loads")
    })
}

fuzz_target!(|body: &[u8]| {
    if let Ok(ids) = pipeline().prompt_token_ids(body) {
        assert!(!ids.is_empty(), "an accepted chat has a prompt");
    }
});
