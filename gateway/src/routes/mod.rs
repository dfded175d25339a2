//! HTTP handlers, one module per endpoint family, and the body parsing they share (our own 400/413 instead of
//! axum's plain-text rejections).

pub mod chat;
pub mod completions;
pub mod meta;

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::errors::ApiError;

/// Parses a JSON request body; a body over the limit is a 413, malformed JSON or a field of the wrong type a 400
/// naming the field.
pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    body_limit_bytes: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(body_limit_bytes)
        } else {
            ApiError::invalid(
                None,
                format!("Could not read the request body: {rejection}"),
            )
        }
    })?;
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::invalid(
            None,
            "We could not parse the JSON body of your request: the body must be a JSON object.",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let parsed: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_data() && path != "." {
            ApiError::invalid(
                Some(path.clone()),
                format!("Invalid value for `{path}`: {inner}"),
            )
        } else {
            malformed(&inner)
        }
    })?;
    // Trailing bytes after the object make the body malformed too.
    deserializer.end().map_err(|error| malformed(&error))?;
    Ok(parsed)
}

fn malformed(error: &serde_json::Error) -> ApiError {
    ApiError::invalid(
        None,
        format!("We could not parse the JSON body of your request: {error}. Send a JSON object."),
    )
}
