//! The prompt store: where a request's prompt lives while the request runs when the log must not hold it
//! (`--log-prompts hash|none`). The gateway puts the token ids in the `tandem-prompts` key-value bucket under the
//! request id before it appends `Received` (which then holds only the prompt's length, and its hash unless `none`),
//! decode workers read them from there, and the gateway deletes the entry when the request ends; the bucket's
//! time-to-live removes what a crashed gateway left.
//!
//! What is lost with a redacted log: `replay rerun` (the prompt is gone once the request ends), re-routing or
//! migrating a request after its entry expired, and prefix-aware routing (the scheduler sees no ids).

use bytes::Bytes;

use crate::schema::Received;

/// The key-value bucket of prompts kept off the log.
pub const PROMPT_BUCKET: &str = "tandem-prompts";
/// How long an entry outlives a gateway that could not delete it: longer than any request may run (the gateway's
/// default deadline is 10 minutes), short enough that a forgotten prompt does not linger.
pub const PROMPT_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `received` was written with the prompt kept off the log: no ids, yet a prompt of some length.
pub fn prompt_is_redacted(received: &Received) -> bool {
    received.prompt_token_ids.is_empty() && received.prompt_tokens > 0
}

/// The stored form of a prompt: each id as 4 little-endian bytes.
pub fn encode_prompt(prompt_token_ids: &[u32]) -> Bytes {
    prompt_token_ids
        .iter()
        .flat_map(|id| id.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// Why a stored prompt cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptStoreError {
    #[error("the stored prompt is {bytes} bytes, not a whole number of 4-byte token ids")]
    Truncated { bytes: usize },
    #[error("the stored prompt has {stored} tokens but Received says {expected}")]
    LengthMismatch { stored: usize, expected: u32 },
}

/// Decodes a stored prompt and checks it against the length `Received` recorded.
pub fn decode_prompt(stored: &[u8], expected_tokens: u32) -> Result<Vec<u32>, PromptStoreError> {
    if !stored.len().is_multiple_of(4) {
        return Err(PromptStoreError::Truncated {
            bytes: stored.len(),
        });
    }
    if stored.len() / 4 != expected_tokens as usize {
        return Err(PromptStoreError::LengthMismatch {
            stored: stored.len() / 4,
            expected: expected_tokens,
        });
    }
    Ok(stored
        .chunks_exact(4)
        .map(|id| u32::from_le_bytes([id[0], id[1], id[2], id[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_round_trip_and_bad_entries_are_errors() {
        let prompt = vec![151644, 872, 198, 0, u32::MAX];
        let stored = encode_prompt(&prompt);
        assert_eq!(decode_prompt(&stored, 5), Ok(prompt));
        assert_eq!(
            decode_prompt(&stored[..7], 5),
            Err(PromptStoreError::Truncated { bytes: 7 })
        );
        assert_eq!(
            decode_prompt(&stored, 4),
            Err(PromptStoreError::LengthMismatch {
                stored: 5,
                expected: 4
            })
        );
    }

    #[test]
    fn a_received_without_ids_but_with_a_length_is_redacted() {
        let full = Received {
            prompt_token_ids: vec![1, 2],
            prompt_tokens: 2,
            ..Received::default()
        };
        let redacted = Received {
            prompt_token_ids: Vec::new(),
            prompt_tokens: 2,
            ..Received::default()
        };
        assert!(!prompt_is_redacted(&full));
        assert!(prompt_is_redacted(&redacted));
        assert!(!prompt_is_redacted(&Received::default()));
    }
}
