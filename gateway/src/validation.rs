//! Validation: turns a parsed OpenAI request into a typed plan once, naming the parameter at fault in a 400; and,
//! once the prompt is tokenized, checks it against the context window and builds the [`GenerateRequest`] that
//! everything after trusts.

use tandem_events::schema::SamplingParams;

use crate::errors::ApiError;
use crate::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, MessageContent, PromptField, StopField,
};
use crate::reasoning::ReasoningStart;
use crate::template::TemplateMessage;

/// Most stop strings a request may give (OpenAI allows 4; vLLM more).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes: the decode worker holds back this much text per request while matching.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most stop token ids a request may give (each is compared with every generated token).
pub const MAX_STOP_TOKEN_IDS: usize = 256;
/// Most alternatives per token a request may ask for.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// What validation needs to know about the served model.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub served_model_name: String,
    pub context_length_tokens: u32,
    /// Token ids at or above this are not in the vocabulary.
    pub vocab_size: u32,
    /// Default stop tokens (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
}

/// Which API a request came through (recorded in `Received.endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completion",
        }
    }

    /// How the context-length error names the prompt.
    fn prompt_noun(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// Checked sampling parameters, before the prompt length is known.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedSampling {
    pub temperature: f32,
    pub top_p: f32,
    /// 0: no top-k restriction.
    pub top_k: u32,
    pub seed: Option<u64>,
    /// `None`: the rest of the context window.
    pub requested_max_tokens: Option<u32>,
    pub stop_strings: Vec<String>,
    /// The request's own stop ids plus, unless `ignore_eos`, the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
    pub logprobs: Option<u32>,
    pub ignore_eos: bool,
}

/// What both endpoints' plans hold besides the prompt.
#[derive(Debug, Clone)]
pub struct CommonPlan {
    pub model: String,
    pub sampling: CheckedSampling,
    pub stream: bool,
    pub include_usage: bool,
}

/// A chat request, checked, ready for the template.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub messages: Vec<TemplateMessage>,
    pub tools: Option<minijinja::Value>,
    pub enable_thinking: bool,
    pub common: CommonPlan,
}

/// A completion prompt, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
}

/// A completion request, checked, ready for the tokenizer.
#[derive(Debug, Clone)]
pub struct CompletionPlan {
    pub prompt: PromptInput,
    pub common: CommonPlan,
}

/// A request the gateway will submit: every field checked.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Chat with thinking on: where the output's reasoning starts. `None`: no splitting.
    pub reasoning: Option<ReasoningStart>,
}

impl GenerateRequest {
    pub fn prompt_tokens(&self) -> u32 {
        u32::try_from(self.prompt_token_ids.len()).unwrap_or(u32::MAX)
    }
}

/// The fields both endpoints share.
struct SamplingInput<'a> {
    max_tokens: Option<i64>,
    max_tokens_param: &'static str,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<&'a StopField>,
    n: Option<i64>,
    ignore_eos: Option<bool>,
    stop_token_ids: Option<&'a [i64]>,
    logprobs: Option<u32>,
}

/// Checks a chat request.
pub fn validate_chat(
    request: ChatCompletionRequest,
    limits: &ModelLimits,
) -> Result<ChatPlan, ApiError> {
    let model = check_model(request.model.as_deref(), limits)?;
    let messages = match request.messages {
        None => {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` is required.",
            ));
        }
        Some(messages) if messages.is_empty() => {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must contain at least one message.",
            ));
        }
        Some(messages) => messages,
    };
    // Every message renders to at least its role markers, one token or more: more messages than the context
    // window holds tokens cannot fit, and are refused before the template copies any of them.
    if messages.len() > limits.context_length_tokens as usize {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "This model's maximum context length is {} tokens, and `messages` holds {} messages, each of which takes at least one token. Please send fewer messages.",
                limits.context_length_tokens,
                messages.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(index, message)| template_message(index, message))
        .collect::<Result<Vec<_>, _>>()?;
    let tools = request
        .tools
        .as_deref()
        .map(|raw| {
            serde_json::from_str::<minijinja::Value>(raw.get()).map_err(|error| {
                ApiError::invalid_param("tools", format!("`tools` is not valid: {error}"))
            })
        })
        .transpose()?;
    let enable_thinking = match request
        .chat_template_kwargs
        .as_ref()
        .and_then(|kwargs| kwargs.get("enable_thinking"))
    {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Bool(on)) => *on,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "chat_template_kwargs.enable_thinking",
                "`chat_template_kwargs.enable_thinking` must be true or false.",
            ));
        }
    };
    let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        // Some clients send `top_logprobs: 0` alongside `logprobs: false`: nothing asked, nothing to refuse.
        (false, None | Some(0)) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true.",
            ));
        }
        (true, top) => Some(check_top_logprobs("top_logprobs", top.unwrap_or(0))?),
    };
    let max_tokens_param = if request.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let sampling = check_sampling(
        SamplingInput {
            max_tokens: request.max_completion_tokens.or(request.max_tokens),
            max_tokens_param,
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
            stop: request.stop.as_ref(),
            n: request.n,
            ignore_eos: request.ignore_eos,
            stop_token_ids: request.stop_token_ids.as_deref(),
            logprobs,
        },
        limits,
    )?;
    let stream = request.stream.unwrap_or(false);
    Ok(ChatPlan {
        messages,
        tools,
        enable_thinking,
        common: CommonPlan {
            model,
            sampling,
            stream,
            include_usage: include_usage(stream, request.stream_options.as_ref())?,
        },
    })
}

/// Checks a completion request.
pub fn validate_completion(
    request: CompletionRequest,
    limits: &ModelLimits,
) -> Result<CompletionPlan, ApiError> {
    let model = check_model(request.model.as_deref(), limits)?;
    let prompt = match request.prompt {
        None => return Err(ApiError::invalid_param("prompt", "`prompt` is required.")),
        Some(PromptField::Text(text)) => PromptInput::Text(text),
        Some(PromptField::Texts(mut texts)) if texts.len() == 1 => {
            PromptInput::Text(texts.remove(0))
        }
        Some(PromptField::TokenIds(ids)) => PromptInput::TokenIds(check_prompt_ids(&ids, limits)?),
        Some(PromptField::TokenIdBatch(batch)) if batch.len() == 1 => {
            PromptInput::TokenIds(check_prompt_ids(&batch[0], limits)?)
        }
        Some(PromptField::Texts(_) | PromptField::TokenIdBatch(_)) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "Batched prompts are not supported: send one prompt (a string or an array of token ids) per request.",
            ));
        }
    };
    if prompt == PromptInput::Text(String::new()) {
        return Err(ApiError::invalid_param(
            "prompt",
            "`prompt` must not be empty.",
        ));
    }
    if request.echo.unwrap_or(false) {
        return Err(ApiError::invalid_param(
            "echo",
            "`echo` is not supported by this server.",
        ));
    }
    if let Some(best_of) = request.best_of
        && best_of != 1
    {
        return Err(ApiError::invalid_param(
            "best_of",
            format!(
                "`best_of` must be 1 (got {best_of}): this server generates one choice per request."
            ),
        ));
    }
    let logprobs = request
        .logprobs
        .map(|top| check_top_logprobs("logprobs", top))
        .transpose()?;
    let sampling = check_sampling(
        SamplingInput {
            max_tokens: request.max_tokens,
            max_tokens_param: "max_tokens",
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
            stop: request.stop.as_ref(),
            n: request.n,
            ignore_eos: request.ignore_eos,
            stop_token_ids: request.stop_token_ids.as_deref(),
            logprobs,
        },
        limits,
    )?;
    let stream = request.stream.unwrap_or(false);
    Ok(CompletionPlan {
        prompt,
        common: CommonPlan {
            model,
            sampling,
            stream,
            include_usage: include_usage(stream, request.stream_options.as_ref())?,
        },
    })
}

/// The last check, once the prompt is tokenized: it and the completion must fit the context window. Returns the
/// request to submit.
pub fn finish_request(
    endpoint: Endpoint,
    common: CommonPlan,
    prompt_token_ids: Vec<u32>,
    reasoning: Option<ReasoningStart>,
    limits: &ModelLimits,
) -> Result<GenerateRequest, ApiError> {
    let CommonPlan {
        model,
        sampling,
        stream,
        include_usage,
    } = common;
    let prompt_tokens = u32::try_from(prompt_token_ids.len()).unwrap_or(u32::MAX);
    let max_tokens = max_tokens_within_context(
        endpoint,
        prompt_tokens,
        sampling.requested_max_tokens,
        limits.context_length_tokens,
    )?;
    Ok(GenerateRequest {
        endpoint,
        model,
        prompt_token_ids,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            max_tokens,
            stop_token_ids: sampling.stop_token_ids,
            stop_strings: sampling.stop_strings,
            logprobs: sampling.logprobs,
            ignore_eos: sampling.ignore_eos,
        },
        stream,
        include_usage,
        reasoning,
    })
}

/// The number of tokens to generate: as requested when prompt plus completion fit `context_length_tokens`, the
/// rest of the window when not given; a 400 naming the limit otherwise.
pub fn max_tokens_within_context(
    endpoint: Endpoint,
    prompt_tokens: u32,
    requested_max_tokens: Option<u32>,
    context_length_tokens: u32,
) -> Result<u32, ApiError> {
    let noun = endpoint.prompt_noun();
    if prompt_tokens == 0 {
        return Err(ApiError::invalid_param(
            noun,
            format!("The {noun} tokenized to no tokens."),
        ));
    }
    match requested_max_tokens {
        None if prompt_tokens >= context_length_tokens => Err(ApiError::invalid_param(
            noun,
            format!(
                "This model's maximum context length is {context_length_tokens} tokens. However, your {noun} resulted in {prompt_tokens} tokens, which leaves no room for the completion. Please reduce the length of the {noun}."
            ),
        )
        .with_code("context_length_exceeded")),
        None => Ok(context_length_tokens - prompt_tokens),
        Some(max_tokens) => {
            let total = u64::from(prompt_tokens) + u64::from(max_tokens);
            if total > u64::from(context_length_tokens) {
                Err(ApiError::invalid_param(
                    noun,
                    format!(
                        "This model's maximum context length is {context_length_tokens} tokens. However, you requested {total} tokens ({prompt_tokens} in the {noun}, {max_tokens} in the completion). Please reduce the length of the {noun} or completion."
                    ),
                )
                .with_code("context_length_exceeded"))
            } else {
                Ok(max_tokens)
            }
        }
    }
}

fn check_model(requested: Option<&str>, limits: &ModelLimits) -> Result<String, ApiError> {
    match requested {
        // A missing model means the one this server serves (as vLLM does).
        None => Ok(limits.served_model_name.clone()),
        Some(name) if name == limits.served_model_name => Ok(name.to_string()),
        Some(name) => Err(ApiError::model_not_found(name, &limits.served_model_name)),
    }
}

fn template_message(index: usize, message: &ChatMessage) -> Result<TemplateMessage, ApiError> {
    let param = |field: &str| format!("messages[{index}].{field}");
    let role = match message.role.as_str() {
        "system" | "user" | "assistant" | "tool" => message.role.clone(),
        // OpenAI's newer name for system instructions.
        "developer" => "system".to_string(),
        other => {
            return Err(ApiError::invalid(
                Some(param("role")),
                format!(
                    "messages[{index}].role is {other:?}; expected system, developer, user, assistant or tool."
                ),
            ));
        }
    };
    let content = match &message.content {
        Some(MessageContent::Text(text)) => text.clone(),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (part_index, part) in parts.iter().enumerate() {
                match (part.part_type.as_str(), &part.text) {
                    ("text", Some(text)) => texts.push(text.as_str()),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            Some(param(&format!("content[{part_index}].text"))),
                            format!(
                                "messages[{index}].content[{part_index}] is a text part without `text`."
                            ),
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::invalid(
                            Some(param(&format!("content[{part_index}].type"))),
                            format!(
                                "messages[{index}].content[{part_index}] has type {other:?}; this model takes text parts only."
                            ),
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        None if role == "assistant" && message.tool_calls.is_some() => String::new(),
        None => {
            return Err(ApiError::invalid(
                Some(param("content")),
                format!("messages[{index}] ({role}) has no `content`."),
            ));
        }
    };
    let tool_calls = message
        .tool_calls
        .as_deref()
        .map(|raw| {
            serde_json::from_str::<minijinja::Value>(raw.get()).map_err(|error| {
                ApiError::invalid(
                    Some(param("tool_calls")),
                    format!("invalid tool_calls: {error}"),
                )
            })
        })
        .transpose()?;
    Ok(TemplateMessage {
        role,
        content,
        reasoning_content: message.reasoning_content.clone(),
        tool_calls,
        name: message.name.clone(),
        tool_call_id: message.tool_call_id.clone(),
    })
}

fn check_prompt_ids(ids: &[i64], limits: &ModelLimits) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "`prompt` must not be empty.",
        ));
    }
    // Refused before the ids are copied: a prompt that fills the window leaves no room for the completion.
    if ids.len() >= limits.context_length_tokens as usize {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "This model's maximum context length is {} tokens. However, your prompt has {} tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
                limits.context_length_tokens,
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    ids.iter()
        .enumerate()
        .map(|(position, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&id| id < limits.vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "prompt",
                        format!(
                            "Token id {id} at position {position} of `prompt` is out of the vocabulary (ids are 0..{}).",
                            limits.vocab_size
                        ),
                    )
                })
        })
        .collect()
}

fn check_top_logprobs(param: &str, top: i64) -> Result<u32, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&top) {
        Ok(top as u32)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS} (got {top})."),
        ))
    }
}

fn include_usage(
    stream: bool,
    options: Option<&crate::openai::StreamOptions>,
) -> Result<bool, ApiError> {
    match options {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true.",
        )),
        Some(options) => Ok(options.include_usage.unwrap_or(false)),
    }
}

fn check_sampling(
    input: SamplingInput<'_>,
    limits: &ModelLimits,
) -> Result<CheckedSampling, ApiError> {
    if let Some(n) = input.n
        && n != 1
    {
        return Err(ApiError::invalid_param(
            "n",
            format!("`n` must be 1 (got {n}): this server generates one choice per request."),
        ));
    }
    let requested_max_tokens = match input.max_tokens {
        None => None,
        Some(max_tokens) if max_tokens < 1 => {
            return Err(ApiError::invalid_param(
                input.max_tokens_param,
                format!(
                    "`{}` must be at least 1 (got {max_tokens}).",
                    input.max_tokens_param
                ),
            ));
        }
        // Beyond u32 it cannot fit any context window: the context check names the limit.
        Some(max_tokens) => Some(u32::try_from(max_tokens).unwrap_or(u32::MAX)),
    };
    let temperature = input.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("`temperature` must be between 0 and 2 (got {temperature})."),
        ));
    }
    let top_p = input.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("`top_p` must be in (0, 1] (got {top_p})."),
        ));
    }
    let top_k = match input.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k >= 1 => u32::try_from(k).unwrap_or(u32::MAX),
        k => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be -1 or 0 (no limit) or at least 1 (got {k})."),
            ));
        }
    };
    let seed = match input.seed {
        None => None,
        Some(seed) if seed < 0 => {
            return Err(ApiError::invalid_param(
                "seed",
                format!("`seed` must not be negative (got {seed})."),
            ));
        }
        Some(seed) => Some(seed as u64),
    };
    let stop_strings: &[String] = match input.stop {
        None => &[],
        Some(StopField::One(stop)) => std::slice::from_ref(stop),
        Some(StopField::Many(stops)) => stops,
    };
    if stop_strings.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOP_STRINGS} strings (got {}).",
                stop_strings.len()
            ),
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "`stop` strings must not be empty.",
        ));
    }
    if let Some(long) = stop_strings
        .iter()
        .find(|stop| stop.len() > MAX_STOP_STRING_BYTES)
    {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "`stop` strings may be at most {MAX_STOP_STRING_BYTES} bytes long (got one of {} bytes).",
                long.len()
            ),
        ));
    }
    let stop_strings = stop_strings.to_vec();
    let ignore_eos = input.ignore_eos.unwrap_or(false);
    let requested_stop_token_ids = input.stop_token_ids.unwrap_or(&[]);
    // Checked before the ids are copied or deduplicated (which is quadratic in their number).
    if requested_stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!(
                "`stop_token_ids` may hold at most {MAX_STOP_TOKEN_IDS} ids (got {}).",
                requested_stop_token_ids.len()
            ),
        ));
    }
    let mut stop_token_ids: Vec<u32> = Vec::new();
    for &id in requested_stop_token_ids {
        let id = u32::try_from(id)
            .ok()
            .filter(|&id| id < limits.vocab_size)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "stop_token_ids",
                    format!(
                        "Stop token id {id} is out of the vocabulary (ids are 0..{}).",
                        limits.vocab_size
                    ),
                )
            })?;
        if !stop_token_ids.contains(&id) {
            stop_token_ids.push(id);
        }
    }
    if !ignore_eos {
        for &id in &limits.eos_token_ids {
            if !stop_token_ids.contains(&id) {
                stop_token_ids.push(id);
            }
        }
    }
    Ok(CheckedSampling {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        requested_max_tokens,
        stop_strings,
        stop_token_ids,
        logprobs: input.logprobs,
        ignore_eos,
    })
}
