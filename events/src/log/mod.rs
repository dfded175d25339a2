//! The `EventLog` trait and the types both backends share: appends with dedup, ordered reads, durable pull
//! consumers with ack/nak/in-progress/redelivery, and a key-value bucket with expiry.
//!
//! Backends: [`jetstream::JetStreamLog`] (a fleet) and [`embedded::EmbeddedLog`] (one process, persisted under a
//! data dir). Both pass the same conformance suite (`events/tests/conformance.rs`).

pub mod embedded;
pub mod jetstream;
pub mod nats_connection;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::event::{DecodeError, Event};

/// Errors of the log backends.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "cannot connect to NATS at {url}: {reason} (is nats-server ≥ 2.11 running with JetStream? start it with `nats-server -js`)"
    )]
    Connect { url: String, reason: String },
    #[error(
        "nats authorization failed for {identity} at {url}: {reason} (check --nats-user/--nats-password, \
         --nats-token, --nats-nkey-seed-file or --nats-creds against the server's authorization block)"
    )]
    Authorization {
        url: String,
        identity: String,
        reason: String,
    },
    #[error(
        "TLS to NATS at {url} failed: {reason} (check --nats-tls-ca names the CA that signed the server's \
         certificate, and --nats-tls-cert/--nats-tls-key if the server verifies clients)"
    )]
    Tls { url: String, reason: String },
    #[error("JetStream {operation} failed: {reason}")]
    JetStream {
        operation: &'static str,
        reason: String,
    },
    #[error("embedded log at {path}: {operation} failed: {reason}")]
    Embedded {
        path: String,
        operation: &'static str,
        reason: String,
    },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("the log is closed")]
    Closed,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// Stream sequence of the message (of the original, for a duplicate).
    pub sequence: u64,
    /// The dedup id was seen within the duplicate window: nothing new was stored.
    pub duplicate: bool,
}

/// One message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub subject: String,
    /// Idempotency key: a second append with the same id inside the duplicate window is dropped.
    pub dedup_id: String,
    pub payload: Bytes,
}

impl OutgoingMessage {
    /// The message for an event: its subject and the dedup id of its `occurrence`-th instance.
    pub fn from_event(event: &Event, occurrence: u32) -> Result<OutgoingMessage, LogError> {
        let subject = event.subject().map_err(|error| LogError::Invalid {
            what: "event id",
            reason: error.to_string(),
        })?;
        Ok(OutgoingMessage {
            subject,
            dedup_id: event.dedup_id(occurrence),
            payload: event.encode(),
        })
    }
}

/// A message as stored on the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMessage {
    pub sequence: u64,
    pub subject: String,
    /// When the log stored it, nanoseconds since the Unix epoch.
    pub stored_at_ns: u64,
    pub payload: Bytes,
}

impl LogMessage {
    /// Decodes the payload as an event; a malformed payload is an error to report, never a panic.
    pub fn event(&self) -> Result<Event, DecodeError> {
        Event::decode(&self.payload)
    }
}

/// Where an ordered read or a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first message still on the log.
    Beginning,
    /// The first message with this sequence or a later one.
    Sequence(u64),
    /// The first message stored at or after this time (ns since the epoch).
    TimeNs(u64),
}

/// A durable pull consumer: its name identifies it across restarts and across processes sharing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub durable_name: String,
    /// Subjects it receives (NATS wildcards); empty means every event.
    pub filter_subjects: Vec<String>,
    pub start_at: StartAt,
    /// A delivered message that is neither acked nor marked in progress within this is delivered again.
    pub ack_wait: Duration,
    /// Deliveries after which a message is given up on; `None` for no limit.
    pub max_deliver: Option<u32>,
    /// A consumer nobody has fetched from for this long is removed (JetStream); `None` keeps it forever. For
    /// consumers named after one process (a worker's own), so they do not pile up as workers come and go.
    pub remove_after_idle: Option<Duration>,
}

impl ConsumerConfig {
    pub fn new(durable_name: impl Into<String>, filter_subjects: Vec<String>) -> ConsumerConfig {
        ConsumerConfig {
            durable_name: durable_name.into(),
            filter_subjects,
            start_at: StartAt::Beginning,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            remove_after_idle: None,
        }
    }
}

/// What the consumer's owner says about a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done: never deliver it again.
    Ack,
    /// Not done: deliver it again, after `delay` if given.
    Nak { delay: Option<Duration> },
    /// Still working: restart the ack-wait clock.
    InProgress,
    /// Give up on it without processing: never deliver it again.
    Term,
}

/// The backend's handle for answering one delivery.
#[async_trait]
pub trait AckHandle: Send + Sync {
    async fn send(&self, kind: AckKind) -> Result<(), LogError>;
}

/// A message handed out by a consumer, to be answered with ack, nak, in-progress or term.
pub struct Delivery {
    pub message: LogMessage,
    /// 1 on first delivery, then incremented by each redelivery.
    pub delivery_attempt: u32,
    ack_handle: Box<dyn AckHandle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("delivery_attempt", &self.delivery_attempt)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    pub(crate) fn new(
        message: LogMessage,
        delivery_attempt: u32,
        ack_handle: Box<dyn AckHandle>,
    ) -> Delivery {
        Delivery {
            message,
            delivery_attempt,
            ack_handle,
        }
    }

    pub async fn ack(&self) -> Result<(), LogError> {
        self.ack_handle.send(AckKind::Ack).await
    }

    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), LogError> {
        self.ack_handle.send(AckKind::Nak { delay }).await
    }

    pub async fn in_progress(&self) -> Result<(), LogError> {
        self.ack_handle.send(AckKind::InProgress).await
    }

    pub async fn term(&self) -> Result<(), LogError> {
        self.ack_handle.send(AckKind::Term).await
    }
}

/// A durable pull consumer.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Up to `max_messages` deliveries; waits up to `wait` for the first one when none is ready, and returns an
    /// empty batch when none came.
    async fn fetch(&self, max_messages: usize, wait: Duration) -> Result<Vec<Delivery>, LogError>;

    /// Messages this consumer has not finished: not yet delivered, or delivered and not yet acked (the depth of a
    /// work queue, e.g. the prefill queue).
    async fn pending(&self) -> Result<u64, LogError>;
}

/// A key-value bucket whose entries expire after the bucket's time-to-live (worker heartbeats).
#[async_trait]
pub trait KvBucket: Send + Sync {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), LogError>;
    /// The value, or `None` when absent, deleted or expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, LogError>;
    async fn delete(&self, key: &str) -> Result<(), LogError>;
    /// Keys with a live value, sorted.
    async fn keys(&self) -> Result<Vec<String>, LogError>;
    /// Takes or renews `key` for `holder`, atomically: true (and the time-to-live starts again) when the key is
    /// absent, expired or already held by `holder`; false when someone else holds it. A lease: the holder renews
    /// it well within the time-to-live, and when it stops, another claimant gets the key once it expires.
    async fn claim(&self, key: &str, holder: &str) -> Result<bool, LogError>;
    /// Gives `key` up if `holder` holds it (a clean shutdown, so a standby need not wait for the expiry).
    async fn release(&self, key: &str, holder: &str) -> Result<(), LogError> {
        if self.get(key).await?.as_deref() == Some(holder.as_bytes()) {
            self.delete(key).await?;
        }
        Ok(())
    }
}

/// The persistent event log.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends one message and waits until it is stored.
    async fn append(&self, message: OutgoingMessage) -> Result<AppendAck, LogError>;

    /// Appends several messages, pipelined: all are sent before any acknowledgement is awaited. Acks come back in
    /// the order of `messages`.
    async fn append_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<AppendAck>, LogError>;

    /// Up to `max_messages` messages matching `filter_subjects` (empty: all), in sequence order, from `start`.
    async fn read(
        &self,
        start: StartAt,
        filter_subjects: &[String],
        max_messages: usize,
    ) -> Result<Vec<LogMessage>, LogError>;

    /// Sequence of the last stored message (0 when the log is empty).
    async fn last_sequence(&self) -> Result<u64, LogError>;

    /// Creates the durable consumer, or binds to it when it exists (set-up is idempotent).
    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError>;

    /// Creates the bucket, or binds to it when it exists. A zero `ttl` keeps entries until they are deleted.
    async fn kv_bucket(&self, name: &str, ttl: Duration) -> Result<Box<dyn KvBucket>, LogError>;

    /// Appends an event to its subject with the dedup id of its `occurrence`-th instance.
    async fn append_event(&self, event: &Event, occurrence: u32) -> Result<AppendAck, LogError> {
        self.append(OutgoingMessage::from_event(event, occurrence)?)
            .await
    }
}
