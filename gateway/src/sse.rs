//! Server-sent events as OpenAI streams them: `data: <json>\n\n` per chunk, `data: [DONE]\n\n` at the end.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::Stream;
use serde::Serialize;

/// The event that ends every stream.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Appends one `data:` event holding `chunk` as JSON.
pub fn push_event(frames: &mut Vec<u8>, chunk: &impl Serialize) {
    frames.extend_from_slice(b"data: ");
    // Serializing these plain structs cannot fail (no maps with non-string keys, no failing Serialize impls).
    if let Err(error) = serde_json::to_writer(&mut *frames, chunk) {
        tracing::error!(%error, "cannot serialize a stream chunk");
        frames.extend_from_slice(b"{}");
    }
    frames.extend_from_slice(b"\n\n");
}

/// A 200 response streaming `frames` as `text/event-stream`.
/// The end of a stream: the chunk with the finish reason, the usage chunk when the client asked for one, then
/// `[DONE]` (the order OpenAI clients expect).
pub fn push_end(
    frames: &mut Vec<u8>,
    finish_chunk: &impl Serialize,
    usage_chunk: Option<&impl Serialize>,
) {
    push_event(frames, finish_chunk);
    if let Some(usage_chunk) = usage_chunk {
        push_event(frames, usage_chunk);
    }
    frames.extend_from_slice(DONE_EVENT);
}

pub fn response(
    frames: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(frames));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell buffering proxies (nginx) to pass events on as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
