//! The gateway's OpenAPI 3.1 document (`GET /openapi.json`): hand-written in `gateway/openapi.json` beside the
//! handlers it describes, with what depends on the served model filled in when the gateway starts: its name (any
//! other is a 404), the context window (bounding max_tokens and the number of messages) and the vocabulary (bounding
//! token ids).

use serde_json::{Value, json};

use crate::errors::GatewayError;
use crate::validation::ModelLimits;

const DOCUMENT: &str = include_str!("../openapi.json");
/// The request schemas whose `model` names the served model.
const REQUESTS_NAMING_THE_MODEL: &[&str] = &["ChatCompletionRequest", "CompletionRequest"];

/// The document as served by a gateway with these limits.
pub(crate) fn document(limits: &ModelLimits) -> Result<String, GatewayError> {
    let invalid = |reason: String| GatewayError::Config(format!("gateway/openapi.json: {reason}"));
    let mut document: Value =
        serde_json::from_str(DOCUMENT).map_err(|error| invalid(error.to_string()))?;
    for request in REQUESTS_NAMING_THE_MODEL {
        let model = document
            .pointer_mut(&format!("/components/schemas/{request}/properties/model"))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| invalid(format!("{request} has no `model` property")))?;
        // Absent or null means the served model too.
        model.insert(
            "enum".into(),
            json!([limits.served_model_name.as_str(), null]),
        );
    }
    // A prompt takes at least one token, so at most the window less one is left for the completion.
    let longest_completion = limits.context_length_tokens.saturating_sub(1);
    let largest_token_id = limits.vocab_size.saturating_sub(1);
    let bounds = [
        (
            "ChatCompletionRequest/properties/max_tokens",
            "maximum",
            longest_completion,
        ),
        (
            "ChatCompletionRequest/properties/max_completion_tokens",
            "maximum",
            longest_completion,
        ),
        (
            "CompletionRequest/properties/max_tokens",
            "maximum",
            longest_completion,
        ),
        (
            "ChatCompletionRequest/properties/messages",
            "maxItems",
            limits.context_length_tokens,
        ),
        (
            "ChatCompletionRequest/properties/stop_token_ids/items",
            "maximum",
            largest_token_id,
        ),
        (
            "CompletionRequest/properties/stop_token_ids/items",
            "maximum",
            largest_token_id,
        ),
        (
            "CompletionRequest/properties/prompt/anyOf/1/items",
            "maximum",
            largest_token_id,
        ),
        (
            "CompletionRequest/properties/prompt/anyOf/3/items/items",
            "maximum",
            largest_token_id,
        ),
    ];
    for (schema, keyword, bound) in bounds {
        document
            .pointer_mut(&format!("/components/schemas/{schema}"))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| invalid(format!("{schema} is not in the document")))?
            .insert(keyword.into(), json!(bound));
    }
    Ok(document.to_string())
}
