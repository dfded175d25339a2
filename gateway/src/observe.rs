//! The gateway's share of a request's observability: its `gateway.request` span (the root of the request's trace,
//! or the child of the client's W3C `traceparent` header), and its metrics — time to first token, inter-token
//! latency, end-to-end latency, prompt and generated tokens, requests in flight, and how each request ended.

use std::time::Instant;

use axum::http::HeaderMap;
use tandem_events::metric_names::{
    E2E_REQUEST_LATENCY, GATEWAY_REQUESTS_IN_FLIGHT, GENERATION_TOKENS, INTER_TOKEN_LATENCY,
    PROMPT_TOKENS, REQUEST_FAILURE, REQUEST_SUCCESS, TIME_TO_FIRST_TOKEN,
};
use tandem_events::schema::TraceContext;

/// The span of one HTTP generation request, continuing the client's trace when its `traceparent` header is valid.
/// Its `request_id` is filled in once the request has one; log lines inside it carry it.
pub(crate) fn request_span(headers: &HeaderMap, endpoint: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "gateway.request",
        otel.kind = "server",
        endpoint,
        request_id = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
    );
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    if let Some(traceparent) = header("traceparent") {
        let carried = TraceContext {
            traceparent,
            tracestate: header("tracestate").unwrap_or_default(),
        };
        tandem_events::trace::continue_trace(&span, Some(&carried));
    }
    span
}

/// How a request the gateway accepted ended, for `tandem:request_failure_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// The decode worker or the scheduler failed it.
    Failed,
    /// The client went away before the end.
    Cancelled,
    /// The gateway's deadline passed.
    Deadline,
    /// The token stream or the log was unavailable.
    Unavailable,
    /// Token updates were lost on the bus.
    TokensLost,
}

impl FailureReason {
    fn as_str(self) -> &'static str {
        match self {
            FailureReason::Failed => "failed",
            FailureReason::Cancelled => "cancelled",
            FailureReason::Deadline => "deadline",
            FailureReason::Unavailable => "unavailable",
            FailureReason::TokensLost => "tokens_lost",
        }
    }
}

/// One accepted request's metrics, from its `Received` on the log to its last token. Dropped before an outcome
/// was recorded, the client went away: it counts as cancelled.
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    accepted_at: Instant,
    last_token_at: Option<Instant>,
    ended: bool,
}

impl RequestMetrics {
    /// A request put on the log with `prompt_tokens` prompt tokens.
    pub(crate) fn accepted(prompt_tokens: u32) -> RequestMetrics {
        metrics::counter!(PROMPT_TOKENS).increment(u64::from(prompt_tokens));
        metrics::gauge!(GATEWAY_REQUESTS_IN_FLIGHT).increment(1.0);
        RequestMetrics {
            accepted_at: Instant::now(),
            last_token_at: None,
            ended: false,
        }
    }

    /// `count` new generated tokens arrived together.
    pub(crate) fn tokens(&mut self, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        metrics::counter!(GENERATION_TOKENS).increment(count as u64);
        match self.last_token_at {
            None => {
                metrics::histogram!(TIME_TO_FIRST_TOKEN)
                    .record(now.duration_since(self.accepted_at).as_secs_f64());
                // The first update's other tokens came with it: no gap between them is known.
            }
            Some(previous) => {
                let gap = now.duration_since(previous).as_secs_f64() / count as f64;
                metrics::histogram!(INTER_TOKEN_LATENCY).record_many(gap, count);
            }
        }
        self.last_token_at = Some(now);
    }

    /// The request finished with `finish_reason` (`stop`, `length`).
    pub(crate) fn succeeded(&mut self, finish_reason: &str) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        metrics::histogram!(E2E_REQUEST_LATENCY).record(self.accepted_at.elapsed().as_secs_f64());
        metrics::counter!(REQUEST_SUCCESS, "finished_reason" => finish_reason.to_string())
            .increment(1);
    }

    pub(crate) fn failed(&mut self, reason: FailureReason) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        metrics::counter!(REQUEST_FAILURE, "reason" => reason.as_str()).increment(1);
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        self.failed(FailureReason::Cancelled);
        metrics::gauge!(GATEWAY_REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}
