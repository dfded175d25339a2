//! The chat template and tokenizer against Hugging Face transformers: the Qwen3 template from
//! `assets/qwen3-tokenizer` must render each fixture conversation to the exact string transformers produced, and
//! the tokenizer must encode it to the same ids (`fixtures/chat_template_cases.json`, made by
//! `fixtures/make_fixtures.py`).

mod support;

use serde::Deserialize;
use serde_json::value::RawValue;
use tandem_gateway::template::{ChatTemplate, RenderOptions, TemplateMessage};
use tandem_gateway::tokenizer::PromptTokenizer;

/// The seed request's message: its rendered Qwen3 chat prompt is 25 tokens.
pub const SEED_MESSAGE: &str =
    "Explain why Roger Federer is considered one of the greatest tennis players of all time";

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<CaseMessage>,
    rendered: String,
    token_ids: Vec<u32>,
    enable_thinking: bool,
    #[serde(default)]
    tools: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct CaseMessage {
    role: String,
    content: String,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Box<RawValue>>,
}

fn cases() -> Vec<Case> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_template_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture parses")
}

/// Raw JSON to a template value, object key order kept (as Python dicts keep it).
fn ordered(raw: &RawValue) -> minijinja::Value {
    serde_json::from_str(raw.get()).expect("template value")
}

fn render(template: &ChatTemplate, case: &Case) -> String {
    let messages: Vec<TemplateMessage> = case
        .messages
        .iter()
        .map(|message| TemplateMessage {
            reasoning_content: message.reasoning_content.clone(),
            tool_calls: message.tool_calls.as_deref().map(ordered),
            ..TemplateMessage::new(message.role.clone(), message.content.clone())
        })
        .collect();
    let options = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: case.enable_thinking,
        tools: case.tools.as_deref().map(ordered),
    };
    template.render(&messages, &options).expect("renders")
}

#[test]
fn qwen3_template_renders_and_tokenizes_like_transformers() {
    let dir = support::tokenizer_dir();
    let template = ChatTemplate::load(&dir).expect("template");
    let tokenizer = PromptTokenizer::load(&dir).expect("tokenizer");
    let cases = cases();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let rendered = render(&template, case);
        assert_eq!(rendered, case.rendered, "case {}", case.name);
        let ids = tokenizer.encode(&rendered).expect("encodes");
        assert_eq!(ids, case.token_ids, "case {}", case.name);
    }
}

#[test]
fn system_user_assistant_user_renders_exactly() {
    // The expected strings, spelled out: earlier assistant turns lose their thinking block; with thinking off
    // the generation prompt carries an empty one.
    let template = ChatTemplate::load(&support::tokenizer_dir()).expect("template");
    let messages = vec![
        TemplateMessage::new("system", "You are a concise assistant."),
        TemplateMessage::new("user", "What is the capital of France?"),
        TemplateMessage::new("assistant", "<think>\nEasy one.\n</think>\n\nParis."),
        TemplateMessage::new("user", "And of Italy?"),
    ];
    let history = "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n";
    let mut options = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: true,
        tools: None,
    };
    assert_eq!(template.render(&messages, &options).unwrap(), history);
    options.enable_thinking = false;
    assert_eq!(
        template.render(&messages, &options).unwrap(),
        format!("{history}<think>\n\n</think>\n\n")
    );
}

#[test]
fn seed_message_is_25_prompt_tokens_and_who_is_roger_federer_14() {
    let dir = support::tokenizer_dir();
    let template = ChatTemplate::load(&dir).expect("template");
    let tokenizer = PromptTokenizer::load(&dir).expect("tokenizer");
    let options = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: true,
        tools: None,
    };
    let count = |text: &str| {
        let prompt = template
            .render(&[TemplateMessage::new("user", text)], &options)
            .unwrap();
        tokenizer.encode(&prompt).unwrap().len()
    };
    assert_eq!(count(SEED_MESSAGE), 25);
    assert_eq!(count("Who is Roger Federer?"), 14);
}

#[test]
fn eos_ids_fall_back_to_qwen3s_when_there_is_no_generation_config() {
    let tokenizer = PromptTokenizer::load(&support::tokenizer_dir()).expect("tokenizer");
    assert_eq!(tokenizer.eos_token_ids(), &[151_645, 151_643]);
    assert_eq!(tokenizer.vocab_size(), 151_669);
}

#[test]
fn raise_exception_refuses_with_the_templates_words() {
    let template = ChatTemplate::from_source(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok",
        None,
        None,
    )
    .expect("compiles");
    let options = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: true,
        tools: None,
    };
    let error = template
        .render(&[TemplateMessage::new("assistant", "hi")], &options)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Conversations must start with a user turn"),
        "{error}"
    );
}
