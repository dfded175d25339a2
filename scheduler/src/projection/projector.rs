//! The projector: a durable consumer of every event (`scheduler-projection`, `tandem.ev.>`) that applies each
//! fetched batch to the projection in one transaction and acknowledges it only after the commit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_events::log::{
    Consumer, ConsumerConfig, Delivery, EventLog, LogError, LogMessage, StartAt,
};
use tandem_events::subjects;
use tokio::sync::watch;

use super::{Projection, ProjectionError, ProjectionReader};

/// The durable consumer of the projection: one projector per projection file.
pub const PROJECTION_CONSUMER: &str = "scheduler-projection";
/// Most messages fetched, applied and committed together.
const MAX_BATCH_MESSAGES: usize = 256;
/// How long a fetch waits for the first message before looking at `stop` again.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// A delivered message not acked within this comes again. Short, because a redelivery costs only a skipped
/// message (its sequence is at or below the stored one), while a long wait would hold back messages whose acks a
/// killed nats-server lost; a batch that is slow to commit is marked in progress when it is retried.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// Pause before retrying a batch whose transaction failed, or a fetch that failed.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The projector's durable consumer: every event, from the beginning of the log.
pub fn consumer_config() -> ConsumerConfig {
    named_consumer_config(PROJECTION_CONSUMER)
}

/// A projector consumer under its own name: each scheduler replica keeps its own projection, so each needs every
/// event (a shared name would split the events between them).
pub fn named_consumer_config(durable_name: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(durable_name, vec![subjects::ALL_EVENTS.to_string()]);
    config.ack_wait = ACK_WAIT;
    config
}

/// Projects the log into the redb file at `db_path` until `stop` turns true.
pub async fn run_projector(
    log: Arc<dyn EventLog>,
    db_path: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let mut projector = Projector::open(log, db_path, consumer_config()).await?;
    while !*stop.borrow() {
        projector.step(&mut stop).await?;
    }
    Ok(())
}

/// A projection fed by a durable consumer of the whole log, one batch per [`Projector::step`].
pub struct Projector {
    log: Arc<dyn EventLog>,
    consumer: Box<dyn Consumer>,
    /// `None` only while a batch is applied on a blocking thread.
    projection: Option<Projection>,
    reader: ProjectionReader,
    db_path: PathBuf,
}

impl Projector {
    /// Opens (or creates) the projection at `db_path` and its consumer.
    pub async fn open(
        log: Arc<dyn EventLog>,
        db_path: PathBuf,
        consumer: ConsumerConfig,
    ) -> Result<Projector, ProjectionError> {
        let projection = open_blocking(db_path.clone()).await?;
        let consumer = log.consumer(consumer).await?;
        tracing::info!(path = %db_path.display(), last_applied = projection.last_applied()?, "projector started");
        Ok(Projector {
            log,
            consumer,
            reader: projection.reader(),
            projection: Some(projection),
            db_path,
        })
    }

    /// Reads the projection as of its last commit.
    pub fn reader(&self) -> &ProjectionReader {
        &self.reader
    }

    /// Fetches one batch (waiting up to half a second for it, less when `stop` turns true) and applies it in one
    /// transaction, acknowledging it after the commit. Returns how many messages it applied.
    ///
    /// Messages are applied in sequence order with none skipped (see [`messages_to_apply`]); a batch whose
    /// transaction fails is retried as it is, since a later message applied before it would raise the stored
    /// sequence past it and it would be dropped as a redelivery.
    pub async fn step(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<usize, ProjectionError> {
        let fetched = tokio::select! {
            fetched = self.consumer.fetch(MAX_BATCH_MESSAGES, FETCH_WAIT) => fetched,
            _ = stop.changed() => return Ok(0),
        };
        let deliveries = match fetched {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!(%error, "fetching events for the projection failed; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
                return Ok(0);
            }
        };
        if deliveries.is_empty() {
            return Ok(0);
        }
        let last_applied = self.reader.last_applied()?;
        let mut messages =
            match messages_to_apply(self.log.as_ref(), last_applied, &deliveries).await {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%error, "reading a gap of the log failed; retrying the batch");
                    for delivery in &deliveries {
                        let _ = delivery.nak(Some(RETRY_DELAY)).await;
                    }
                    return Ok(0);
                }
            };
        let applied = messages.len();
        loop {
            let Some(mut projection) = self.projection.take() else {
                return Err(self.storage_error(
                    "apply task",
                    "the projection was lost by an earlier failed apply",
                ));
            };
            let (back, returned, result) = tokio::task::spawn_blocking(move || {
                let result = projection.apply_batch(&messages);
                (projection, messages, result)
            })
            .await
            .map_err(|error| self.storage_error("apply task", error))?;
            self.projection = Some(back);
            messages = returned;
            let Err(error) = result else { break };
            tracing::error!(%error, "applying a batch to the projection failed; retrying it");
            if *stop.borrow() {
                return Err(error);
            }
            // Keep the batch ours while it is retried, so it is not handed out again meanwhile.
            keep_in_progress(&deliveries).await;
            tokio::time::sleep(RETRY_DELAY).await;
        }
        // Acked only after the commit: a crash before here redelivers messages the stored sequence skips.
        for delivery in &deliveries {
            if let Err(error) = delivery.ack().await {
                tracing::warn!(%error, sequence = delivery.message.sequence, "ack failed; the redelivery will be skipped");
            }
        }
        Ok(applied)
    }

    fn storage_error(
        &self,
        operation: &'static str,
        error: impl std::fmt::Display,
    ) -> ProjectionError {
        ProjectionError::Storage {
            path: self.db_path.display().to_string(),
            operation,
            reason: error.to_string(),
        }
    }
}

/// The messages after `last_applied` up to the newest delivered one, in sequence order, with none missing.
///
/// Every message on the stream is an event and this consumer takes them all, so the sequences to apply are the
/// dense run after the stored one. A fetch need not deliver that run: messages handed to a fetch that was
/// cancelled, or lost on the way, come again only after the ack wait, while later ones are delivered at once.
/// Applying those first would raise the stored sequence past the missing ones, which would then be skipped as
/// redeliveries; so a gap is read from the log itself. (A run the log no longer holds, removed by retention,
/// stays a gap.)
async fn messages_to_apply(
    log: &dyn EventLog,
    last_applied: u64,
    deliveries: &[Delivery],
) -> Result<Vec<LogMessage>, LogError> {
    let mut delivered: Vec<LogMessage> = deliveries
        .iter()
        .map(|delivery| delivery.message.clone())
        .filter(|message| message.sequence > last_applied)
        .collect();
    delivered.sort_by_key(|message| message.sequence);
    delivered.dedup_by_key(|message| message.sequence);
    if is_dense_after(last_applied, &delivered) {
        return Ok(delivered);
    }
    let Some(newest) = delivered.last().map(|message| message.sequence) else {
        return Ok(delivered);
    };
    tracing::debug!(
        last_applied,
        newest,
        "delivered events leave a gap; reading it from the log"
    );
    let wanted = usize::try_from(newest - last_applied).unwrap_or(usize::MAX);
    let mut read = log
        .read(StartAt::Sequence(last_applied + 1), &[], wanted)
        .await?;
    read.retain(|message| message.sequence <= newest);
    Ok(read)
}

/// `messages` are exactly the sequences `last_applied + 1, last_applied + 2, ...`.
fn is_dense_after(last_applied: u64, messages: &[LogMessage]) -> bool {
    messages
        .iter()
        .zip(last_applied + 1..)
        .all(|(message, expected)| message.sequence == expected)
}

async fn keep_in_progress(deliveries: &[Delivery]) {
    for delivery in deliveries {
        let _ = delivery.in_progress().await;
    }
}

async fn open_blocking(path: PathBuf) -> Result<Projection, ProjectionError> {
    let display = path.display().to_string();
    tokio::task::spawn_blocking(move || Projection::open(&path))
        .await
        .map_err(|error| ProjectionError::Storage {
            path: display,
            operation: "open task",
            reason: error.to_string(),
        })?
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn at(sequence: u64) -> LogMessage {
        LogMessage {
            sequence,
            subject: "tandem.ev.received.r".into(),
            stored_at_ns: 0,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn only_a_run_right_after_the_stored_sequence_is_dense() {
        assert!(is_dense_after(4, &[]));
        assert!(is_dense_after(4, &[at(5), at(6), at(7)]));
        assert!(!is_dense_after(4, &[at(6), at(7)]), "5 is missing");
        assert!(!is_dense_after(4, &[at(5), at(7)]), "6 is missing");
        assert!(!is_dense_after(0, &[at(2)]));
    }
}
