//! The gateway's OpenAPI 3.1 document (`GET /openapi.json`): hand-written in `gateway/openapi.json` beside the
//! handlers it describes, with the served model's name filled in when the gateway starts (any other name is a 404,
//! so the document says so).

use serde_json::{Value, json};

use crate::errors::GatewayError;

const DOCUMENT: &str = include_str!("../openapi.json");
/// The request schemas whose `model` names the served model.
const REQUESTS_NAMING_THE_MODEL: &[&str] = &["ChatCompletionRequest", "CompletionRequest"];

/// The document as served by a gateway serving `served_model_name`.
pub(crate) fn document(served_model_name: &str) -> Result<String, GatewayError> {
    let invalid = |reason: String| GatewayError::Config(format!("gateway/openapi.json: {reason}"));
    let mut document: Value =
        serde_json::from_str(DOCUMENT).map_err(|error| invalid(error.to_string()))?;
    for request in REQUESTS_NAMING_THE_MODEL {
        let model = document
            .pointer_mut(&format!("/components/schemas/{request}/properties/model"))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| invalid(format!("{request} has no `model` property")))?;
        // Absent or null means the served model too.
        model.insert("enum".into(), json!([served_model_name, null]));
    }
    Ok(document.to_string())
}
