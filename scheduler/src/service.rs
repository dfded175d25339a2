//! The scheduler process: its projection of the log, its lease, and its decisions, in one loop.
//!
//! Every replica projects the whole log into its own redb file (its own durable consumer, named after it); one
//! replica at a time is **active**: it holds the lease (a key in the [`LEASE_BUCKET`] key-value bucket with a
//! time-to-live, renewed by compare-and-set) and only it decides. A standby keeps its projection current and takes
//! the lease once it expires, so a failover waits at most the lease's time-to-live. Decisions carry fixed dedup
//! ids (see [`crate::control`]), so even two replicas briefly both believing they are active route a request once.
//!
//! Decisions start only after the projection has caught up with the log as it was at start: a scheduler that
//! restarts decides from the same state a rebuild would give, not from a stale one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_events::log::{EventLog, KvBucket};
use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
use tandem_events::tokens::TokenBus;
use tokio::sync::watch;

use crate::control::{Control, ControlConfig, PhaseTimeouts, TickSummary};
use crate::projection::projector::{Projector, named_consumer_config};
use crate::projection::{Projection, ProjectionError, ProjectionReader};
use crate::routing::RoutingPolicy;

/// The key-value bucket of the active scheduler's lease.
pub const LEASE_BUCKET: &str = "tandem-scheduler-lease";
/// The lease's key.
const LEASE_KEY: &str = "active";
/// At most this long between decision rounds, even with nothing new on the log (timeouts, lost heartbeats).
const MAX_TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Rounds of decisions after applied batches are at least this far apart.
const MIN_TICK_INTERVAL: Duration = Duration::from_millis(2);

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Stable across restarts of this replica (its durable consumer and lease are named after it).
    pub scheduler_id: String,
    /// The redb file of its projection.
    pub projection_path: PathBuf,
    pub control: ControlConfig,
    /// A standby takes over at most this long after the active scheduler stops renewing.
    pub lease_ttl: Duration,
}

impl SchedulerConfig {
    /// KV-aware routing (weight 1, no sampling), the default timeouts, a 5 s lease.
    pub fn new(scheduler_id: impl Into<String>, projection_path: PathBuf) -> SchedulerConfig {
        let scheduler_id = scheduler_id.into();
        SchedulerConfig {
            control: ControlConfig {
                scheduler_id: scheduler_id.clone(),
                policy: RoutingPolicy::KvAware {
                    overlap_weight: 1.0,
                    temperature: 0.0,
                },
                timeouts: PhaseTimeouts::default(),
                join_grace: WORKER_HEARTBEAT_TTL + Duration::from_secs(1),
            },
            scheduler_id,
            projection_path,
            lease_ttl: Duration::from_secs(5),
        }
    }
}

/// What the scheduler reports about itself (for `/ready` and the query API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStatus {
    /// The projection has caught up with the log as it was at start.
    pub caught_up: bool,
    /// This replica holds the lease and decides.
    pub active: bool,
    pub last_applied_sequence: u64,
    pub last_tick: TickSummary,
}

/// Errors that stop the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("projection: {0}")]
    Projection(#[from] ProjectionError),
    #[error("event log: {0}")]
    Log(#[from] tandem_events::log::LogError),
}

/// Deletes a projection file that cannot be this log's (it has applied more than the log holds: another log, or
/// one that was wiped) or that an older build wrote; the projection is then rebuilt from the log, as any
/// projection can be. Keeping it would skip the log's events as already applied.
async fn discard_foreign_projection(
    log: &dyn EventLog,
    path: &std::path::Path,
) -> Result<(), SchedulerError> {
    if !path.exists() {
        return Ok(());
    }
    let log_last_sequence = log.last_sequence().await?;
    let discard = match Projection::open(path) {
        Ok(projection) => {
            let applied = projection.last_applied()?;
            (applied > log_last_sequence).then(|| {
                format!(
                    "it has applied up to sequence {applied} but the log ends at {log_last_sequence}: it is \
                     from another log"
                )
            })
        }
        Err(error @ ProjectionError::SchemaVersion { .. }) => Some(error.to_string()),
        Err(error) => return Err(error.into()),
    };
    if let Some(reason) = discard {
        tracing::warn!(path = %path.display(), %reason, "discarding the projection; rebuilding it from the log");
        std::fs::remove_file(path).map_err(|error| ProjectionError::Storage {
            path: path.display().to_string(),
            operation: "remove a foreign projection",
            reason: error.to_string(),
        })?;
    }
    Ok(())
}

/// An opened scheduler, ready to [`Scheduler::run`].
pub struct Scheduler {
    log: Arc<dyn EventLog>,
    projector: Projector,
    control: Control,
    leases: Box<dyn KvBucket>,
    /// The lease's value: the scheduler id plus this process's ULID, so two processes started with one id by
    /// mistake do not both hold it.
    lease_holder: String,
    lease_ttl: Duration,
    status: watch::Sender<SchedulerStatus>,
}

impl Scheduler {
    pub async fn open(
        log: Arc<dyn EventLog>,
        tokens: Arc<dyn TokenBus>,
        config: SchedulerConfig,
    ) -> Result<Scheduler, SchedulerError> {
        discard_foreign_projection(log.as_ref(), &config.projection_path).await?;
        let consumer_name = format!("scheduler-projection-{}", config.scheduler_id);
        let projector = Projector::open(
            Arc::clone(&log),
            config.projection_path.clone(),
            named_consumer_config(&consumer_name),
        )
        .await?;
        let heartbeats = log.kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL).await?;
        let leases = log.kv_bucket(LEASE_BUCKET, config.lease_ttl).await?;
        let lease_holder = format!("{}/{}", config.scheduler_id, ulid::Ulid::new());
        let control = Control::new(Arc::clone(&log), tokens, heartbeats, config.control);
        let (status, _) = watch::channel(SchedulerStatus::default());
        Ok(Scheduler {
            log,
            projector,
            control,
            leases,
            lease_holder,
            lease_ttl: config.lease_ttl,
            status,
        })
    }

    /// Reads the scheduler's projection (for the query API).
    pub fn reader(&self) -> ProjectionReader {
        self.projector.reader().clone()
    }

    /// Follows the scheduler's status.
    pub fn status(&self) -> watch::Receiver<SchedulerStatus> {
        self.status.subscribe()
    }

    /// Projects and decides until `stop` turns true; gives the lease up on the way out.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), SchedulerError> {
        let catch_up_to = self.log.last_sequence().await?;
        let mut caught_up = false;
        let mut active = false;
        let mut last_claim: Option<Instant> = None;
        let mut last_tick: Option<Instant> = None;
        let renew_every = self.lease_ttl / 4;
        tracing::info!(holder = %self.lease_holder, catch_up_to, "scheduler started");
        while !*stop.borrow() {
            let applied = self.projector.step(&mut stop).await?;
            let last_applied = self.projector.reader().last_applied()?;
            if !caught_up {
                if last_applied < catch_up_to {
                    continue;
                }
                caught_up = true;
                tracing::info!(last_applied, "projection caught up with the log");
            }
            if last_claim.is_none_or(|claimed| claimed.elapsed() >= renew_every) {
                let holds = match self.leases.claim(LEASE_KEY, &self.lease_holder).await {
                    Ok(holds) => holds,
                    Err(error) => {
                        // Unsure whether the lease was renewed: stop deciding until it is known.
                        tracing::warn!(%error, "could not renew the scheduler lease");
                        false
                    }
                };
                last_claim = Some(Instant::now());
                if holds != active {
                    tracing::info!(
                        holder = %self.lease_holder,
                        "scheduler is now {}",
                        if holds { "active" } else { "a standby" }
                    );
                }
                active = holds;
            }
            // A batch just applied is decided on now, at most one round per MIN_TICK_INTERVAL: skipping it would
            // leave its requests waiting for the next fetch, which idles up to 500 ms when nothing else arrives.
            if active
                && applied > 0
                && let Some(ticked) = last_tick
                && ticked.elapsed() < MIN_TICK_INTERVAL
            {
                tokio::time::sleep(MIN_TICK_INTERVAL.saturating_sub(ticked.elapsed())).await;
            }
            let due = last_tick.is_none_or(|ticked| {
                ticked.elapsed() >= MAX_TICK_INTERVAL
                    || (applied > 0 && ticked.elapsed() >= MIN_TICK_INTERVAL)
            });
            let mut summary = self.status.borrow().last_tick.clone();
            if active && due {
                last_tick = Some(Instant::now());
                match self.control.tick(self.projector.reader()).await {
                    Ok(tick) => summary = tick,
                    Err(error) => {
                        tracing::warn!(%error, "a round of scheduling decisions failed; retrying")
                    }
                }
            }
            self.status.send_replace(SchedulerStatus {
                caught_up,
                active,
                last_applied_sequence: last_applied,
                last_tick: summary,
            });
        }
        if active && let Err(error) = self.leases.release(LEASE_KEY, &self.lease_holder).await {
            tracing::warn!(%error, "could not give the scheduler lease up; a standby waits for its expiry");
        }
        tracing::info!("scheduler stopped");
        Ok(())
    }
}
