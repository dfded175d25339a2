//! Event kinds, building envelopes, and the checked encoding to and from bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;

use crate::schema::{Body, Envelope, TraceContext};
use crate::subjects::{self, InvalidSubjectToken};

/// The schema version this build writes. Version 1 is the first released schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest encoded event accepted. A prompt of 256k tokens packs into about 1 MiB, so this is generous, and it keeps
/// a corrupt or hostile payload from costing more than this much to look at.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// The kind of an event, as it appears in subjects and dedup ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Received,
    Routed,
    PrefillLocal,
    PrefillQueued,
    PrefillStarted,
    PrefillDone,
    KvTransferred,
    DecodeStarted,
    TokensDecoded,
    Migrated,
    Completed,
    Failed,
    Cancelled,
    WorkerJoined,
    WorkerHeartbeat,
    WorkerLeft,
    WorkerLost,
    KvBlocksStored,
    KvBlocksRemoved,
}

impl EventKind {
    pub const ALL: [EventKind; 19] = [
        EventKind::Received,
        EventKind::Routed,
        EventKind::PrefillLocal,
        EventKind::PrefillQueued,
        EventKind::PrefillStarted,
        EventKind::PrefillDone,
        EventKind::KvTransferred,
        EventKind::DecodeStarted,
        EventKind::TokensDecoded,
        EventKind::Migrated,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Cancelled,
        EventKind::WorkerJoined,
        EventKind::WorkerHeartbeat,
        EventKind::WorkerLeft,
        EventKind::WorkerLost,
        EventKind::KvBlocksStored,
        EventKind::KvBlocksRemoved,
    ];

    /// The subject token of this kind (`prefill_queued`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Received => "received",
            EventKind::Routed => "routed",
            EventKind::PrefillLocal => "prefill_local",
            EventKind::PrefillQueued => "prefill_queued",
            EventKind::PrefillStarted => "prefill_started",
            EventKind::PrefillDone => "prefill_done",
            EventKind::KvTransferred => "kv_transferred",
            EventKind::DecodeStarted => "decode_started",
            EventKind::TokensDecoded => "tokens_decoded",
            EventKind::Migrated => "migrated",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::WorkerJoined => "worker_joined",
            EventKind::WorkerHeartbeat => "worker_heartbeat",
            EventKind::WorkerLeft => "worker_left",
            EventKind::WorkerLost => "worker_lost",
            EventKind::KvBlocksStored => "kv_blocks_stored",
            EventKind::KvBlocksRemoved => "kv_blocks_removed",
        }
    }

    pub fn from_token(token: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == token)
    }

    /// Events about a worker rather than a request.
    pub fn is_worker_event(self) -> bool {
        matches!(
            self,
            EventKind::WorkerJoined
                | EventKind::WorkerHeartbeat
                | EventKind::WorkerLeft
                | EventKind::WorkerLost
                | EventKind::KvBlocksStored
                | EventKind::KvBlocksRemoved
        )
    }

    /// Events that end a request.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Completed | EventKind::Failed | EventKind::Cancelled
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Body {
    pub fn kind(&self) -> EventKind {
        match self {
            Body::Received(_) => EventKind::Received,
            Body::Routed(_) => EventKind::Routed,
            Body::PrefillLocal(_) => EventKind::PrefillLocal,
            Body::PrefillQueued(_) => EventKind::PrefillQueued,
            Body::PrefillStarted(_) => EventKind::PrefillStarted,
            Body::PrefillDone(_) => EventKind::PrefillDone,
            Body::KvTransferred(_) => EventKind::KvTransferred,
            Body::DecodeStarted(_) => EventKind::DecodeStarted,
            Body::TokensDecoded(_) => EventKind::TokensDecoded,
            Body::Migrated(_) => EventKind::Migrated,
            Body::Completed(_) => EventKind::Completed,
            Body::Failed(_) => EventKind::Failed,
            Body::Cancelled(_) => EventKind::Cancelled,
            Body::WorkerJoined(_) => EventKind::WorkerJoined,
            Body::WorkerHeartbeat(_) => EventKind::WorkerHeartbeat,
            Body::WorkerLeft(_) => EventKind::WorkerLeft,
            Body::WorkerLost(_) => EventKind::WorkerLost,
            Body::KvBlocksStored(_) => EventKind::KvBlocksStored,
            Body::KvBlocksRemoved(_) => EventKind::KvBlocksRemoved,
        }
    }
}

/// Why bytes from the log are not a usable event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event payload is {len_bytes} bytes, over the {MAX_EVENT_BYTES}-byte limit")]
    TooLarge { len_bytes: usize },
    #[error("event payload is not a valid protobuf envelope: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error(
        "event envelope has schema version {found}; this build reads versions 1..={SCHEMA_VERSION}"
    )]
    UnsupportedSchemaVersion { found: u32 },
    #[error("event envelope for {id:?} has no body (written by a newer schema, or corrupt)")]
    MissingBody { id: String },
}

/// A typed event: the decoded envelope whose body is known to be present.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    envelope: Envelope,
}

impl Event {
    /// A new event stamped with the current wall-clock time and this build's schema version.
    pub fn new(id: impl Into<String>, emitter: impl Into<String>, body: Body) -> Event {
        Event {
            envelope: Envelope {
                schema_version: SCHEMA_VERSION,
                id: id.into(),
                emitter: emitter.into(),
                timestamp_ns: now_ns(),
                trace: None,
                body: Some(body),
            },
        }
    }

    pub fn with_trace(
        mut self,
        traceparent: impl Into<String>,
        tracestate: impl Into<String>,
    ) -> Event {
        self.envelope.trace = Some(TraceContext {
            traceparent: traceparent.into(),
            tracestate: tracestate.into(),
        });
        self
    }

    /// Carries the trace context of `cause` (the event this one answers), so the request stays one trace.
    pub fn with_trace_from(mut self, cause: &Event) -> Event {
        self.envelope.trace = cause.envelope.trace.clone();
        self
    }

    /// Carries the trace context of `span` (the span that caused this event), when it is traced.
    pub fn with_trace_of(mut self, span: &tracing::Span) -> Event {
        if let Some(context) = crate::trace::context_of(span) {
            self.envelope.trace = Some(context);
        }
        self
    }

    /// Carries `context` when there is one (a span recorded for the step that made this event), else what it has.
    pub fn with_trace_context(mut self, context: Option<TraceContext>) -> Event {
        if let Some(context) = context {
            self.envelope.trace = Some(context);
        }
        self
    }

    /// The trace context this event carries, if any.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.envelope
            .trace
            .as_ref()
            .filter(|trace| !trace.traceparent.is_empty())
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn timestamp_ns(&self) -> u64 {
        self.envelope.timestamp_ns
    }

    pub fn id(&self) -> &str {
        &self.envelope.id
    }

    pub fn body(&self) -> &Body {
        // `Event` is only built with a body (`new`) or from a decoded envelope checked to have one (`decode`).
        self.envelope
            .body
            .as_ref()
            .expect("Event always holds a body")
    }

    pub fn kind(&self) -> EventKind {
        self.body().kind()
    }

    /// The subject this event is appended to: `tandem.ev.<kind>.<id>`, except `Routed`, which goes to
    /// `tandem.ev.routed.<decode_worker_id>` so a decode worker can filter its own.
    pub fn subject(&self) -> Result<String, InvalidSubjectToken> {
        match self.body() {
            Body::Routed(routed) => subjects::routed_to(&routed.decode_worker_id),
            body => subjects::event_subject(body.kind(), &self.envelope.id),
        }
    }

    /// Dedup id for the `occurrence`-th event of this kind about this id.
    pub fn dedup_id(&self, occurrence: u32) -> String {
        subjects::dedup_id(&self.envelope.id, self.kind(), occurrence)
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(self.envelope.encode_to_vec())
    }

    /// Decodes and checks an event: size, protobuf, schema version, body present.
    pub fn decode(payload: &[u8]) -> Result<Event, DecodeError> {
        if payload.len() > MAX_EVENT_BYTES {
            return Err(DecodeError::TooLarge {
                len_bytes: payload.len(),
            });
        }
        let envelope = Envelope::decode(payload)?;
        if envelope.schema_version == 0 || envelope.schema_version > SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedSchemaVersion {
                found: envelope.schema_version,
            });
        }
        if envelope.body.is_none() {
            return Err(DecodeError::MissingBody { id: envelope.id });
        }
        Ok(Event { envelope })
    }
}

/// Nanoseconds since the Unix epoch, saturating rather than panicking on a clock set before 1970.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Completed, Routed};

    #[test]
    fn kinds_round_trip_through_their_tokens() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_token(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn routed_goes_to_the_decode_workers_subject() {
        let event = Event::new(
            "01JREQ",
            "scheduler-1",
            Body::Routed(Routed {
                decode_worker_id: "decode-7".into(),
                ..Default::default()
            }),
        );
        assert_eq!(event.subject().unwrap(), "tandem.ev.routed.decode-7");
        assert_eq!(event.dedup_id(1), "01JREQ:routed:1");
    }

    #[test]
    fn decode_rejects_garbage_and_future_versions() {
        assert!(matches!(
            Event::decode(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Protobuf(_))
        ));
        let event = Event::new("r", "g", Body::Completed(Completed::default()));
        let mut envelope = event.envelope().clone();
        envelope.schema_version = SCHEMA_VERSION + 1;
        assert!(matches!(
            Event::decode(&envelope.encode_to_vec()),
            Err(DecodeError::UnsupportedSchemaVersion { .. })
        ));
        envelope.schema_version = SCHEMA_VERSION;
        envelope.body = None;
        assert!(matches!(
            Event::decode(&envelope.encode_to_vec()),
            Err(DecodeError::MissingBody { .. })
        ));
        assert!(matches!(
            Event::decode(&vec![0u8; MAX_EVENT_BYTES + 1]),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn lengths_announced_beyond_the_payload_are_errors_not_allocations() {
        // Body `Received` (field 10), announcing 2^40 bytes, then a few: a decoder that sized a buffer from the
        // announced length would try to reserve a terabyte.
        let huge_message = [0x52, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x01, 0x02];
        assert!(matches!(
            Event::decode(&huge_message),
            Err(DecodeError::Protobuf(_))
        ));
        // Inside `Received` (an empty model name, field 1), a packed `prompt_token_ids` (field 2) announcing
        // 2^31 bytes of ids with one byte behind it.
        let received = [0x0a, 0x00, 0x12, 0x80, 0x80, 0x80, 0x80, 0x08, 0x01];
        let mut payload = vec![0x52, received.len() as u8];
        payload.extend_from_slice(&received);
        assert!(Event::decode(&payload).is_err());
    }
}
