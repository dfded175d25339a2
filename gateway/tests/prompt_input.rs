//! `prompt_input`, the chat path the `chat_prompt` fuzz target drives, gives what the server gives: the seed
//! request's 25 prompt tokens (README), and client errors for what the fuzzer throws at it.

use std::path::PathBuf;

use tandem_gateway::DEFAULT_BODY_LIMIT_BYTES;
use tandem_gateway::prompt_input::ChatPromptPipeline;

fn pipeline(context_length_tokens: u32) -> ChatPromptPipeline {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/qwen3-tokenizer");
    ChatPromptPipeline::load(
        &dir,
        context_length_tokens,
        151_936,
        DEFAULT_BODY_LIMIT_BYTES,
    )
    .expect("the shipped tokenizer loads")
}

#[test]
fn a_chat_body_becomes_the_servers_prompt_tokens_or_a_client_error() {
    let seed_context = pipeline(40_960);
    let body = br#"{"model": "qwen3", "max_tokens": 30, "messages": [{"role": "user",
        "content": "Explain why Roger Federer is considered one of the greatest tennis players of all time"}]}"#;
    assert_eq!(
        seed_context
            .prompt_token_ids(body)
            .expect("a valid chat")
            .len(),
        25
    );

    let not_json = seed_context
        .prompt_token_ids(b"{\"messages\": [")
        .unwrap_err();
    assert!(
        not_json.contains("could not parse the JSON body"),
        "{not_json}"
    );
    let no_messages = seed_context
        .prompt_token_ids(br#"{"model": "qwen3", "messages": []}"#)
        .unwrap_err();
    assert!(
        no_messages.contains("at least one message"),
        "{no_messages}"
    );
    // A prompt longer than the context is refused after tokenizing, as the server refuses it.
    let long = pipeline(8).prompt_token_ids(body).unwrap_err();
    assert!(long.contains("context"), "{long}");
}
