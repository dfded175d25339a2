//! `replay timeline ID`: one request's events in order, with wall times, the gaps between them, the durations of
//! its phases, the workers involved, routing decisions with their scores, migrations and prefill redeliveries, and
//! a Gantt-style SVG of the phases. Each event is also run through the lifecycle, so an illegal step shows where it
//! happened.

use serde::Serialize;
use tandem_events::lifecycle::{self, RequestLifecycle};
use tandem_events::log::LogMessage;
use tandem_events::schema::Body;
use tandem_events::subjects::{EVENT_PREFIX, event_subject};
use tandem_events::{Event, EventKind};

use crate::ReplayError;
use crate::phases::{PhaseDurations, RequestPhases};
use crate::source::{Progress, ReadRange, Source};
use crate::text::{Table, bytes, duration, maybe_duration, wall_time};

/// How far before the time in a request's ULID its events may lie: the gateway's clock and the log's may differ.
const ULID_CLOCK_SLACK_NS: u64 = 60 * 1_000_000_000;

/// One event as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEvent {
    pub sequence: u64,
    /// The emitter's wall-clock time.
    pub at: String,
    pub at_ns: u64,
    /// Since the request's first event.
    pub offset_ns: u64,
    /// Since the previous event.
    pub gap_ns: u64,
    pub kind: String,
    pub emitter: String,
    pub detail: String,
    /// Empty when the lifecycle accepted it as a step; `repeat`, `after cancellation`, or the violation otherwise.
    pub lifecycle: String,
}

/// A bar of the Gantt picture: one phase of one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseSpan {
    /// `route`, `queue wait`, `prefill`, `kv transfer` or `decode`.
    pub lane: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
    pub label: String,
    /// Still open when the log ends.
    pub open: bool,
}

/// One candidate's score in a routing decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub worker_id: String,
    pub overlap_blocks: u32,
    pub prefill_blocks: u32,
    pub active_decode_blocks: u32,
    pub cost: f64,
}

/// A routing decision as `Routed` recorded it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    pub attempt: u32,
    pub at: String,
    pub decode_worker_id: String,
    pub policy: String,
    pub reason: String,
    pub scores: Vec<Score>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migration {
    pub at: String,
    pub from_worker_id: String,
    pub reason: String,
    pub tokens_generated: u32,
}

/// The per-token gaps between checkpoints: each checkpoint's time since the previous one (or since decoding
/// started) divided by its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenGaps {
    pub checkpoints: usize,
    pub tokens: u32,
    pub min_ns: u64,
    pub median_ns: u64,
    pub max_ns: u64,
}

/// A request's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    pub request_id: String,
    pub source: String,
    pub state: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub workers: Vec<String>,
    pub events: Vec<TimelineEvent>,
    pub durations: PhaseDurations,
    pub spans: Vec<PhaseSpan>,
    pub routings: Vec<Routing>,
    pub migrations: Vec<Migration>,
    /// Highest prefill delivery attempt (above 1: redelivered).
    pub prefill_attempts: u32,
    pub token_gaps: Option<TokenGaps>,
    /// Events the lifecycle refused.
    pub violations: usize,
    /// Payloads on this request's subjects that do not decode.
    pub malformed: usize,
}

/// Reads the messages of one request: its own subjects, plus `Routed` (which is filed under the decode worker)
/// filtered by the id in the envelope. Starts a minute before the time in the id when it is a ULID.
pub async fn read_request(
    source: &Source,
    request_id: &str,
    progress: &mut Progress,
) -> Result<Vec<LogMessage>, ReplayError> {
    let mut subjects = Vec::new();
    for kind in EventKind::ALL {
        if kind.is_worker_event() || kind == EventKind::Routed {
            continue;
        }
        subjects.push(
            event_subject(kind, request_id).map_err(|error| ReplayError::Invalid {
                what: "request id",
                reason: error.to_string(),
            })?,
        );
    }
    subjects.push(format!("{EVENT_PREFIX}.{}.>", EventKind::Routed.as_str()));
    let since_ns = ulid::Ulid::from_string(request_id)
        .ok()
        .map(|ulid| (ulid.timestamp_ms() * 1_000_000).saturating_sub(ULID_CLOCK_SLACK_NS));
    let range = ReadRange {
        since_ns,
        subjects,
        ..ReadRange::default()
    };
    let mut messages = Vec::new();
    let routed_prefix = format!("{EVENT_PREFIX}.{}.", EventKind::Routed.as_str());
    source
        .scan(&range, progress, |message| {
            let ours = if message.subject.starts_with(&routed_prefix) {
                message.event().is_ok_and(|event| event.id() == request_id)
            } else {
                true
            };
            if ours {
                messages.push(message.clone());
            }
            Ok(())
        })
        .await?;
    if messages.is_empty() {
        return Err(ReplayError::RequestNotFound {
            request_id: request_id.to_string(),
            hint: format!(" ({})", source.description()),
        });
    }
    Ok(messages)
}

/// On a redacted log (`--log-prompts hash|none`), what is there of the prompt instead of its ids.
fn redaction_note(received: &tandem_events::schema::Received) -> String {
    if !tandem_events::prompts::prompt_is_redacted(received) {
        return String::new();
    }
    if received.prompt_sha256.is_empty() {
        "; prompt not on the log (length only)".to_string()
    } else {
        let hex: String = received
            .prompt_sha256
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("; prompt not on the log, sha256 {hex}")
    }
}

fn describe(body: &Body) -> String {
    match body {
        Body::Received(received) => {
            let sampling = received.sampling.clone().unwrap_or_default();
            format!(
                "{} prompt tokens, max {} tokens, temperature {}{}, {} via {}",
                received.prompt_tokens,
                sampling.max_tokens,
                sampling.temperature,
                sampling
                    .seed
                    .map(|seed| format!(", seed {seed}"))
                    .unwrap_or_default(),
                if received.endpoint.is_empty() {
                    "request"
                } else {
                    &received.endpoint
                },
                received.gateway_id
            ) + &redaction_note(received)
        }
        Body::Routed(routed) => format!(
            "→ {} (attempt {}, {}{})",
            routed.decode_worker_id,
            routed.attempt,
            routed.policy,
            if routed.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", routed.reason)
            }
        ),
        Body::PrefillLocal(local) => {
            let decision = local.decision.clone().unwrap_or_default();
            format!(
                "{} prefills locally ({} tokens, {} cached, local limit {})",
                local.decode_worker_id,
                decision.prompt_tokens,
                decision.cached_tokens,
                decision.max_local_prefill_tokens
            )
        }
        Body::PrefillQueued(queued) => {
            let destination = queued.kv_destination.clone().unwrap_or_default();
            let decision = queued.decision.clone().unwrap_or_default();
            format!(
                "to the prefill queue (depth {}), KV into {} blocks of {}",
                decision.prefill_queue_depth,
                destination.block_ids.len(),
                queued.decode_worker_id
            )
        }
        Body::PrefillStarted(started) => format!(
            "{} takes it (delivery {}{})",
            started.prefill_worker_id,
            started.delivery_attempt,
            if started.delivery_attempt > 1 {
                ", REDELIVERED"
            } else {
                ""
            }
        ),
        Body::PrefillDone(done) => format!(
            "{} computed it in {}, first token {}",
            done.prefill_worker_id,
            duration(done.compute_ns),
            done.first_token_id
        ),
        Body::KvTransferred(transferred) => format!(
            "{} → {}: {} in {} blocks, {} over {}",
            transferred.from_worker_id,
            transferred.to_worker_id,
            bytes(transferred.bytes),
            transferred.blocks,
            duration(transferred.duration_ns),
            transferred.transport
        ),
        Body::DecodeStarted(started) => format!("{} starts decoding", started.decode_worker_id),
        Body::TokensDecoded(checkpoint) => format!(
            "tokens {}..{} on {}",
            checkpoint.start_index,
            checkpoint.start_index + checkpoint.token_ids.len() as u32,
            checkpoint.decode_worker_id
        ),
        Body::Migrated(migrated) => format!(
            "off {} ({}), keeping {} tokens",
            migrated.from_worker_id, migrated.reason, migrated.tokens_generated
        ),
        Body::Completed(completed) => format!(
            "{}, {} tokens, on {}",
            completed.finish_reason, completed.completion_tokens, completed.decode_worker_id
        ),
        Body::Failed(failed) => format!(
            "{}: {} (worker {})",
            failed.reason, failed.message, failed.worker_id
        ),
        Body::Cancelled(cancelled) => cancelled.reason.clone(),
        other => format!("worker event {}", other.kind()),
    }
}

/// Walks the events and cuts the phases into bars, attempt by attempt.
#[derive(Default)]
struct SpanBuilder {
    spans: Vec<PhaseSpan>,
    route_from: Option<u64>,
    queue_from: Option<u64>,
    prefill_from: Option<(u64, &'static str)>,
    decode_from: Option<u64>,
}

impl SpanBuilder {
    fn close(&mut self, lane: &'static str, start_ns: u64, end_ns: u64, label: &str) {
        self.spans.push(PhaseSpan {
            lane,
            start_ns,
            end_ns: end_ns.max(start_ns),
            label: format!("{label} {}", duration(end_ns.saturating_sub(start_ns))),
            open: false,
        });
    }

    fn observe(&mut self, event: &Event) {
        let at = event.timestamp_ns();
        match event.body() {
            Body::Received(_) => self.route_from = Some(at),
            Body::Routed(_) => {
                if let Some(from) = self.route_from.take() {
                    self.close("route", from, at, "route");
                }
            }
            Body::PrefillLocal(_) => self.prefill_from = Some((at, "local prefill")),
            Body::PrefillQueued(_) => self.queue_from = Some(at),
            Body::PrefillStarted(started) => {
                if let Some(from) = self.queue_from.take() {
                    self.close("queue wait", from, at, "queue");
                }
                if let Some((from, label)) = self.prefill_from.take() {
                    self.close("prefill", from, at, &format!("{label} (abandoned)"));
                }
                let label = if started.delivery_attempt > 1 {
                    "prefill (redelivered)"
                } else {
                    "prefill"
                };
                self.prefill_from = Some((at, label));
            }
            Body::PrefillDone(_) => {
                if let Some((from, label)) = self.prefill_from.take() {
                    self.close("prefill", from, at, label);
                }
            }
            Body::KvTransferred(transferred) => {
                let start = at.saturating_sub(transferred.duration_ns);
                self.close("kv transfer", start, at, "kv");
            }
            Body::DecodeStarted(_) => {
                if let Some((from, label)) = self.prefill_from.take()
                    && label == "local prefill"
                {
                    self.close("prefill", from, at, label);
                }
                self.decode_from = Some(at);
            }
            Body::Migrated(_) => {
                self.close_all(at, "(migrated)");
                self.route_from = Some(at);
            }
            Body::Completed(_) | Body::Failed(_) | Body::Cancelled(_) => {
                self.close_all(at, "");
            }
            _ => {}
        }
    }

    fn close_all(&mut self, at: u64, suffix: &str) {
        let with = |label: &str| {
            if suffix.is_empty() {
                label.to_string()
            } else {
                format!("{label} {suffix}")
            }
        };
        if let Some(from) = self.route_from.take() {
            self.close("route", from, at, &with("route"));
        }
        if let Some(from) = self.queue_from.take() {
            self.close("queue wait", from, at, &with("queue"));
        }
        if let Some((from, label)) = self.prefill_from.take() {
            self.close("prefill", from, at, &with(label));
        }
        if let Some(from) = self.decode_from.take() {
            self.close("decode", from, at, &with("decode"));
        }
    }

    /// Bars still open at the end of the log run to its last event, marked open.
    fn finish(mut self, last_at: u64) -> Vec<PhaseSpan> {
        let before = self.spans.len();
        self.close_all(last_at, "(still open)");
        for span in &mut self.spans[before..] {
            span.open = true;
        }
        self.spans
    }
}

impl Timeline {
    /// Builds the timeline from the request's messages (as [`read_request`] returns them), in sequence order.
    pub fn build(request_id: &str, source: &str, messages: &[LogMessage]) -> Timeline {
        let mut lifecycle = RequestLifecycle::default();
        let mut phases = RequestPhases::default();
        let mut spans = SpanBuilder::default();
        let mut events: Vec<TimelineEvent> = Vec::with_capacity(messages.len());
        let mut routings = Vec::new();
        let mut migrations = Vec::new();
        let mut checkpoint_gaps: Vec<u64> = Vec::new();
        let mut previous_checkpoint_at: Option<u64> = None;
        let (mut violations, mut malformed) = (0, 0);
        let (mut model, mut completion_tokens) = (String::new(), 0);
        let first_at = messages
            .iter()
            .filter_map(|message| message.event().ok())
            .map(|event| event.timestamp_ns())
            .min()
            .unwrap_or(0);
        let mut previous_at = first_at;
        let mut last_at = first_at;
        for message in messages {
            let event = match message.event() {
                Ok(event) => event,
                Err(error) => {
                    malformed += 1;
                    events.push(TimelineEvent {
                        sequence: message.sequence,
                        at: wall_time(message.stored_at_ns),
                        at_ns: message.stored_at_ns,
                        offset_ns: message.stored_at_ns.saturating_sub(first_at),
                        gap_ns: 0,
                        kind: "malformed".into(),
                        emitter: String::new(),
                        detail: format!("on {}", message.subject),
                        lifecycle: format!("does not decode: {error}"),
                    });
                    continue;
                }
            };
            let at = event.timestamp_ns();
            let verdict = match lifecycle.apply(event.body()) {
                Ok(lifecycle::Applied::Advanced(_)) => String::new(),
                // A repeat, or late work (after a cancellation, or of an attempt a migration superseded).
                Ok(other) => words(&format!("{other:?}")),
                Err(violation) => {
                    violations += 1;
                    format!("VIOLATION: {violation}")
                }
            };
            // Phases are cut from the steps the lifecycle took; repeats and late work change nothing.
            if verdict.is_empty() {
                phases.observe(&event);
                spans.observe(&event);
            }
            match event.body() {
                Body::Received(received) => model = received.model.clone(),
                Body::Routed(routed) => routings.push(Routing {
                    attempt: routed.attempt,
                    at: wall_time(at),
                    decode_worker_id: routed.decode_worker_id.clone(),
                    policy: routed.policy.clone(),
                    reason: routed.reason.clone(),
                    scores: routed
                        .scores
                        .iter()
                        .map(|score| Score {
                            worker_id: score.worker_id.clone(),
                            overlap_blocks: score.overlap_blocks,
                            prefill_blocks: score.prefill_blocks,
                            active_decode_blocks: score.active_decode_blocks,
                            cost: score.cost,
                        })
                        .collect(),
                }),
                Body::Migrated(migrated) => migrations.push(Migration {
                    at: wall_time(at),
                    from_worker_id: migrated.from_worker_id.clone(),
                    reason: migrated.reason.clone(),
                    tokens_generated: migrated.tokens_generated,
                }),
                Body::DecodeStarted(_) => previous_checkpoint_at = Some(at),
                Body::TokensDecoded(checkpoint) if !checkpoint.token_ids.is_empty() => {
                    if let Some(previous) = previous_checkpoint_at {
                        checkpoint_gaps
                            .push(at.saturating_sub(previous) / checkpoint.token_ids.len() as u64);
                    }
                    previous_checkpoint_at = Some(at);
                }
                Body::Completed(completed) => completion_tokens = completed.completion_tokens,
                _ => {}
            }
            events.push(TimelineEvent {
                sequence: message.sequence,
                at: wall_time(at),
                at_ns: at,
                offset_ns: at.saturating_sub(first_at),
                gap_ns: at.saturating_sub(previous_at),
                kind: event.kind().as_str().into(),
                emitter: event.envelope().emitter.clone(),
                detail: describe(event.body()),
                lifecycle: verdict,
            });
            previous_at = at;
            last_at = last_at.max(at);
        }
        checkpoint_gaps.sort_unstable();
        let token_gaps = (!checkpoint_gaps.is_empty()).then(|| TokenGaps {
            checkpoints: checkpoint_gaps.len(),
            tokens: phases.tokens_checkpointed,
            min_ns: checkpoint_gaps[0],
            median_ns: checkpoint_gaps[checkpoint_gaps.len() / 2],
            max_ns: checkpoint_gaps[checkpoint_gaps.len() - 1],
        });
        Timeline {
            request_id: request_id.to_string(),
            source: source.to_string(),
            state: format!("{:?}", lifecycle.state()),
            model,
            prompt_tokens: phases.prompt_tokens,
            completion_tokens: completion_tokens.max(phases.tokens_checkpointed),
            workers: phases.workers.clone(),
            events,
            durations: phases.durations(),
            spans: spans.finish(last_at),
            routings,
            migrations,
            prefill_attempts: phases.prefill_attempts,
            token_gaps,
            violations,
            malformed,
        }
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "request {}: {} ({} prompt tokens, {} generated{})\nsource: {}\nworkers: {}\n\n",
            self.request_id,
            self.state,
            self.prompt_tokens,
            self.completion_tokens,
            if self.model.is_empty() {
                String::new()
            } else {
                format!(", model {}", self.model)
            },
            self.source,
            if self.workers.is_empty() {
                "none yet".into()
            } else {
                self.workers.join(", ")
            }
        );
        let mut table = Table::new(&[
            "seq",
            "time (UTC)",
            "+since first",
            "gap",
            "event",
            "emitter",
            "detail",
            "lifecycle",
        ])
        .right(&[0, 2, 3]);
        for event in &self.events {
            table.row(vec![
                event.sequence.to_string(),
                event.at.clone(),
                duration(event.offset_ns),
                duration(event.gap_ns),
                event.kind.clone(),
                event.emitter.clone(),
                event.detail.clone(),
                event.lifecycle.clone(),
            ]);
        }
        out.push_str(&table.render());
        out.push_str("\nphases\n");
        let mut phases = Table::new(&["phase", "duration"]).right(&[1]);
        for (name, value) in self.durations.named() {
            phases.row(vec![name.replace('_', " "), maybe_duration(value)]);
        }
        out.push_str(&phases.render());
        if let Some(gaps) = &self.token_gaps {
            out.push_str(&format!(
                "per-token gap over {} checkpoints ({} tokens): min {}, median {}, max {}\n",
                gaps.checkpoints,
                gaps.tokens,
                duration(gaps.min_ns),
                duration(gaps.median_ns),
                duration(gaps.max_ns)
            ));
        }
        if !self.routings.is_empty() {
            out.push_str("\nrouting\n");
            for routing in &self.routings {
                out.push_str(&format!(
                    "  attempt {} at {}: {} by {}{}\n",
                    routing.attempt,
                    routing.at,
                    routing.decode_worker_id,
                    routing.policy,
                    if routing.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", routing.reason)
                    }
                ));
                for score in &routing.scores {
                    out.push_str(&format!(
                        "    {:<20} cost {:>8.3}  cached {} blocks, to prefill {}, decoding {}\n",
                        score.worker_id,
                        score.cost,
                        score.overlap_blocks,
                        score.prefill_blocks,
                        score.active_decode_blocks
                    ));
                }
            }
        }
        if !self.migrations.is_empty() {
            out.push_str("\nmigrations\n");
            for migration in &self.migrations {
                out.push_str(&format!(
                    "  {} off {} ({}), {} tokens kept\n",
                    migration.at,
                    migration.from_worker_id,
                    migration.reason,
                    migration.tokens_generated
                ));
            }
        }
        if self.prefill_attempts > 1 {
            out.push_str(&format!(
                "\nprefill redelivered: {} delivery attempts\n",
                self.prefill_attempts
            ));
        }
        if self.violations > 0 || self.malformed > 0 {
            out.push_str(&format!(
                "\n{} lifecycle violation(s), {} malformed payload(s): see the lifecycle column\n",
                self.violations, self.malformed
            ));
        }
        out
    }

    /// A Gantt-style picture of the phases: one lane per phase, a bar per attempt, the events as ticks on top,
    /// migrations as red lines. Hovering a tick or bar shows its details.
    pub fn render_svg(&self) -> String {
        const LANES: [&str; 5] = ["route", "queue wait", "prefill", "kv transfer", "decode"];
        const COLORS: [&str; 5] = ["#8e9aaf", "#e0a458", "#4c9f70", "#3d7ea6", "#7b5ea7"];
        const LEFT: f64 = 110.0;
        const WIDTH: f64 = 1000.0;
        const LANE_HEIGHT: f64 = 30.0;
        const TOP: f64 = 70.0;
        let start = self.events.iter().map(|e| e.at_ns).min().unwrap_or(0);
        let end = self
            .events
            .iter()
            .map(|e| e.at_ns)
            .chain(self.spans.iter().map(|s| s.end_ns))
            .max()
            .unwrap_or(start)
            .max(start + 1);
        let plot_width = WIDTH - LEFT - 20.0;
        let x =
            |ns: u64| LEFT + plot_width * (ns.saturating_sub(start) as f64 / (end - start) as f64);
        let height = TOP + LANE_HEIGHT * LANES.len() as f64 + 50.0;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">request {} — {} — total {}</text>\n",
            escape(&self.request_id),
            escape(&self.state),
            maybe_duration(self.durations.total_ns)
        );
        // Event ticks.
        svg.push_str(&format!(
            "<text x=\"10\" y=\"{}\">events</text>\n",
            TOP - 20.0
        ));
        for event in &self.events {
            let color = if event.lifecycle.starts_with("VIOLATION") || event.kind == "malformed" {
                "#c0392b"
            } else {
                "#333"
            };
            svg.push_str(&format!(
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"{color}\" stroke-width=\"1.5\"><title>#{3} {4} +{5} {6}</title></line>\n",
                x(event.at_ns),
                TOP - 32.0,
                TOP - 14.0,
                event.sequence,
                escape(&event.kind),
                duration(event.offset_ns),
                escape(&event.detail)
            ));
        }
        for (index, lane) in LANES.iter().enumerate() {
            let y = TOP + LANE_HEIGHT * index as f64;
            svg.push_str(&format!(
                "<text x=\"10\" y=\"{:.1}\">{lane}</text>\n<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n",
                y + 19.0,
                WIDTH - 20.0,
                y + LANE_HEIGHT,
                y + LANE_HEIGHT
            ));
            for span in self.spans.iter().filter(|span| span.lane == *lane) {
                let x0 = x(span.start_ns);
                let width = (x(span.end_ns) - x0).max(2.0);
                let opacity = if span.open { "0.45" } else { "0.9" };
                svg.push_str(&format!(
                    "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"{opacity}\" rx=\"2\"><title>{}</title></rect>\n\
                     <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>\n",
                    y + 5.0,
                    LANE_HEIGHT - 10.0,
                    COLORS[index],
                    escape(&span.label),
                    (x0 + width + 4.0).min(WIDTH - 150.0),
                    y + 19.0,
                    escape(&span.label)
                ));
            }
        }
        for event in self.events.iter().filter(|event| event.kind == "migrated") {
            let at = x(event.at_ns);
            svg.push_str(&format!(
                "<line x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"><title>migrated: {}</title></line>\n",
                TOP - 10.0,
                TOP + LANE_HEIGHT * LANES.len() as f64,
                escape(&event.detail)
            ));
        }
        // Time axis.
        let axis_y = TOP + LANE_HEIGHT * LANES.len() as f64 + 10.0;
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{axis_y}\" y2=\"{axis_y}\" stroke=\"#333\"/>\n",
            WIDTH - 20.0
        ));
        for tick in 0..=5u64 {
            let ns = start + (end - start) * tick / 5;
            svg.push_str(&format!(
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{axis_y}\" y2=\"{1}\" stroke=\"#333\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">+{3}</text>\n",
                x(ns),
                axis_y + 5.0,
                axis_y + 20.0,
                duration(ns - start)
            ));
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// The SVG and the text timeline in one HTML page.
    pub fn render_html(&self) -> String {
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>tandem request {}</title>\
             <style>body{{font-family:sans-serif;margin:1.5em}}pre{{font-size:12px}}</style></head><body>\n{}<pre>{}</pre>\n</body></html>\n",
            escape(&self.request_id),
            self.render_svg(),
            escape(&self.render_text())
        )
    }
}

/// `AfterCancellation` → `after cancellation`.
fn words(camel: &str) -> String {
    let mut out = String::new();
    for (index, c) in camel.chars().enumerate() {
        if c.is_uppercase() && index > 0 {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Escapes text for XML and HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
