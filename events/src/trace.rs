//! One trace per request across processes: the W3C trace context (`traceparent`, `tracestate`) that rides in every
//! event's envelope and in the KV transfer header, and the few operations every role needs on it — the context of a
//! `tracing` span to carry on, making a span continue a carried context, and recording a span whose start is known
//! only after the fact (a queue wait starts when an event was appended, in another process).
//!
//! The roles only create `tracing` spans; the binary installs the `tracing-opentelemetry` layer and the OTLP
//! exporter (`src/telemetry/`). Without that layer (tests, export off) spans have no trace context: nothing is
//! carried, and every function here is a cheap no-op.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer,
};
use opentelemetry::{Context, KeyValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::schema::TraceContext;

/// The instrumentation scope of spans recorded directly through OpenTelemetry ([`record_finished_span`]).
const TRACER_NAME: &str = "tandem";

/// The W3C `traceparent` of a span context: `00-<trace id>-<span id>-<flags>`; `None` for an invalid context.
pub fn format_traceparent(context: &SpanContext) -> Option<TraceContext> {
    if !context.is_valid() {
        return None;
    }
    Some(TraceContext {
        traceparent: format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        ),
        tracestate: context.trace_state().header(),
    })
}

/// Parses a W3C `traceparent` (version 00, or a later version's first four fields as the spec asks) and its
/// `tracestate` into a remote span context; `None` when it is empty or malformed (the trace then starts afresh).
pub fn parse_traceparent(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut fields = traceparent.trim().split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let span_id = fields.next()?;
    let flags = fields.next()?;
    let well_formed = version.len() == 2
        && version != "ff"
        && u8::from_str_radix(version, 16).is_ok()
        && trace_id.len() == 32
        && span_id.len() == 16
        && flags.len() == 2
        && (version != "00" || fields.next().is_none());
    if !well_formed {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let trace_state = tracestate.parse::<TraceState>().unwrap_or_default();
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        trace_state,
    );
    context.is_valid().then_some(context)
}

/// The trace context to carry on for `span` (into an event or a transfer header); `None` when it is not traced.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    format_traceparent(span.context().span().span_context())
}

/// Makes `span` a child of the carried context (it must not have been entered yet). A missing or malformed context
/// leaves it as it is: a new trace, or the child of the span current where it was made.
pub fn continue_trace(span: &tracing::Span, carried: Option<&TraceContext>) {
    let Some(parent) = carried.and_then(remote_context) else {
        return;
    };
    if span.is_disabled() {
        return;
    }
    // Fails only when the span has started already; then it keeps the parent it has.
    let _ = span.set_parent(parent);
}

/// Records a span that is already over, with its start and end times (e.g. a queue wait, which began when an event
/// was appended in another process), as a child of the carried context. Returns the span's own context, to carry
/// on further. With no tracer provider installed this records nothing and returns `None`.
pub fn record_finished_span(
    name: &'static str,
    carried: Option<&TraceContext>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<TraceContext> {
    let parent = carried.and_then(remote_context).unwrap_or_default();
    let tracer = opentelemetry::global::tracer(TRACER_NAME);
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let context = format_traceparent(span.span_context());
    span.end_with_timestamp(end);
    context
}

/// A wall-clock time from the nanoseconds since the Unix epoch an event's envelope holds.
pub fn system_time_of(timestamp_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(timestamp_ns)
}

fn remote_context(carried: &TraceContext) -> Option<Context> {
    let span_context = parse_traceparent(&carried.traceparent, &carried.tracestate)?;
    Some(Context::new().with_remote_span_context(span_context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(text, "vendor=value").expect("valid");
        assert!(context.is_remote());
        assert!(context.is_sampled());
        let carried = format_traceparent(&context).expect("valid");
        assert_eq!(carried.traceparent, text);
        assert_eq!(carried.tracestate, "vendor=value");
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for text in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(text, "").is_none(), "{text:?}");
        }
        // A later version may add fields after the four it shares with version 00.
        assert!(
            parse_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more",
                ""
            )
            .is_some()
        );
    }

    #[test]
    fn without_a_tracing_layer_nothing_is_carried() {
        let span = tracing::info_span!("untraced");
        assert_eq!(context_of(&span), None);
        continue_trace(
            &span,
            Some(&TraceContext {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: String::new(),
            }),
        );
        assert_eq!(context_of(&span), None);
    }
}
