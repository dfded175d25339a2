//! The Prometheus metrics every role records, by name, unit and meaning, in the style vLLM and Dynamo users know
//! (`tandem:` prefix, seconds and tokens in the names). The roles record through the `metrics` facade; the binary
//! installs the Prometheus recorder and serves `GET /metrics` (`src/telemetry/`). Without a recorder (library tests)
//! recording is a no-op. [`describe`] gives each metric its help text once a recorder is installed.

/// Counter `{finished_reason="stop"|"length"}`: requests the gateway answered in full.
pub const REQUEST_SUCCESS: &str = "tandem:request_success_total";
/// Counter `{reason}`: requests the gateway accepted that did not finish (`failed`, `cancelled`, `deadline`,
/// `unavailable`, `tokens_lost`).
pub const REQUEST_FAILURE: &str = "tandem:request_failure_total";
/// Histogram: from the gateway accepting a request to its first generated token reaching the gateway.
pub const TIME_TO_FIRST_TOKEN: &str = "tandem:time_to_first_token_seconds";
/// Histogram: gap between consecutive generated tokens as the gateway receives them (an update of n tokens after a
/// gap g counts n gaps of g/n).
pub const INTER_TOKEN_LATENCY: &str = "tandem:inter_token_latency_seconds";
/// Histogram: from the gateway accepting a request to its last token.
pub const E2E_REQUEST_LATENCY: &str = "tandem:e2e_request_latency_seconds";
/// Counter: prompt tokens of requests the gateway put on the log.
pub const PROMPT_TOKENS: &str = "tandem:prompt_tokens_total";
/// Counter: generated tokens the gateway passed on to clients.
pub const GENERATION_TOKENS: &str = "tandem:generation_tokens_total";
/// Gauge: requests the gateway holds open (accepted, not answered yet).
pub const GATEWAY_REQUESTS_IN_FLIGHT: &str = "tandem:gateway_requests_in_flight";

/// Gauge `{worker_id}`: requests in a decode worker's running batch (prefilling, awaiting KV or decoding).
pub const NUM_REQUESTS_RUNNING: &str = "tandem:num_requests_running";
/// Gauge `{worker_id}`: requests a decode worker took but has not admitted to its batch (no room or no KV blocks).
pub const NUM_REQUESTS_WAITING: &str = "tandem:num_requests_waiting";
/// Gauge `{worker_id}`: KV blocks holding a sequence.
pub const KV_BLOCKS_USED: &str = "tandem:kv_blocks_used";
/// Gauge `{worker_id}`: KV blocks free (free cached blocks included: they are reused on demand).
pub const KV_BLOCKS_FREE: &str = "tandem:kv_blocks_free";
/// Counter `{worker_id}`: prompt tokens a decode worker looked up in its prefix cache.
pub const PREFIX_CACHE_QUERIES: &str = "tandem:prefix_cache_queries_total";
/// Counter `{worker_id}`: of those, tokens found cached (hit rate = hits / queries).
pub const PREFIX_CACHE_HITS: &str = "tandem:prefix_cache_hits_total";
/// Counter `{worker_id, outcome="taken"|"dropped"}`: decode steps a decode worker queued ahead of the host (before
/// the step before them returned its tokens) that the next step took, or that a change to the batch made it drop
/// after the GPU ran them.
pub const DECODE_STEPS_QUEUED_AHEAD: &str = "tandem:decode_steps_queued_ahead_total";
/// Counter `{worker_id, where="local"|"remote"}`: prefills a decode worker decided on.
pub const PREFILL_DECISIONS: &str = "tandem:prefill_decisions_total";
/// Gauge `{worker_id}`: jobs waiting in the shared prefill queue, as a decode worker last saw it.
pub const PREFILL_QUEUE_DEPTH: &str = "tandem:prefill_queue_depth";
/// Histogram `{worker_id}`: from `PrefillQueued` being appended to a prefill worker taking the job.
pub const PREFILL_QUEUE_WAIT: &str = "tandem:prefill_queue_wait_seconds";
/// Histogram `{worker_id}`: a prefill worker's compute time for one prompt.
pub const PREFILL_COMPUTE: &str = "tandem:prefill_compute_seconds";
/// Counter `{worker_id}`: prompt tokens a prefill worker computed (cached ones not counted).
pub const PREFILL_TOKENS: &str = "tandem:prefill_tokens_total";
/// Counter `{side="send"|"receive", transport}`: KV bytes moved between workers.
pub const KV_TRANSFER_BYTES: &str = "tandem:kv_transfer_bytes_total";
/// Histogram `{side="send"|"receive", transport}`: duration of one KV transfer.
pub const KV_TRANSFER_SECONDS: &str = "tandem:kv_transfer_seconds";

/// Counter `{policy}`: routing decisions the active scheduler appended.
pub const ROUTING_DECISIONS: &str = "tandem:routing_decisions_total";
/// Counter: requests the scheduler moved off a departed decode worker.
pub const MIGRATIONS: &str = "tandem:migrations_total";
/// Counter `{reason}`: requests the scheduler failed for a phase timeout.
pub const SCHEDULER_TIMEOUTS: &str = "tandem:scheduler_timeouts_total";

/// Histogram `{backend="jetstream"|"embedded"}`: one append (or one pipelined batch) until the log acknowledged it.
pub const LOG_APPEND: &str = "tandem:log_append_seconds";
/// Counter `{backend}`: events appended.
pub const LOG_APPENDED_EVENTS: &str = "tandem:log_appended_events_total";

/// Counter: finished spans dropped because the export queue was full (the collector is slow or down).
pub const OTEL_SPANS_DROPPED: &str = "tandem:otel_spans_dropped_total";
/// Counter: finished spans handed to the OTLP exporter.
pub const OTEL_SPANS_EXPORTED: &str = "tandem:otel_spans_exported_total";
/// Counter: OTLP export calls that failed or timed out (their spans are lost).
pub const OTEL_EXPORT_FAILURES: &str = "tandem:otel_export_failures_total";

/// Histogram buckets (seconds) for latencies from sub-millisecond log appends to minute-long requests.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
];

/// Gives every metric its unit and help text in the installed recorder (`# HELP` lines).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUEST_SUCCESS,
        Unit::Count,
        "Requests answered in full, by finish reason (stop, length)."
    );
    describe_counter!(
        REQUEST_FAILURE,
        Unit::Count,
        "Accepted requests that did not finish, by reason."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From the gateway accepting a request to its first generated token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Gap between consecutive generated tokens at the gateway."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "From the gateway accepting a request to its last token."
    );
    describe_counter!(
        PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens of requests put on the log."
    );
    describe_counter!(
        GENERATION_TOKENS,
        Unit::Count,
        "Generated tokens passed on to clients."
    );
    describe_gauge!(
        GATEWAY_REQUESTS_IN_FLIGHT,
        Unit::Count,
        "Requests the gateway holds open."
    );
    describe_gauge!(
        NUM_REQUESTS_RUNNING,
        Unit::Count,
        "Requests in a decode worker's running batch."
    );
    describe_gauge!(
        NUM_REQUESTS_WAITING,
        Unit::Count,
        "Requests waiting for a place in a decode worker's batch."
    );
    describe_gauge!(KV_BLOCKS_USED, Unit::Count, "KV blocks holding a sequence.");
    describe_gauge!(
        KV_BLOCKS_FREE,
        Unit::Count,
        "KV blocks free (cached free blocks included)."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES,
        Unit::Count,
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        Unit::Count,
        "Prompt tokens found in the prefix cache."
    );
    describe_counter!(
        DECODE_STEPS_QUEUED_AHEAD,
        Unit::Count,
        "Decode steps queued ahead of the host, taken or dropped."
    );
    describe_counter!(
        PREFILL_DECISIONS,
        Unit::Count,
        "Prefill decisions of decode workers, local or remote."
    );
    describe_gauge!(
        PREFILL_QUEUE_DEPTH,
        Unit::Count,
        "Jobs waiting in the shared prefill queue."
    );
    describe_histogram!(
        PREFILL_QUEUE_WAIT,
        Unit::Seconds,
        "From PrefillQueued to a prefill worker taking the job."
    );
    describe_histogram!(
        PREFILL_COMPUTE,
        Unit::Seconds,
        "Prefill worker compute time per prompt."
    );
    describe_counter!(
        PREFILL_TOKENS,
        Unit::Count,
        "Prompt tokens computed by prefill workers."
    );
    describe_counter!(
        KV_TRANSFER_BYTES,
        Unit::Bytes,
        "KV bytes moved between workers, by side."
    );
    describe_histogram!(
        KV_TRANSFER_SECONDS,
        Unit::Seconds,
        "Duration of one KV transfer, by side."
    );
    describe_counter!(
        ROUTING_DECISIONS,
        Unit::Count,
        "Routing decisions appended by the active scheduler."
    );
    describe_counter!(
        MIGRATIONS,
        Unit::Count,
        "Requests moved off a departed decode worker."
    );
    describe_counter!(
        SCHEDULER_TIMEOUTS,
        Unit::Count,
        "Requests failed for a phase timeout, by reason."
    );
    describe_histogram!(
        LOG_APPEND,
        Unit::Seconds,
        "One append or pipelined batch until the log acknowledged it."
    );
    describe_counter!(
        LOG_APPENDED_EVENTS,
        Unit::Count,
        "Events appended to the log."
    );
    describe_counter!(
        OTEL_SPANS_DROPPED,
        Unit::Count,
        "Finished spans dropped: the export queue was full."
    );
    describe_counter!(
        OTEL_SPANS_EXPORTED,
        Unit::Count,
        "Finished spans handed to the OTLP exporter."
    );
    describe_counter!(
        OTEL_EXPORT_FAILURES,
        Unit::Count,
        "OTLP export calls that failed or timed out."
    );
}

/// Records one acknowledged append of `events` events to the `backend` log, started at `started`.
pub(crate) fn record_append(backend: &'static str, started: std::time::Instant, events: usize) {
    metrics::histogram!(LOG_APPEND, "backend" => backend).record(started.elapsed().as_secs_f64());
    metrics::counter!(LOG_APPENDED_EVENTS, "backend" => backend).increment(events as u64);
}
