//! The JetStream backend of [`EventLog`]: the `TANDEM` stream on nats-server ≥ 2.11, durable pull consumers, and
//! JetStream key-value buckets. Set-up (stream, consumers, buckets) is idempotent, so every role can run it at start.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind as NatsAckKind, consumer, context::PublishErrorKind, kv, message::PublishMessage,
    stream,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::nats_connection::NatsConnectOptions;
use super::{
    AckHandle, AckKind, AppendAck, Consumer, ConsumerConfig, Delivery, EventLog, KvBucket,
    LogError, LogMessage, OutgoingMessage, StartAt,
};
use crate::subjects::{ALL_EVENTS, STREAM_NAME};

/// How the stream is set up.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    pub stream_name: String,
    /// Appends with a dedup id seen within this window are dropped as duplicates.
    pub duplicate_window: Duration,
    /// How long an append keeps retrying (same dedup id, so no double append) while the server is unreachable.
    pub append_retry_for: Duration,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            stream_name: STREAM_NAME.to_string(),
            duplicate_window: Duration::from_secs(120),
            append_retry_for: Duration::from_secs(30),
        }
    }
}

/// The event log on a NATS JetStream stream.
#[derive(Clone)]
pub struct JetStreamLog {
    client: async_nats::Client,
    context: jetstream::Context,
    options: JetStreamOptions,
}

/// How long a read or a fetch waits for the next message of a batch the server should already be answering.
const READ_STALL_LIMIT: Duration = Duration::from_secs(10);

fn js_error(operation: &'static str, error: impl std::fmt::Display) -> LogError {
    LogError::JetStream {
        operation,
        reason: error.to_string(),
    }
}

impl JetStreamLog {
    /// Connects without credentials and makes sure the stream exists with the expected configuration.
    pub async fn connect(url: &str) -> Result<JetStreamLog, LogError> {
        JetStreamLog::connect_with(
            url,
            &NatsConnectOptions::default(),
            JetStreamOptions::default(),
        )
        .await
    }

    /// Connects with credentials and TLS as `connection` says; a refused identity fails at once (no retry).
    pub async fn connect_with(
        url: &str,
        connection: &NatsConnectOptions,
        options: JetStreamOptions,
    ) -> Result<JetStreamLog, LogError> {
        let client = connection.connect(url).await?;
        JetStreamLog::with_client(client, options).await
    }

    /// Uses an existing connection (roles share one connection for the log and the token subjects).
    pub async fn with_client(
        client: async_nats::Client,
        options: JetStreamOptions,
    ) -> Result<JetStreamLog, LogError> {
        let context = jetstream::new(client.clone());
        context
            .create_or_update_stream(stream::Config {
                name: options.stream_name.clone(),
                subjects: vec![ALL_EVENTS.to_string()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: options.duplicate_window,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|error| js_error("stream set-up", error))?;
        Ok(JetStreamLog {
            client,
            context,
            options,
        })
    }

    /// The underlying connection, for NATS core subjects (token streaming).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn stream(&self) -> Result<stream::Stream, LogError> {
        self.context
            .get_stream(&self.options.stream_name)
            .await
            .map_err(|error| js_error("stream lookup", error))
    }

    /// Sends one publish and waits for its ack; transient failures are reported as `Err(retryable = true)`.
    async fn publish_once(&self, message: &OutgoingMessage) -> Result<AppendAck, (bool, LogError)> {
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.dedup_id);
        let ack_future = self
            .context
            .send_publish(message.subject.clone(), publish)
            .await
            .map_err(|error| (is_transient(error.kind()), js_error("append", error)))?;
        let ack = ack_future
            .await
            .map_err(|error| (is_transient(error.kind()), js_error("append", error)))?;
        Ok(AppendAck {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Publishes with retries on transient errors; the dedup id makes a retry of a stored message a no-op.
    async fn publish_retrying(&self, message: &OutgoingMessage) -> Result<AppendAck, LogError> {
        let deadline = tokio::time::Instant::now() + self.options.append_retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.publish_once(message).await {
                Ok(ack) => return Ok(ack),
                Err((true, error)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%error, subject = %message.subject, "append failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err((_, error)) => return Err(error),
            }
        }
    }
}

fn is_transient(kind: PublishErrorKind) -> bool {
    // A restarting server answers with timeouts, broken pipes or "no responders" (reported as Other).
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::Other
    )
}

fn deliver_policy(start: StartAt) -> Result<consumer::DeliverPolicy, LogError> {
    Ok(match start {
        StartAt::Beginning => consumer::DeliverPolicy::All,
        StartAt::Sequence(sequence) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: sequence.max(1),
        },
        StartAt::TimeNs(time_ns) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_ns))
                .map_err(|error| LogError::Invalid {
                    what: "start time",
                    reason: error.to_string(),
                })?,
        },
    })
}

fn log_message(message: &jetstream::Message) -> Result<LogMessage, LogError> {
    let info = message
        .info()
        .map_err(|error| js_error("message metadata", error))?;
    Ok(LogMessage {
        sequence: info.stream_sequence,
        subject: message.subject.to_string(),
        stored_at_ns: u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0),
        payload: message.payload.clone(),
    })
}

#[async_trait]
impl EventLog for JetStreamLog {
    async fn append(&self, message: OutgoingMessage) -> Result<AppendAck, LogError> {
        let started = std::time::Instant::now();
        let ack = self.publish_retrying(&message).await?;
        crate::metric_names::record_append("jetstream", started, 1);
        Ok(ack)
    }

    async fn append_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<AppendAck>, LogError> {
        let started = std::time::Instant::now();
        let mut pending = Vec::with_capacity(messages.len());
        for message in &messages {
            let publish = PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(&message.dedup_id);
            pending.push(
                self.context
                    .send_publish(message.subject.clone(), publish)
                    .await,
            );
        }
        let mut acks = Vec::with_capacity(messages.len());
        for (message, sent) in messages.iter().zip(pending) {
            let first_try = match sent {
                Ok(ack_future) => ack_future.await.map_err(|error| js_error("append", error)),
                Err(error) => Err(js_error("append", error)),
            };
            let ack = match first_try {
                Ok(ack) => AppendAck {
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                },
                // Retried one by one with the same dedup id: if the first try was stored, this is a no-op.
                Err(_) => self.publish_retrying(message).await?,
            };
            acks.push(ack);
        }
        crate::metric_names::record_append("jetstream", started, acks.len());
        Ok(acks)
    }

    async fn read(
        &self,
        start: StartAt,
        filter_subjects: &[String],
        max_messages: usize,
    ) -> Result<Vec<LogMessage>, LogError> {
        let last_sequence = self.last_sequence().await?;
        if max_messages == 0 || last_sequence == 0 {
            return Ok(Vec::new());
        }
        let stream = self.stream().await?;
        // An ephemeral consumer without acks reads the stream in order with the server doing the filtering.
        let reader = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: deliver_policy(start)?,
                ack_policy: consumer::AckPolicy::None,
                filter_subjects: filter_subjects.to_vec(),
                inactive_threshold: Duration::from_secs(60),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|error| js_error("reader set-up", error))?;
        let reader_name = reader.cached_info().name.clone();
        let mut messages = Vec::new();
        'fetching: while messages.len() < max_messages {
            let want = (max_messages - messages.len()).min(10_000);
            let mut batch = reader
                .fetch()
                .max_messages(want)
                .messages()
                .await
                .map_err(|error| js_error("read", error))?;
            let before = messages.len();
            loop {
                // A fetch asked with no_wait has no client-side timer: if its request or answer is lost (the
                // server restarting), the batch would wait forever, and with it a gateway's stall check or a
                // worker's loop.
                let next = tokio::time::timeout(READ_STALL_LIMIT, batch.next())
                    .await
                    .map_err(|_elapsed| LogError::JetStream {
                        operation: "read",
                        reason: format!(
                            "no answer from the server for {} s (it may be restarting)",
                            READ_STALL_LIMIT.as_secs()
                        ),
                    })?;
                let Some(message) = next else { break };
                let message = message.map_err(|error| js_error("read", error))?;
                let message = log_message(&message)?;
                let reached_end = message.sequence >= last_sequence;
                messages.push(message);
                if reached_end {
                    break 'fetching;
                }
            }
            if messages.len() == before {
                break;
            }
        }
        if let Err(error) = stream.delete_consumer(&reader_name).await {
            tracing::debug!(%error, "ephemeral reader not deleted; it expires on its own");
        }
        messages.truncate(max_messages);
        Ok(messages)
    }

    async fn last_sequence(&self) -> Result<u64, LogError> {
        let mut stream = self.stream().await?;
        let info = stream
            .info()
            .await
            .map_err(|error| js_error("stream info", error))?;
        Ok(info.state.last_sequence)
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError> {
        let stream = self.stream().await?;
        let pull_config = consumer::pull::Config {
            durable_name: Some(config.durable_name.clone()),
            deliver_policy: deliver_policy(config.start_at)?,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver.map_or(-1, i64::from),
            filter_subjects: config.filter_subjects.clone(),
            inactive_threshold: config.remove_after_idle.unwrap_or_default(),
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(&config.durable_name, pull_config)
            .await
            .map_err(|error| js_error("consumer set-up", error))?;
        Ok(Box::new(JetStreamConsumer { consumer }))
    }

    async fn kv_bucket(&self, name: &str, ttl: Duration) -> Result<Box<dyn KvBucket>, LogError> {
        let store = self
            .context
            .create_or_update_key_value(kv::Config {
                bucket: name.to_string(),
                history: 1,
                max_age: ttl,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|error| js_error("key-value bucket set-up", error))?;
        Ok(Box::new(JetStreamKv { store }))
    }
}

struct JetStreamConsumer {
    consumer: consumer::Consumer<consumer::pull::Config>,
}

impl JetStreamConsumer {
    async fn collect(
        &self,
        batch: impl futures::Stream<Item = Result<jetstream::Message, impl std::fmt::Display>>,
        into: &mut Vec<Delivery>,
    ) -> Result<(), LogError> {
        futures::pin_mut!(batch);
        loop {
            // Same lost-fetch hazard as in `read`; what did come is real work, so it is kept (anything still in
            // flight is redelivered after the ack wait).
            let Ok(next) = tokio::time::timeout(READ_STALL_LIMIT, batch.next()).await else {
                tracing::warn!(
                    collected = into.len(),
                    "a fetch got no answer from the server for {} s (it may be restarting)",
                    READ_STALL_LIMIT.as_secs()
                );
                break;
            };
            let Some(message) = next else { break };
            let message = message.map_err(|error| js_error("fetch", error))?;
            let log_message = log_message(&message)?;
            let info = message
                .info()
                .map_err(|error| js_error("message metadata", error))?;
            let attempt = u32::try_from(info.delivered).unwrap_or(u32::MAX);
            into.push(Delivery::new(
                log_message,
                attempt,
                Box::new(JetStreamAck { message }),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for JetStreamConsumer {
    async fn fetch(&self, max_messages: usize, wait: Duration) -> Result<Vec<Delivery>, LogError> {
        let mut deliveries = Vec::new();
        if max_messages == 0 {
            return Ok(deliveries);
        }
        // First take what is ready without waiting; only when nothing is, wait for a single message, so a caller
        // gets work as soon as there is any rather than when the batch is full.
        let ready = self
            .consumer
            .fetch()
            .max_messages(max_messages)
            .messages()
            .await
            .map_err(|error| js_error("fetch", error))?;
        self.collect(ready, &mut deliveries).await?;
        if deliveries.is_empty() && !wait.is_zero() {
            let first = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait.max(Duration::from_millis(10)))
                .messages()
                .await
                .map_err(|error| js_error("fetch", error))?;
            self.collect(first, &mut deliveries).await?;
            if !deliveries.is_empty() && max_messages > 1 {
                let rest = self
                    .consumer
                    .fetch()
                    .max_messages(max_messages - 1)
                    .messages()
                    .await
                    .map_err(|error| js_error("fetch", error))?;
                self.collect(rest, &mut deliveries).await?;
            }
        }
        Ok(deliveries)
    }

    async fn pending(&self) -> Result<u64, LogError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|error| js_error("consumer info", error))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}

struct JetStreamAck {
    message: jetstream::Message,
}

#[async_trait]
impl AckHandle for JetStreamAck {
    async fn send(&self, kind: AckKind) -> Result<(), LogError> {
        let nats_kind = match kind {
            AckKind::Ack => NatsAckKind::Ack,
            AckKind::Nak { delay } => NatsAckKind::Nak(delay),
            AckKind::InProgress => NatsAckKind::Progress,
            AckKind::Term => NatsAckKind::Term,
        };
        // Waiting for the server's confirmation: a fire-and-forget ack lost on a reconnect would redeliver work
        // that was already done.
        self.message
            .double_ack_with(nats_kind)
            .await
            .map_err(|error| js_error("ack", error))
    }
}

struct JetStreamKv {
    store: kv::Store,
}

#[async_trait]
impl KvBucket for JetStreamKv {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), LogError> {
        self.store
            .put(key, value)
            .await
            .map(|_revision| ())
            .map_err(|error| js_error("key-value put", error))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, LogError> {
        self.store
            .get(key)
            .await
            .map_err(|error| js_error("key-value get", error))
    }

    async fn delete(&self, key: &str) -> Result<(), LogError> {
        self.store
            .delete(key)
            .await
            .map_err(|error| js_error("key-value delete", error))
    }

    async fn claim(&self, key: &str, holder: &str) -> Result<bool, LogError> {
        let value = Bytes::copy_from_slice(holder.as_bytes());
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|error| js_error("key-value entry", error))?;
        // Compare-and-set on the revision: of two claimants racing for a free or expiring key, one write lands.
        let written = match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                if entry.value.as_ref() != holder.as_bytes() {
                    return Ok(false);
                }
                self.store.update(key, value, entry.revision).await.is_ok()
            }
            _ => self.store.create(key, value).await.is_ok(),
        };
        Ok(written)
    }

    async fn keys(&self) -> Result<Vec<String>, LogError> {
        let keys = self
            .store
            .keys()
            .await
            .map_err(|error| js_error("key-value keys", error))?;
        let mut keys: Vec<String> = keys
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|error| js_error("key-value keys", error))?;
        keys.sort();
        Ok(keys)
    }
}
