//! One request's life on the log and the token bus: subscribe to its tokens, append `Received`, read its token
//! updates (dropping token indices already sent), and append `Cancelled` when the client goes away or the deadline
//! passes. The gateway never detokenizes: the decode worker's text is passed on as it comes. When updates are lost on
//! the token bus (it keeps nothing while nats-server restarts), the stream is finished from the request's
//! `TokensDecoded` checkpoints on the log, which carry the same tokens and text.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tandem_events::log::{EventLog, StartAt};
use tandem_events::schema::{Cancelled, Received, TokensDecoded, TraceContext};
use tandem_events::tokens::{TokenBus, TokenLogprob, TokenStream, TokenUpdate};
use tandem_events::{Body, Event, EventKind, subjects};
use tokio::time::Instant;

use crate::errors::ApiError;
use crate::observe::{FailureReason, RequestMetrics};
use crate::prompt_log::{PromptLogging, PromptRelease, PromptStore};
use crate::validation::GenerateRequest;

/// What every request needs to reach the rest of tandem.
#[derive(Clone)]
pub struct Backplane {
    pub log: Arc<dyn EventLog>,
    pub tokens: Arc<dyn TokenBus>,
    pub gateway_id: String,
    pub request_timeout: Duration,
    /// What `Received` carries of the prompt; the rest goes to `prompt_store` while the request runs.
    pub prompt_logging: PromptLogging,
    pub prompt_store: Arc<PromptStore>,
}

/// New tokens of a request, as the client is to see them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last progress: `stop` or `length`.
    pub finish_reason: Option<String>,
}

/// The prompt's fingerprint in `Received`: SHA-256 of the token ids as little-endian u32 bytes.
pub fn prompt_sha256(prompt_token_ids: &[u32]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for id in prompt_token_ids {
        hasher.update(id.to_le_bytes());
    }
    hasher.finalize().to_vec()
}

/// Submits a request: subscribes to its tokens first (so no update is missed), then appends `Received`, which
/// carries the trace context of `span` (the request's `gateway.request` span) to the other roles.
pub async fn submit(
    backplane: &Backplane,
    request: &GenerateRequest,
    deadline: Instant,
    span: tracing::Span,
) -> Result<Generation, ApiError> {
    let request_id = ulid::Ulid::new().to_string();
    span.record("request_id", request_id.as_str());
    span.record("prompt_tokens", request.prompt_tokens());
    let updates = backplane
        .tokens
        .subscribe(&request_id)
        .await
        .map_err(|error| ApiError::unavailable(format!("The token bus is unavailable: {error}")))?;
    // A prompt kept off the log is stored first, so that the worker the request is routed to finds it.
    let prompt_release = match backplane.prompt_logging {
        PromptLogging::Full => None,
        PromptLogging::Hash | PromptLogging::None => Some(
            backplane
                .prompt_store
                .put(&request_id, &request.prompt_token_ids)
                .await?,
        ),
    };
    let (prompt_token_ids, prompt_fingerprint) = match backplane.prompt_logging {
        PromptLogging::Full => (
            request.prompt_token_ids.clone(),
            prompt_sha256(&request.prompt_token_ids),
        ),
        PromptLogging::Hash => (Vec::new(), prompt_sha256(&request.prompt_token_ids)),
        PromptLogging::None => (Vec::new(), Vec::new()),
    };
    let received = Received {
        model: request.model.clone(),
        prompt_token_ids,
        prompt_tokens: request.prompt_tokens(),
        prompt_sha256: prompt_fingerprint,
        sampling: Some(request.sampling.clone()),
        gateway_id: backplane.gateway_id.clone(),
        stream: request.stream,
        endpoint: request.endpoint.as_str().to_string(),
    };
    let event = Event::new(
        request_id.clone(),
        backplane.gateway_id.clone(),
        Body::Received(received),
    )
    .with_trace_of(&span);
    // Armed before the append: a client gone while the append is in flight still cancels what it started.
    let mut guard = CancelOnDrop {
        log: Arc::clone(&backplane.log),
        request_id: request_id.clone(),
        gateway_id: backplane.gateway_id.clone(),
        trace: event.trace().cloned(),
        armed: true,
    };
    let received_sequence =
        match tokio::time::timeout_at(deadline, backplane.log.append_event(&event, 1)).await {
            Ok(Ok(ack)) => ack.sequence,
            Ok(Err(error)) => {
                guard.armed = false;
                return Err(ApiError::unavailable(format!(
                    "The event log is unavailable, the request was not accepted: {error}"
                )));
            }
            Err(_elapsed) => {
                guard.armed = false;
                return Err(ApiError::deadline(backplane.request_timeout.as_secs()));
            }
        };
    tracing::debug!(%request_id, prompt_tokens = request.prompt_tokens(), "request received");
    Ok(Generation {
        metrics: RequestMetrics::accepted(request.prompt_tokens()),
        span,
        request_id,
        updates,
        tracker: IndexTracker::default(),
        deadline,
        request_timeout: backplane.request_timeout,
        guard,
        finished: false,
        received_sequence,
        ended_seen_on_the_log: false,
        // Checkpoints carry each token's sampled logprob but not the alternatives a client asked for.
        recoverable: request.sampling.logprobs.is_none(),
        following_the_log: false,
        short_completion_reads: 0,
        last_log_read: None,
        _prompt_release: prompt_release,
    })
}

/// A submitted request whose tokens are being read. Dropped before its last update (the client went away), it
/// appends `Cancelled{reason: "client_disconnected"}`.
pub struct Generation {
    /// Declared before `guard`: a client gone counts as cancelled, and the span closes after the last token.
    metrics: RequestMetrics,
    span: tracing::Span,
    request_id: String,
    updates: TokenStream,
    tracker: IndexTracker,
    deadline: Instant,
    request_timeout: Duration,
    guard: CancelOnDrop,
    finished: bool,
    /// Where the request's `Received` is on the log: its terminal event, if any, comes after.
    received_sequence: u64,
    /// A stall check found the request's terminal event on the log.
    ended_seen_on_the_log: bool,
    /// Whether the log's checkpoints hold all the client needs (not so when it asked for logprobs).
    recoverable: bool,
    /// Updates were lost: the tokens come from the log's checkpoints (and from updates that still fit).
    following_the_log: bool,
    /// Reads of the log that found `Completed` before checkpoints of all its tokens.
    short_completion_reads: u32,
    /// When the log was last read for checkpoints (at most once per `LOG_POLL`, however fast updates come).
    last_log_read: Option<Instant>,
    /// Deletes the stored prompt (redacted logs) when the request ends here.
    _prompt_release: Option<PromptRelease>,
}

/// With no update for this long, the log is asked whether the request already ended (its last updates lost).
const STALL_CHECK: Duration = Duration::from_secs(3);

/// While following the log, how often it is read for new checkpoints.
const LOG_POLL: Duration = Duration::from_millis(250);

/// Reads of a `Completed` whose tokens are not all checkpointed before the stream gives up: the last checkpoint
/// is appended before `Completed`, so only a checkpoint still in flight can be missing.
const MAX_SHORT_COMPLETION_READS: u32 = 8;

/// The most events of one request read back when following the log (a checkpoint holds 16 tokens).
const MAX_REQUEST_EVENTS: usize = 100_000;

impl Generation {
    /// The request id (a ULID), also the suffix of the response id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Distinct generated tokens received so far.
    pub fn completion_tokens(&self) -> u32 {
        self.tracker.next_index
    }

    /// Everything until the end, for a non-streamed answer.
    pub async fn collect(&mut self) -> Result<Progress, ApiError> {
        let mut whole = Progress {
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: None,
        };
        while let Some(progress) = self.next().await? {
            whole.token_ids.extend(progress.token_ids);
            whole.text.push_str(&progress.text);
            whole.logprobs.extend(progress.logprobs);
            if progress.finish_reason.is_some() {
                whole.finish_reason = progress.finish_reason;
            }
        }
        Ok(whole)
    }

    /// The next new tokens; `None` after the last. An error ends the request (the worker failed, the deadline
    /// passed, or the token stream closed).
    pub async fn next(&mut self) -> Result<Option<Progress>, ApiError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let log_read_due = self
                .last_log_read
                .is_none_or(|last_read| last_read.elapsed() >= LOG_POLL);
            if self.following_the_log
                && log_read_due
                && let Some(progress) = self.catch_up_from_the_log().await?
            {
                self.delivered(&progress);
                return Ok(Some(progress));
            }
            let wait = if self.following_the_log {
                LOG_POLL
            } else {
                STALL_CHECK
            };
            let wait_until = self.deadline.min(Instant::now() + wait);
            let update = match tokio::time::timeout_at(wait_until, self.updates.next()).await {
                Err(_elapsed) if Instant::now() < self.deadline => {
                    if !self.following_the_log {
                        self.check_for_a_stall().await?;
                    }
                    continue;
                }
                Err(_elapsed) => {
                    self.metrics.failed(FailureReason::Deadline);
                    self.cancel("deadline").await;
                    return Err(ApiError::deadline(self.request_timeout.as_secs()));
                }
                Ok(None) if self.following_the_log => {
                    // The log has the rest; nothing more will come this way.
                    self.updates = Box::pin(futures::stream::pending());
                    continue;
                }
                Ok(None) => {
                    self.metrics.failed(FailureReason::Unavailable);
                    self.cancel("token_stream_closed").await;
                    return Err(ApiError::unavailable(
                        "The token stream of this request closed before it finished.",
                    ));
                }
                Ok(Some(update)) => update,
            };
            match self.tracker.accept(update) {
                Accepted::Nothing => continue,
                Accepted::Failed(reason) => {
                    // The worker recorded the failure on the log; nothing to cancel.
                    self.metrics.failed(FailureReason::Failed);
                    self.finish();
                    return Err(ApiError::generation_failed(&reason));
                }
                // Already filling the gap from the log; this update is used once the gap is closed.
                Accepted::Lost { .. } if self.following_the_log => continue,
                Accepted::Lost { expected, got } if self.recoverable => {
                    tracing::warn!(request_id = %self.request_id, expected, got, "token updates were lost on the token bus; following the request on the log");
                    self.following_the_log = true;
                }
                Accepted::Lost { expected, got } => {
                    tracing::warn!(request_id = %self.request_id, expected, got, "token updates were lost on the token bus");
                    self.metrics.failed(FailureReason::TokensLost);
                    self.cancel("token_updates_lost").await;
                    return Err(ApiError::generation_failed(&format!(
                        "the updates for tokens {expected}..{got} were lost on the way from the decode worker (the \
                         message bus was unavailable), and the log cannot replace the logprobs asked for; the \
                         request was stopped rather than send incomplete output"
                    )));
                }
                Accepted::Progress(progress) => {
                    self.delivered(&progress);
                    return Ok(Some(progress));
                }
            }
        }
    }

    /// Counts tokens about to reach the client and, on the last, closes the request.
    fn delivered(&mut self, progress: &Progress) {
        self.metrics.tokens(progress.token_ids.len());
        if let Some(finish_reason) = &progress.finish_reason {
            self.metrics.succeeded(finish_reason);
            self.span
                .record("completion_tokens", self.tracker.next_index);
            self.span.record("finish_reason", finish_reason.as_str());
            tracing::debug!(
                request_id = %self.request_id,
                completion_tokens = self.tracker.next_index,
                %finish_reason,
                "request finished"
            );
            self.finish();
        }
    }

    /// No update for a while: has the request ended on the log with its last updates lost? A completed request is
    /// then finished from the log; a failed or cancelled one ends in its error at the second look in a row (a last
    /// update slower than the terminal event still comes through).
    async fn check_for_a_stall(&mut self) -> Result<(), ApiError> {
        let log = Arc::clone(&self.guard.log);
        let Some(ended) = ended_on_the_log(log, &self.request_id, self.received_sequence).await
        else {
            return Ok(());
        };
        if ended.kind == EventKind::Completed && self.recoverable {
            self.following_the_log = true;
            return Ok(());
        }
        if std::mem::replace(&mut self.ended_seen_on_the_log, true) {
            self.metrics.failed(FailureReason::Failed);
            self.finish();
            return Err(ApiError::generation_failed(&ended.message));
        }
        Ok(())
    }

    /// Feeds the request's checkpoints on the log to the tracker and returns what they add, with the finish
    /// reason once the log shows the request completed and every one of its tokens is accounted for.
    async fn catch_up_from_the_log(&mut self) -> Result<Option<Progress>, ApiError> {
        self.last_log_read = Some(Instant::now());
        let subjects = request_subjects(
            &self.request_id,
            [EventKind::TokensDecoded].iter().chain(&TERMINAL_KINDS),
        );
        let read = self
            .guard
            .log
            .read(
                StartAt::Sequence(self.received_sequence),
                &subjects,
                MAX_REQUEST_EVENTS,
            )
            .await;
        let messages = match read {
            Ok(messages) => messages,
            Err(error) => {
                // The log is still coming back; the next poll tries again (the deadline bounds it all).
                tracing::debug!(request_id = %self.request_id, %error, "could not read the request's checkpoints");
                return Ok(None);
            }
        };
        let mut checkpoints: Vec<TokensDecoded> = Vec::new();
        let mut end: Option<Body> = None;
        for message in &messages {
            let event = match message.event() {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(request_id = %self.request_id, sequence = message.sequence, %error, "malformed event skipped");
                    continue;
                }
            };
            match event.body() {
                Body::TokensDecoded(checkpoint) => checkpoints.push(checkpoint.clone()),
                body @ (Body::Completed(_) | Body::Failed(_) | Body::Cancelled(_)) => {
                    end.get_or_insert_with(|| body.clone());
                }
                _ => {}
            }
        }
        // A superseded attempt's checkpoints repeat indices; the tracker drops what was sent.
        checkpoints.sort_by_key(|checkpoint| checkpoint.start_index);
        let mut added = Progress::default();
        for checkpoint in checkpoints {
            let Some(text) = checkpoint.text else {
                self.metrics.failed(FailureReason::TokensLost);
                self.cancel("token_updates_lost").await;
                return Err(ApiError::generation_failed(
                    "token updates were lost on the way from the decode worker, and its checkpoints on the log \
                     carry no text to replace them (an older worker); the request was stopped rather than send \
                     incomplete text",
                ));
            };
            let update = TokenUpdate {
                start_index: checkpoint.start_index,
                token_ids: checkpoint.token_ids,
                text,
                ..TokenUpdate::default()
            };
            match self.tracker.accept(update) {
                Accepted::Progress(progress) => {
                    added.token_ids.extend(progress.token_ids);
                    added.text.push_str(&progress.text);
                }
                Accepted::Nothing | Accepted::Failed(_) => {}
                // Tokens past a checkpoint not on the log yet: the next read gets further.
                Accepted::Lost { .. } => break,
            }
        }
        match end {
            Some(Body::Completed(completed)) => {
                if self.tracker.next_index >= completed.completion_tokens {
                    added.finish_reason = Some(completed.finish_reason);
                } else {
                    self.short_completion_reads += 1;
                    if self.short_completion_reads >= MAX_SHORT_COMPLETION_READS {
                        self.metrics.failed(FailureReason::TokensLost);
                        self.finish();
                        return Err(ApiError::generation_failed(&format!(
                            "the request completed with {} tokens, but only {} reached the gateway or the log's \
                             checkpoints",
                            completed.completion_tokens, self.tracker.next_index
                        )));
                    }
                }
            }
            Some(Body::Failed(failed)) => {
                self.metrics.failed(FailureReason::Failed);
                self.finish();
                return Err(ApiError::generation_failed(&failed.message));
            }
            Some(Body::Cancelled(cancelled)) => {
                self.metrics.failed(FailureReason::Cancelled);
                self.finish();
                return Err(ApiError::generation_failed(&format!(
                    "the request was cancelled ({})",
                    cancelled.reason
                )));
            }
            _ => {}
        }
        let nothing_new =
            added.token_ids.is_empty() && added.text.is_empty() && added.finish_reason.is_none();
        Ok((!nothing_new).then_some(added))
    }

    fn finish(&mut self) {
        self.finished = true;
        self.guard.armed = false;
    }

    async fn cancel(&mut self, reason: &str) {
        self.finish();
        if let Err(error) = append_cancelled(
            self.guard.log.as_ref(),
            &self.request_id,
            &self.guard.gateway_id,
            self.guard.trace.clone(),
            reason,
        )
        .await
        {
            tracing::warn!(request_id = %self.request_id, %error, reason, "could not append Cancelled");
        }
    }
}

/// Appends the request's `Cancelled`, in the request's trace (`trace`: what its `Received` carried).
async fn append_cancelled(
    log: &dyn EventLog,
    request_id: &str,
    gateway_id: &str,
    trace: Option<TraceContext>,
    reason: &str,
) -> Result<(), tandem_events::log::LogError> {
    let event = Event::new(
        request_id,
        gateway_id,
        Body::Cancelled(Cancelled {
            reason: reason.to_string(),
        }),
    )
    .with_trace_context(trace);
    // Occurrence 1: a request is cancelled at most once; a racing second append is dropped as a duplicate.
    log.append_event(&event, 1).await.map(|_ack| ())
}

/// Appends `Cancelled{client_disconnected}` when dropped while armed: the handler future or the SSE body is
/// dropped by the server when the client's connection goes away.
struct CancelOnDrop {
    log: Arc<dyn EventLog>,
    request_id: String,
    gateway_id: String,
    /// The trace context the request's `Received` carried, for its `Cancelled`.
    trace: Option<TraceContext>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(request_id = %self.request_id, "client left during shutdown; Cancelled not appended");
            return;
        };
        let log = Arc::clone(&self.log);
        let request_id = std::mem::take(&mut self.request_id);
        let gateway_id = std::mem::take(&mut self.gateway_id);
        let trace = self.trace.take();
        tracing::debug!(%request_id, "client disconnected; cancelling");
        runtime.spawn(async move {
            if let Err(error) = append_cancelled(
                log.as_ref(),
                &request_id,
                &gateway_id,
                trace,
                "client_disconnected",
            )
            .await
            {
                tracing::warn!(%request_id, %error, "could not append Cancelled");
            }
        });
    }
}

/// Whether the log already holds the request's end although its last updates never came (the token bus lost
/// them): then the stream cannot finish, and the answer is an error naming what the log says.
/// The kinds that end a request on the log.
const TERMINAL_KINDS: [EventKind; 3] = [
    EventKind::Completed,
    EventKind::Failed,
    EventKind::Cancelled,
];

/// The log subjects of `kinds` of events about request `request_id` (a ULID, always a valid subject token).
fn request_subjects<'a>(
    request_id: &str,
    kinds: impl IntoIterator<Item = &'a EventKind>,
) -> Vec<String> {
    kinds
        .into_iter()
        .filter_map(|&kind| subjects::event_subject(kind, request_id).ok())
        .collect()
}

/// A request's end as the log holds it.
struct Ended {
    kind: EventKind,
    /// What to tell the client, should the stream end in an error.
    message: String,
}

async fn ended_on_the_log(
    log: Arc<dyn EventLog>,
    request_id: &str,
    received_sequence: u64,
) -> Option<Ended> {
    let subjects = request_subjects(request_id, &TERMINAL_KINDS);
    let found = log
        .read(StartAt::Sequence(received_sequence), &subjects, 1)
        .await;
    let message = match found {
        Ok(messages) => messages.into_iter().next()?,
        Err(error) => {
            tracing::debug!(request_id = %request_id, %error, "could not look for the request's end on the log");
            return None;
        }
    };
    let event = message.event().ok()?;
    tracing::warn!(request_id = %request_id, kind = %event.kind(), "the request ended on the log but its last token updates never came");
    let message = match event.body() {
        Body::Failed(failed) => failed.message.clone(),
        Body::Cancelled(cancelled) => format!("the request was cancelled ({})", cancelled.reason),
        _ => "the request completed, but its last tokens were lost on the way from the decode worker (the \
              message bus was unavailable)"
            .to_string(),
    };
    Some(Ended {
        kind: event.kind(),
        message,
    })
}

/// What one token update adds.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Only tokens already sent, and not the last update.
    Nothing,
    Progress(Progress),
    Failed(String),
    /// Updates between the last index sent and this one never came (the token bus dropped them, e.g. while
    /// nats-server restarted): passing on what came would give the client wrong text, so the request ends with
    /// an error instead. Its tokens are still recorded on the log.
    Lost {
        expected: u32,
        got: u32,
    },
}

/// Keeps the index of the next generated token the client has not seen. After a migration the new decode worker
/// sends tokens again from the last checkpoint: those indices are dropped, and their text, which the old worker's
/// updates already carried, is cut from the front of the overlapping update when it matches.
#[derive(Debug, Clone, Default)]
pub struct IndexTracker {
    next_index: u32,
    /// Text sent so far, and at which byte of it each update's first token began.
    sent_text: String,
    boundaries: Vec<(u32, usize)>,
}

impl IndexTracker {
    pub fn accept(&mut self, update: TokenUpdate) -> Accepted {
        if let Some(error) = update.error {
            return Accepted::Failed(error);
        }
        let TokenUpdate {
            start_index,
            mut token_ids,
            mut text,
            mut logprobs,
            finish_reason,
            ..
        } = update;
        let count = u32::try_from(token_ids.len()).unwrap_or(u32::MAX);
        let end_index = start_index.saturating_add(count);
        if start_index > self.next_index {
            return Accepted::Lost {
                expected: self.next_index,
                got: start_index,
            };
        }
        let already_sent = self.next_index.saturating_sub(start_index).min(count) as usize;
        if already_sent > 0 {
            token_ids.drain(..already_sent);
            logprobs.drain(..already_sent.min(logprobs.len()));
            text = if token_ids.is_empty() {
                String::new()
            } else {
                self.cut_resent_text(start_index, text)
            };
        }
        if token_ids.is_empty() && text.is_empty() && finish_reason.is_none() {
            return Accepted::Nothing;
        }
        if !token_ids.is_empty() || !text.is_empty() {
            self.boundaries
                .push((self.next_index.max(start_index), self.sent_text.len()));
            self.sent_text.push_str(&text);
            self.next_index = self.next_index.max(end_index);
        }
        Accepted::Progress(Progress {
            token_ids,
            text,
            logprobs,
            finish_reason,
        })
    }

    /// Cuts from `text` (which starts at token `start_index`) what was already sent for tokens before
    /// `next_index`, when that is known and matches.
    fn cut_resent_text(&self, start_index: u32, text: String) -> String {
        let Some(&(_, offset)) = self
            .boundaries
            .iter()
            .find(|(index, _)| *index == start_index)
        else {
            tracing::warn!(
                start_index,
                "re-sent tokens do not start at an update boundary; text kept"
            );
            return text;
        };
        let already = &self.sent_text[offset..];
        match text.strip_prefix(already) {
            Some(rest) => rest.to_string(),
            None => {
                tracing::warn!(
                    start_index,
                    "re-sent text differs from what was sent; text kept"
                );
                text
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(start_index: u32, ids: &[u32], text: &str) -> TokenUpdate {
        TokenUpdate {
            start_index,
            token_ids: ids.to_vec(),
            text: text.to_string(),
            ..Default::default()
        }
    }

    fn text_of(accepted: Accepted) -> Option<String> {
        match accepted {
            Accepted::Progress(progress) => Some(progress.text),
            _ => None,
        }
    }

    #[test]
    fn resent_tokens_after_a_migration_are_dropped() {
        let mut tracker = IndexTracker::default();
        assert_eq!(
            text_of(tracker.accept(update(0, &[1, 2], "ab"))),
            Some("ab".into())
        );
        assert_eq!(
            text_of(tracker.accept(update(2, &[3], "c"))),
            Some("c".into())
        );
        // The new worker starts again at the checkpoint (index 0): everything already sent.
        assert_eq!(tracker.accept(update(0, &[1, 2], "ab")), Accepted::Nothing);
        // Overlapping update: tokens 2 and 3, of which 2 was sent with text "c".
        match tracker.accept(update(2, &[3, 4], "cd")) {
            Accepted::Progress(progress) => {
                assert_eq!(progress.token_ids, vec![4]);
                assert_eq!(progress.text, "d");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(tracker.next_index, 4);
        // The last update always comes through, even with nothing new.
        let mut last = update(3, &[4], "d");
        last.finish_reason = Some("length".into());
        match tracker.accept(last) {
            Accepted::Progress(progress) => {
                assert!(progress.token_ids.is_empty());
                assert_eq!(progress.text, "");
                assert_eq!(progress.finish_reason.as_deref(), Some("length"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_gap_in_the_updates_is_reported_not_passed_on() {
        let mut tracker = IndexTracker::default();
        assert_eq!(
            text_of(tracker.accept(update(0, &[1, 2], "ab"))),
            Some("ab".into())
        );
        assert_eq!(
            tracker.accept(update(4, &[5], "e")),
            Accepted::Lost {
                expected: 2,
                got: 4
            }
        );
    }

    #[test]
    fn prompt_fingerprint_hashes_little_endian_ids() {
        let digest = prompt_sha256(&[1, 256]);
        let expected = Sha256::digest([1u8, 0, 0, 0, 0, 1, 0, 0]).to_vec();
        assert_eq!(digest, expected);
    }

    /// A client gone mid-request: the `Cancelled` the gateway appends stays in the request's trace.
    #[tokio::test]
    async fn a_client_gone_is_cancelled_in_the_request_trace() {
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(tandem_events::log::embedded::EmbeddedLog::open(dir.path()).unwrap());
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=1".into(),
        };
        drop(CancelOnDrop {
            log: Arc::clone(&log),
            request_id: "req-gone".into(),
            gateway_id: "gateway-test".into(),
            trace: Some(trace.clone()),
            armed: true,
        });
        // The append runs on a task the drop spawned.
        let deadline = Instant::now() + Duration::from_secs(10);
        let cancelled = loop {
            let messages = log.read(StartAt::Beginning, &[], 10).await.unwrap();
            if let Some(message) = messages.first() {
                break message.event().unwrap();
            }
            assert!(Instant::now() < deadline, "no Cancelled appended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(cancelled.id(), "req-gone");
        let Body::Cancelled(body) = cancelled.body() else {
            panic!("{cancelled:?}");
        };
        assert_eq!(body.reason, "client_disconnected");
        assert_eq!(cancelled.trace(), Some(&trace));
    }
}
