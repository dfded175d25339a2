//! The chat request's way from untrusted body bytes to prompt token ids, outside the HTTP server: parse the
//! body, validate it, render the chat template, tokenize, and finish the request against the model's limits. The
//! steps are the `/v1/chat/completions` handler's own functions, so the fuzz target `chat_prompt` (in `fuzz/`) and
//! the regression tests exercise the code the server runs; only the log and the token bus are left out.

use std::path::Path;

use crate::GatewayError;
use crate::routes::parse_body;
use crate::template::{ChatTemplate, RenderOptions};
use crate::tokenizer::PromptTokenizer;
use crate::validation::{
    ChatPlan, Endpoint, GenerateRequest, ModelLimits, finish_request, validate_chat,
};

/// A model's tokenizer, chat template and limits, as the gateway loads them.
pub struct ChatPromptPipeline {
    template: ChatTemplate,
    tokenizer: PromptTokenizer,
    limits: ModelLimits,
    body_limit_bytes: usize,
}

impl ChatPromptPipeline {
    /// Loads the tokenizer and template of `tokenizer_dir` for a model with this context and vocabulary.
    pub fn load(
        tokenizer_dir: &Path,
        context_length_tokens: u32,
        vocab_size: u32,
        body_limit_bytes: usize,
    ) -> Result<ChatPromptPipeline, GatewayError> {
        let tokenizer = PromptTokenizer::load(tokenizer_dir)?;
        let template = ChatTemplate::load(tokenizer_dir)?;
        let limits = ModelLimits {
            served_model_name: "qwen3".into(),
            context_length_tokens,
            vocab_size: vocab_size.min(tokenizer.vocab_size()),
            eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        };
        Ok(ChatPromptPipeline {
            template,
            tokenizer,
            limits,
            body_limit_bytes,
        })
    }

    /// The prompt token ids of a chat body, or the client error the handler would answer with (as its message).
    pub fn prompt_token_ids(&self, body: &[u8]) -> Result<Vec<u32>, String> {
        let request = parse_body(
            Ok(bytes::Bytes::copy_from_slice(body)),
            self.body_limit_bytes,
        )
        .map_err(|error| error.to_string())?;
        let ChatPlan {
            messages,
            tools,
            enable_thinking,
            common,
        } = validate_chat(request, &self.limits).map_err(|error| error.to_string())?;
        let options = RenderOptions {
            add_generation_prompt: true,
            enable_thinking,
            tools,
        };
        let prompt = self
            .template
            .render(&messages, &options)
            .map_err(|error| error.to_string())?;
        let ids = self
            .tokenizer
            .encode(&prompt)
            .map_err(|error| error.to_string())?;
        let request: GenerateRequest =
            finish_request(Endpoint::Chat, common, ids, None, &self.limits)
                .map_err(|error| error.to_string())?;
        Ok(request.prompt_token_ids)
    }
}
