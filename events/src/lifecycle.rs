//! The request-lifecycle state machine: which event may follow which. The scheduler and the replay CLI both run
//! every request's events through it; a broken order is a typed [`LifecycleViolation`], never a panic.
//!
//! ```text
//! Received ─▶ Routed ─┬▶ PrefillLocal ──────────────────────────────────────────┬▶ DecodeStarted ─▶ TokensDecoded* ─▶ Completed
//!    ▲                └▶ PrefillQueued ─▶ PrefillStarted+ ─▶ PrefillDone ─▶ KvTransferred ┘
//!    └── Migrated ◀── (any state from Routed to decoding)        Failed | Cancelled from any live state
//! ```
//! A migration starts a new attempt: `Migrated` then `Routed` (attempt n+1) to another decode worker, then the normal
//! path again, its checkpoints continuing at `Migrated.tokens_generated`. The old worker may still be alive (it was
//! only declared lost) and its events may land later: an event naming a decode worker that an earlier attempt ran
//! on (and the current one does not) is accepted as late, with no effect, in any state, even after the end; a
//! prefill worker's `PrefillStarted`/`PrefillDone`, which name no decode worker, are late when they cannot follow.
//! On the remote path the decode worker starts as soon as the KV has arrived, so `DecodeStarted` may come right
//! after `PrefillStarted`, and the prefill worker's `PrefillDone` then `KvTransferred` may follow it (once each).
//! An event that may not follow the current state but is identical to one already applied (a retried append, a
//! redelivery) is an idempotent repeat: accepted, no effect, also after a terminal event. A cancellation races the
//! work in flight: pipeline events that land after `Cancelled` are accepted as late, with no effect.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::event::EventKind;
use crate::schema::Body;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestState {
    /// No event seen yet.
    New,
    /// Accepted by the gateway, waiting for the scheduler.
    Received,
    /// A decode worker owns it and decides how to prefill.
    Routed,
    /// The decode worker prefills the prompt itself.
    PrefillLocal,
    /// Waiting on the prefill queue.
    PrefillQueued,
    /// A prefill worker is computing it.
    PrefillRunning,
    /// Prompt computed, KV on its way.
    PrefillDone,
    /// KV arrived at the decode worker.
    KvTransferred,
    /// In a decode batch.
    Decoding,
    /// Taken off a lost decode worker, waiting to be routed again.
    Migrating,
    Completed,
    Failed,
    Cancelled,
}

impl RequestState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestState::Completed | RequestState::Failed | RequestState::Cancelled
        )
    }

    /// Between `Received` and a terminal event.
    pub fn is_live(self) -> bool {
        self != RequestState::New && !self.is_terminal()
    }
}

/// Why an event may not follow the request's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViolationReason {
    #[error("worker events are not part of a request's lifecycle")]
    NotARequestEvent,
    #[error("the first event of a request must be Received")]
    NotReceivedFirst,
    #[error("the request already ended")]
    AfterTerminal,
    #[error("this event cannot follow the current state")]
    OutOfOrder,
    #[error("token checkpoint starts at index {found}, expected {expected}: tokens are missing")]
    TokenIndexGap { expected: u32, found: u32 },
    #[error(
        "token checkpoint starts at index {found}, expected {expected}: a token index is written twice"
    )]
    TokenIndexRepeated { expected: u32, found: u32 },
    #[error("prefill delivery attempt {found} does not follow attempt {previous}")]
    AttemptNotIncreasing { previous: u32, found: u32 },
    #[error("migration carries {claimed} tokens but only {checkpointed} were checkpointed")]
    MigratedUncheckpointedTokens { claimed: u32, checkpointed: u32 },
}

/// An event that breaks the lifecycle, with the state it met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} in state {state:?}: {reason}")]
pub struct LifecycleViolation {
    pub state: RequestState,
    pub event: EventKind,
    pub reason: ViolationReason,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The request moved (or stayed, for a further checkpoint) to this state.
    Advanced(RequestState),
    /// The same event was applied before; nothing changed.
    Repeat,
    /// Work that was in flight when the request was cancelled (a routing, a checkpoint, even a completion racing
    /// the client's disconnect) landed after the cancellation; recorded, nothing changed.
    AfterCancellation,
    /// Work of an attempt that a migration superseded (its decode worker was declared lost but was still running)
    /// landed after the `Migrated`; recorded, nothing changed.
    AfterMigration,
    /// A cancellation (the client gone, or the gateway giving up on a stream whose updates were lost) that raced the
    /// request's own end and landed after it; recorded, nothing changed.
    LateCancellation,
}

/// One request's lifecycle: its state plus what the rules need to remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLifecycle {
    state: RequestState,
    tokens_checkpointed: u32,
    prefill_attempt: u32,
    /// The current prefill went to the prefill queue, and which of its records are on the log yet: the decode
    /// worker starts decoding as soon as the KV has arrived, so `DecodeStarted` may land before the prefill
    /// worker's `PrefillDone` and `KvTransferred`.
    remote_prefill: RemotePrefill,
    /// Fingerprints of the bodies applied so far, to recognise idempotent repeats.
    applied_fingerprints: BTreeSet<u64>,
    /// The decode worker of the current attempt (from its `Routed`).
    decode_worker_id: String,
    /// Decode workers of attempts a migration took the request from, not counting the current one's: their
    /// events are late.
    superseded_decode_workers: BTreeSet<String>,
    migrations: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct RemotePrefill {
    queued: bool,
    done_recorded: bool,
    transfer_recorded: bool,
}

impl Default for RequestLifecycle {
    fn default() -> Self {
        RequestLifecycle {
            state: RequestState::New,
            tokens_checkpointed: 0,
            prefill_attempt: 0,
            remote_prefill: RemotePrefill::default(),
            applied_fingerprints: BTreeSet::new(),
            decode_worker_id: String::new(),
            superseded_decode_workers: BTreeSet::new(),
            migrations: 0,
        }
    }
}

impl RequestLifecycle {
    pub fn state(&self) -> RequestState {
        self.state
    }

    /// Generated tokens recorded by `TokensDecoded` checkpoints (and kept across a migration).
    pub fn tokens_checkpointed(&self) -> u32 {
        self.tokens_checkpointed
    }

    /// How many times the request was migrated (its current attempt is this plus one).
    pub fn migrations(&self) -> u32 {
        self.migrations
    }

    /// Applies one event; on a violation the lifecycle is left unchanged.
    pub fn apply(&mut self, body: &Body) -> Result<Applied, LifecycleViolation> {
        if self.is_late_from_superseded_attempt(body) {
            return Ok(Applied::AfterMigration);
        }
        let fingerprint = fingerprint(body);
        // Legality first: after a migration the new decode worker may legitimately send a body identical to one
        // sent before it (same worker, same decision); only an event that could not follow is a repeat.
        let next = match self.next(body) {
            Ok(next) => next,
            Err(_) if self.applied_fingerprints.contains(&fingerprint) => {
                return Ok(Applied::Repeat);
            }
            Err(ViolationReason::AfterTerminal)
                if self.state == RequestState::Cancelled && is_pipeline_work(body.kind()) =>
            {
                return Ok(Applied::AfterCancellation);
            }
            Err(ViolationReason::AfterTerminal) if matches!(body, Body::Cancelled(_)) => {
                return Ok(Applied::LateCancellation);
            }
            Err(_)
                if self.migrations > 0
                    && matches!(body, Body::PrefillStarted(_) | Body::PrefillDone(_)) =>
            {
                return Ok(Applied::AfterMigration);
            }
            Err(reason) => {
                return Err(LifecycleViolation {
                    state: self.state,
                    event: body.kind(),
                    reason,
                });
            }
        };
        self.applied_fingerprints.insert(fingerprint);
        match body {
            Body::TokensDecoded(checkpoint) => {
                self.tokens_checkpointed += checkpoint.token_ids.len() as u32;
            }
            Body::PrefillStarted(started) => self.prefill_attempt = started.delivery_attempt,
            Body::PrefillQueued(_) => self.remote_prefill.queued = true,
            Body::PrefillDone(_) => self.remote_prefill.done_recorded = true,
            Body::KvTransferred(_) => self.remote_prefill.transfer_recorded = true,
            Body::Migrated(migrated) => {
                self.tokens_checkpointed = migrated.tokens_generated;
                self.prefill_attempt = 0;
                self.remote_prefill = RemotePrefill::default();
                self.migrations += 1;
                let current = std::mem::take(&mut self.decode_worker_id);
                self.superseded_decode_workers.extend(
                    [current, migrated.from_worker_id.clone()]
                        .into_iter()
                        .filter(|worker_id| !worker_id.is_empty()),
                );
            }
            Body::Routed(routed) => {
                // Routed back to a worker an earlier attempt ran on: its events count again.
                self.superseded_decode_workers
                    .remove(&routed.decode_worker_id);
                self.decode_worker_id = routed.decode_worker_id.clone();
            }
            _ => {}
        }
        self.state = next;
        Ok(Applied::Advanced(next))
    }

    /// The state `body` leads to, or why it may not follow the current one.
    fn next(&self, body: &Body) -> Result<RequestState, ViolationReason> {
        use RequestState as S;
        let kind = body.kind();
        if kind.is_worker_event() {
            return Err(ViolationReason::NotARequestEvent);
        }
        if let Some(state) = self.late_prefill_record(body) {
            return Ok(state);
        }
        if self.state.is_terminal() {
            return Err(ViolationReason::AfterTerminal);
        }
        if self.state == S::New {
            return match body {
                Body::Received(_) => Ok(S::Received),
                _ => Err(ViolationReason::NotReceivedFirst),
            };
        }
        match (self.state, body) {
            (_, Body::Failed(_)) => Ok(S::Failed),
            (_, Body::Cancelled(_)) => Ok(S::Cancelled),
            (S::Received | S::Migrating, Body::Routed(_)) => Ok(S::Routed),
            (S::Routed, Body::PrefillLocal(_)) => Ok(S::PrefillLocal),
            (S::Routed, Body::PrefillQueued(_)) => Ok(S::PrefillQueued),
            (S::PrefillQueued | S::PrefillRunning, Body::PrefillStarted(started)) => {
                if started.delivery_attempt > self.prefill_attempt {
                    Ok(S::PrefillRunning)
                } else {
                    Err(ViolationReason::AttemptNotIncreasing {
                        previous: self.prefill_attempt,
                        found: started.delivery_attempt,
                    })
                }
            }
            (S::PrefillRunning, Body::PrefillDone(_)) => Ok(S::PrefillDone),
            (S::PrefillDone, Body::KvTransferred(_)) => Ok(S::KvTransferred),
            (S::PrefillLocal | S::KvTransferred, Body::DecodeStarted(_)) => Ok(S::Decoding),
            // The KV arrived before the prefill worker's records reached the log.
            (S::PrefillRunning | S::PrefillDone, Body::DecodeStarted(_))
                if self.remote_prefill.queued =>
            {
                Ok(S::Decoding)
            }
            (S::Decoding, Body::TokensDecoded(checkpoint)) => {
                let expected = self.tokens_checkpointed;
                match checkpoint.start_index {
                    found if found == expected => Ok(S::Decoding),
                    found if found > expected => {
                        Err(ViolationReason::TokenIndexGap { expected, found })
                    }
                    found => Err(ViolationReason::TokenIndexRepeated { expected, found }),
                }
            }
            (S::Decoding, Body::Completed(_)) => Ok(S::Completed),
            (
                S::Routed
                | S::PrefillLocal
                | S::PrefillQueued
                | S::PrefillRunning
                | S::PrefillDone
                | S::KvTransferred
                | S::Decoding,
                Body::Migrated(migrated),
            ) => {
                if migrated.tokens_generated <= self.tokens_checkpointed {
                    Ok(S::Migrating)
                } else {
                    Err(ViolationReason::MigratedUncheckpointedTokens {
                        claimed: migrated.tokens_generated,
                        checkpointed: self.tokens_checkpointed,
                    })
                }
            }
            _ => Err(ViolationReason::OutOfOrder),
        }
    }
}

impl RequestLifecycle {
    /// An event naming, as its decode worker, one that a migration took the request from.
    fn is_late_from_superseded_attempt(&self, body: &Body) -> bool {
        if self.superseded_decode_workers.is_empty() {
            return false;
        }
        let decode_worker_id = match body {
            Body::PrefillLocal(body) => &body.decode_worker_id,
            Body::PrefillQueued(body) => &body.decode_worker_id,
            Body::KvTransferred(body) => &body.to_worker_id,
            Body::DecodeStarted(body) => &body.decode_worker_id,
            Body::TokensDecoded(body) => &body.decode_worker_id,
            Body::Completed(body) => &body.decode_worker_id,
            // Not `Failed`: the scheduler's own `Failed` (a timeout) names the request's decode worker, which may
            // be the one it was migrated from, and must still end the request.
            _ => return false,
        };
        !decode_worker_id.is_empty() && self.superseded_decode_workers.contains(decode_worker_id)
    }

    /// A prefill worker's `PrefillDone` / `KvTransferred` landing after the decode worker already started decoding
    /// (or even finished): accepted once each, in that order, without changing the state.
    fn late_prefill_record(&self, body: &Body) -> Option<RequestState> {
        let decoding_or_done =
            matches!(self.state, RequestState::Decoding | RequestState::Completed);
        if !self.remote_prefill.queued || !decoding_or_done || self.prefill_attempt == 0 {
            return None;
        }
        match body {
            Body::PrefillDone(_) if !self.remote_prefill.done_recorded => Some(self.state),
            Body::KvTransferred(_)
                if self.remote_prefill.done_recorded && !self.remote_prefill.transfer_recorded =>
            {
                Some(self.state)
            }
            _ => None,
        }
    }
}

/// Events that the pipeline emits on its own after a request is handed on: they may still land after the gateway
/// appended `Cancelled`, since the workers learn of the cancellation through the log.
fn is_pipeline_work(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Routed
            | EventKind::PrefillLocal
            | EventKind::PrefillQueued
            | EventKind::PrefillStarted
            | EventKind::PrefillDone
            | EventKind::KvTransferred
            | EventKind::DecodeStarted
            | EventKind::TokensDecoded
            | EventKind::Completed
            | EventKind::Failed
    )
}

/// A stable fingerprint of an event body (kind and encoded fields).
fn fingerprint(body: &Body) -> u64 {
    let mut encoded = Vec::new();
    body.encode(&mut encoded);
    // `DefaultHasher::new()` uses fixed keys, so fingerprints are the same in every process.
    let mut hasher = DefaultHasher::new();
    body.kind().hash(&mut hasher);
    encoded.hash(&mut hasher);
    hasher.finish()
}

/// Runs a whole request's events through a fresh lifecycle, returning the final state or the first violation
/// together with the index of the event that caused it.
pub fn check_sequence<'a>(
    bodies: impl IntoIterator<Item = &'a Body>,
) -> Result<RequestState, (usize, LifecycleViolation)> {
    let mut lifecycle = RequestLifecycle::default();
    for (index, body) in bodies.into_iter().enumerate() {
        lifecycle
            .apply(body)
            .map_err(|violation| (index, violation))?;
    }
    Ok(lifecycle.state())
}
