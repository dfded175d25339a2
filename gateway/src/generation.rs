//! One request's life on the log and the token bus: subscribe to its tokens, append `Received`, read its token
//! updates (dropping token indices already sent), and append `Cancelled` when the client goes away or the deadline
//! passes. The gateway never detokenizes: the decode worker's text is passed on as it comes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tandem_events::log::{EventLog, StartAt};
use tandem_events::schema::{Cancelled, Received};
use tandem_events::tokens::{TokenBus, TokenLogprob, TokenStream, TokenUpdate};
use tandem_events::{Body, Event, EventKind, subjects};
use tokio::time::Instant;

use crate::errors::ApiError;
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

/// Submits a request: subscribes to its tokens first (so no update is missed), then appends `Received`.
pub async fn submit(
    backplane: &Backplane,
    request: &GenerateRequest,
    deadline: Instant,
) -> Result<Generation, ApiError> {
    let request_id = ulid::Ulid::new().to_string();
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
    );
    // Armed before the append: a client gone while the append is in flight still cancels what it started.
    let mut guard = CancelOnDrop {
        log: Arc::clone(&backplane.log),
        request_id: request_id.clone(),
        gateway_id: backplane.gateway_id.clone(),
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
        request_id,
        updates,
        tracker: IndexTracker::default(),
        deadline,
        request_timeout: backplane.request_timeout,
        guard,
        finished: false,
        received_sequence,
        ended_seen_on_the_log: false,
        _prompt_release: prompt_release,
    })
}

/// A submitted request whose tokens are being read. Dropped before its last update (the client went away), it
/// appends `Cancelled{reason: "client_disconnected"}`.
pub struct Generation {
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
    /// Deletes the stored prompt (redacted logs) when the request ends here.
    _prompt_release: Option<PromptRelease>,
}

/// With no update for this long, the log is asked whether the request already ended (its last updates lost).
const STALL_CHECK: Duration = Duration::from_secs(3);

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
            let wait_until = self.deadline.min(Instant::now() + STALL_CHECK);
            let update = match tokio::time::timeout_at(wait_until, self.updates.next()).await {
                Err(_elapsed) if Instant::now() < self.deadline => {
                    let log = Arc::clone(&self.guard.log);
                    let ended =
                        ended_on_the_log(log, &self.request_id, self.received_sequence).await;
                    // Failed only at the second look in a row: a last update slower than the terminal event
                    // still comes through.
                    if let Some(ended) = ended
                        && std::mem::replace(&mut self.ended_seen_on_the_log, true)
                    {
                        self.finish();
                        return Err(ApiError::generation_failed(&ended));
                    }
                    continue;
                }
                Err(_elapsed) => {
                    self.cancel("deadline").await;
                    return Err(ApiError::deadline(self.request_timeout.as_secs()));
                }
                Ok(None) => {
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
                    self.finish();
                    return Err(ApiError::generation_failed(&reason));
                }
                Accepted::Lost { expected, got } => {
                    tracing::warn!(request_id = %self.request_id, expected, got, "token updates were lost on the token bus");
                    self.cancel("token_updates_lost").await;
                    return Err(ApiError::generation_failed(&format!(
                        "the updates for tokens {expected}..{got} were lost on the way from the decode worker (the \
                         message bus was unavailable); the request was stopped rather than send incomplete text"
                    )));
                }
                Accepted::Progress(progress) => {
                    if let Some(finish_reason) = &progress.finish_reason {
                        tracing::debug!(
                            request_id = %self.request_id,
                            completion_tokens = self.tracker.next_index,
                            %finish_reason,
                            "request finished"
                        );
                        self.finish();
                    }
                    return Ok(Some(progress));
                }
            }
        }
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
            reason,
        )
        .await
        {
            tracing::warn!(request_id = %self.request_id, %error, reason, "could not append Cancelled");
        }
    }
}

async fn append_cancelled(
    log: &dyn EventLog,
    request_id: &str,
    gateway_id: &str,
    reason: &str,
) -> Result<(), tandem_events::log::LogError> {
    let event = Event::new(
        request_id,
        gateway_id,
        Body::Cancelled(Cancelled {
            reason: reason.to_string(),
        }),
    );
    // Occurrence 1: a request is cancelled at most once; a racing second append is dropped as a duplicate.
    log.append_event(&event, 1).await.map(|_ack| ())
}

/// Appends `Cancelled{client_disconnected}` when dropped while armed: the handler future or the SSE body is
/// dropped by the server when the client's connection goes away.
struct CancelOnDrop {
    log: Arc<dyn EventLog>,
    request_id: String,
    gateway_id: String,
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
        tracing::debug!(%request_id, "client disconnected; cancelling");
        runtime.spawn(async move {
            if let Err(error) = append_cancelled(
                log.as_ref(),
                &request_id,
                &gateway_id,
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
async fn ended_on_the_log(
    log: Arc<dyn EventLog>,
    request_id: &str,
    received_sequence: u64,
) -> Option<String> {
    let subjects: Vec<String> = [
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Cancelled,
    ]
    .into_iter()
    .filter_map(|kind| subjects::event_subject(kind, request_id).ok())
    .collect();
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
    Some(match event.body() {
        Body::Failed(failed) => failed.message.clone(),
        Body::Cancelled(cancelled) => format!("the request was cancelled ({})", cancelled.reason),
        _ => "the request completed, but its last tokens were lost on the way from the decode worker (the \
              message bus was unavailable)"
            .to_string(),
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
}
