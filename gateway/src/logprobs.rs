//! Logprobs from the decode worker's `TokenLogprob`s in the two OpenAI shapes: chat (`content: [{token, logprob,
//! bytes, top_logprobs}]`) and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use tandem_events::tokens::{TokenLogprob, TopLogprob};

use crate::openai::{ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs};

/// The chat shape. A token without a chosen entry (a worker that sent none) is skipped.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .filter_map(|token| {
                let chosen = token.chosen.as_ref()?;
                Some(ChatTokenLogprob {
                    token: chosen.token.clone(),
                    logprob: chosen.logprob,
                    bytes: chosen.bytes.clone(),
                    top_logprobs: token.top.iter().map(chat_top).collect(),
                })
            })
            .collect(),
    }
}

fn chat_top(top: &TopLogprob) -> ChatTopLogprob {
    ChatTopLogprob {
        token: top.token.clone(),
        logprob: top.logprob,
        bytes: top.bytes.clone(),
    }
}

/// Builds the legacy completions shape across a stream's updates; `text_offset` counts characters of the
/// completion text (as Python's `len` does) from the start of the completion.
#[derive(Debug, Default)]
pub struct CompletionLogprobsBuilder {
    chars_so_far: u32,
}

impl CompletionLogprobsBuilder {
    pub fn add(&mut self, tokens: &[TokenLogprob]) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for token in tokens {
            let Some(chosen) = token.chosen.as_ref() else {
                continue;
            };
            out.tokens.push(chosen.token.clone());
            out.token_logprobs.push(chosen.logprob);
            out.top_logprobs.push(
                token
                    .top
                    .iter()
                    .map(|top| (top.token.clone(), serde_json::Value::from(top.logprob)))
                    .collect(),
            );
            out.text_offset.push(self.chars_so_far);
            let chars = u32::try_from(chosen.token.chars().count()).unwrap_or(u32::MAX);
            self.chars_so_far = self.chars_so_far.saturating_add(chars);
        }
        out
    }
}
