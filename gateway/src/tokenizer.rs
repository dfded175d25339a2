//! The prompt tokenizer: `tokenizer.json` through HF `tokenizers`, and the model's end-of-sequence token ids from
//! `generation_config.json` / `tokenizer_config.json`. The gateway only encodes; generated tokens are detokenized by
//! the decode worker (it owns the incremental detokenizer and stop strings).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::errors::GatewayError;

/// Qwen3's end-of-sequence tokens (`<|im_end|>`, `<|endoftext|>`), as its `generation_config.json` lists them. Used
/// when the model folder has no `generation_config.json` (the built-in model ships only the tokenizer files), and
/// only for ids that really are those tokens in this tokenizer.
pub const QWEN3_EOS_FALLBACK: [(u32, &str); 2] =
    [(151645, "<|im_end|>"), (151643, "<|endoftext|>")];

/// Encodes prompts; knows the vocabulary size and the end-of-sequence ids.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
}

/// Why a text could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot tokenize the prompt: {0}")]
pub struct EncodeError(String);

impl PromptTokenizer {
    /// Loads `tokenizer.json` from `dir` and the EOS ids from the configs beside it.
    pub fn load(dir: &Path) -> Result<PromptTokenizer, GatewayError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|error| GatewayError::Tokenizer {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
        let eos_token_ids = eos_token_ids(
            &tokenizer,
            tokenizer_config.as_ref(),
            generation_config.as_ref(),
        );
        Ok(PromptTokenizer {
            tokenizer,
            eos_token_ids,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`, ...) become their ids; no BOS or
    /// other special token is added, since the chat template writes them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EncodeError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| EncodeError(error.to_string()))
    }

    /// Number of ids the tokenizer can decode (added tokens included).
    pub fn vocab_size(&self) -> u32 {
        u32::try_from(self.tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX)
    }

    /// The model's end-of-sequence ids: default stop tokens unless a request sets `ignore_eos`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

pub(crate) fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>, GatewayError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(GatewayError::TokenizerConfig {
                path: path.to_path_buf(),
                reason: error.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| GatewayError::TokenizerConfig {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {error}"),
        })
}

/// `generation_config.json`'s `eos_token_id` (a number or a list) when present; else `tokenizer_config.json`'s
/// `eos_token` plus the Qwen3 fallback ids that this tokenizer really maps to those tokens.
fn eos_token_ids(
    tokenizer: &Tokenizer,
    tokenizer_config: Option<&serde_json::Value>,
    generation_config: Option<&serde_json::Value>,
) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    let mut push = |id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    if let Some(value) = generation_config.and_then(|config| config.get("eos_token_id")) {
        let listed: Vec<u32> = match value {
            serde_json::Value::Array(items) => items.iter().filter_map(json_u32).collect(),
            other => json_u32(other).into_iter().collect(),
        };
        if !listed.is_empty() {
            listed.into_iter().for_each(&mut push);
            return ids;
        }
    }
    if let Some(token) = tokenizer_config
        .and_then(|config| config.get("eos_token"))
        .and_then(token_text)
        && let Some(id) = tokenizer.token_to_id(&token)
    {
        push(id);
    }
    for (id, token) in QWEN3_EOS_FALLBACK {
        if tokenizer.token_to_id(token) == Some(id) {
            push(id);
        }
    }
    ids
}

fn json_u32(value: &serde_json::Value) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// A special token in a tokenizer config: a string, or `{"content": "..."}` (AddedToken form).
pub(crate) fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(map) => map
            .get("content")
            .and_then(|content| content.as_str())
            .map(str::to_string),
        _ => None,
    }
}
