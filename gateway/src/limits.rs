//! Limits on what one client may hold: the size of a request's headers (431) and the generation requests in flight
//! per API key (429 with `Retry-After`). The body's size is capped by axum's `DefaultBodyLimit` and answered 413
//! by `routes::parse_body`; hyper's own caps (a 400 KiB read buffer, 100 headers) stay below both as a backstop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Client;
use crate::errors::ApiError;

/// The requests that occupy a decode slot while they run; only these count against the per-key limit.
const GENERATION_PATHS: &[&str] = &["/v1/chat/completions", "/v1/completions"];
/// What a refused client is told to wait: a request slot frees when any of its requests ends, which the gateway
/// cannot predict, so the shortest whole second a client honours.
const RETRY_AFTER_S: u64 = 1;
/// Per header line: `: ` and CRLF around the name and value.
const HEADER_LINE_OVERHEAD_BYTES: usize = 4;

/// How much one client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Generation requests one key (or, with no keys configured, all clients together) may have in flight;
    /// `None`: no limit.
    pub max_concurrent_per_key: Option<u32>,
    /// The request line and headers together may not exceed this.
    pub max_header_bytes: usize,
}

/// The in-flight generation requests of each client.
pub(crate) struct ConcurrencyLimiter {
    max_per_client: Option<u32>,
    /// One entry per client seen: bounded by the number of configured keys plus one.
    slots: Mutex<HashMap<Client, Arc<Semaphore>>>,
}

impl ConcurrencyLimiter {
    pub fn new(max_per_client: Option<u32>) -> ConcurrencyLimiter {
        ConcurrencyLimiter {
            max_per_client,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more request of `client`, held until the permit drops; `Ok(None)` when unlimited.
    fn try_acquire(&self, client: Client) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some(max) = self.max_per_client else {
            return Ok(None);
        };
        let semaphore = {
            // A poisoned lock only means a panic elsewhere while inserting; the map itself is still whole.
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(
                slots
                    .entry(client)
                    .or_insert_with(|| Arc::new(Semaphore::new(max as usize))),
            )
        };
        semaphore
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| too_many_requests(max))
    }
}

fn too_many_requests(max: u32) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "Rate limit reached: this API key already has {max} requests in flight, the most this server allows. Please try again in {RETRY_AFTER_S}s, once one of them has finished."
        ),
        // OpenAI's type for a limit on requests (the other is `tokens`).
        error_type: "requests",
        param: None,
        code: Some("rate_limit_exceeded"),
    }
}

fn headers_too_large(size_bytes: usize, max_bytes: usize) -> ApiError {
    ApiError {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        message: format!(
            "The request's headers are {size_bytes} bytes, more than this server's limit of {max_bytes} bytes."
        ),
        error_type: "invalid_request_error",
        param: None,
        code: Some("request_headers_too_large"),
    }
}

/// The request line and header block's size on the wire (close enough: HTTP/1.1 framing as sent).
fn head_size_bytes(request: &Request) -> usize {
    let request_line = request.method().as_str().len() + request.uri().to_string().len() + 11;
    request_line
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + HEADER_LINE_OVERHEAD_BYTES)
            .sum::<usize>()
}

/// Refuses a request whose headers exceed the limit with 431, before it reaches authentication or a handler.
pub(crate) async fn limit_header_size(
    State(limits): State<ClientLimits>,
    request: Request,
    next: Next,
) -> Response {
    let size_bytes = head_size_bytes(&request);
    if size_bytes > limits.max_header_bytes {
        return headers_too_large(size_bytes, limits.max_header_bytes).into_response();
    }
    next.run(request).await
}

/// Refuses a generation request over its client's in-flight limit with 429 and `Retry-After`; otherwise holds the
/// slot until the response body is finished or dropped (a stream holds it to its end).
pub(crate) async fn limit_concurrency(
    State(limiter): State<Arc<ConcurrencyLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if !GENERATION_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    // The auth layer runs first and always sets the client; a router built without it counts everyone as one.
    let client = request
        .extensions()
        .get::<Client>()
        .copied()
        .unwrap_or(Client::Anonymous);
    let permit = match limiter.try_acquire(client) {
        Ok(None) => return next.run(request).await,
        Ok(Some(permit)) => permit,
        Err(error) => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            return response;
        }
    };
    let (parts, body) = next.run(request).await.into_parts();
    let body_holding_the_slot = body.into_data_stream().map(move |chunk| {
        let _slot = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body_holding_the_slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyId;

    #[test]
    fn each_client_has_its_own_slots_and_a_dropped_permit_frees_one() {
        let limiter = ConcurrencyLimiter::new(Some(2));
        let first = limiter.try_acquire(Client::Key(KeyId(0))).unwrap();
        let second = limiter.try_acquire(Client::Key(KeyId(0))).unwrap();
        let refused = limiter.try_acquire(Client::Key(KeyId(0))).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, Some("rate_limit_exceeded"));
        assert!(
            limiter
                .try_acquire(Client::Key(KeyId(1)))
                .unwrap()
                .is_some()
        );
        drop(first);
        assert!(
            limiter
                .try_acquire(Client::Key(KeyId(0)))
                .unwrap()
                .is_some()
        );
        drop(second);
        assert!(
            ConcurrencyLimiter::new(None)
                .try_acquire(Client::Anonymous)
                .unwrap()
                .is_none()
        );
    }
}
