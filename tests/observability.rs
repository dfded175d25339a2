//! Observability end to end. Traces: gateway, scheduler, decode and prefill as four `tandem` processes on a real
//! nats-server, exporting by OTLP (two over HTTP/protobuf, two over gRPC) to a collector in this test that decodes the
//! protobuf; one remotely prefilled
//! request (with a client `traceparent`) is one trace holding spans of all four services, linked parent to child
//! along the request's path. Metrics: `/metrics` scraped on every role's port, and on `tandem serve` before and
//! after a few requests, moves by exactly what those requests did. Logs: `--log-format json` lines carry the
//! request id.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::telemetry::{OtlpCollector, ReceivedSpan, Scrape};
use support::{
    TandemRole, TandemServe, free_port, request, request_with_headers, wait_for_workers, wait_ready,
};
use tandem_events::nats_server::NatsServer;

/// The client's trace: the gateway's span must continue it.
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn scrape(port: u16) -> Scrape {
    let (status, text) = request(port, "GET", "/metrics", None).expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    Scrape::parse(&text)
}

/// Waits until the sample `name{labels}` on `port` reads `expected` (a worker may record it just after the answer
/// went out), and fails with what it reads if it never does.
fn wait_for_value(port: u16, name: &str, labels: &[(&str, &str)], expected: f64) {
    let started = Instant::now();
    loop {
        let value = scrape(port).value(name, labels);
        if value == expected {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name}{labels:?} is {value}, {expected} expected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one span called `name`.
fn span<'a>(trace: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = trace.iter().filter(|span| span.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {trace:#?}");
    found[0]
}

#[test]
fn a_remote_prefill_is_one_trace_across_four_processes_and_every_role_serves_metrics() {
    let collector = OtlpCollector::start();
    // Both transports: the gateway and the decode worker over HTTP/protobuf, the scheduler and the prefill worker
    // over gRPC.
    let http_env = collector.exporter_env();
    let grpc_env = collector.grpc_exporter_env();
    let nats = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    let (gateway_port, scheduler_port, decode_port, prefill_port) =
        (free_port(), free_port(), free_port(), free_port());
    let data_dir = logs.join("scheduler-data");
    let _scheduler = TandemRole::spawn_with_env(
        "scheduler",
        &[
            "scheduler",
            "--nats",
            &url,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--http-port",
            &scheduler_port.to_string(),
        ],
        &grpc_env,
        logs,
    );
    let _prefill = TandemRole::spawn_with_env(
        "prefill",
        &[
            "prefill",
            "--nats",
            &url,
            "--worker-id",
            "prefill-1",
            "--http-port",
            &prefill_port.to_string(),
        ],
        &grpc_env,
        logs,
    );
    let _decode = TandemRole::spawn_with_env(
        "decode",
        &[
            "decode",
            "--nats",
            &url,
            "--worker-id",
            "decode-1",
            "--max-local-prefill-tokens",
            "64",
            "--http-port",
            &decode_port.to_string(),
        ],
        &http_env,
        logs,
    );
    let _gateway = TandemRole::spawn_with_env(
        "gateway",
        &[
            "gateway",
            "--nats",
            &url,
            "--host",
            "127.0.0.1",
            "--port",
            &gateway_port.to_string(),
        ],
        &http_env,
        logs,
    );
    wait_ready(gateway_port, "/ready", "the gateway");
    wait_ready(prefill_port, "/ready", "the prefill worker");
    wait_for_workers(&url, &["prefill-1"]);

    // A prompt over --max-local-prefill-tokens: prefilled by the prefill worker, its KV sent over TCP.
    let prompt: Vec<u32> = (0..200).map(|t| 1000 + (t * 7) % 50_000).collect();
    let body =
        json!({"model": "qwen3", "prompt": prompt, "max_tokens": 6, "temperature": 0}).to_string();
    let traceparent = format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01");
    let (status, text) = request_with_headers(
        gateway_port,
        "POST",
        "/v1/completions",
        Some(&body),
        &[("traceparent", &traceparent)],
    )
    .expect("POST");
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let request_id = answer["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("cmpl-")
        .to_string();
    assert_eq!(answer["usage"]["completion_tokens"], 6);

    let trace = collector.wait_for_trace(
        CLIENT_TRACE_ID,
        &[
            "gateway.request",
            "scheduler.route",
            "decode.request",
            "prefill.queue_wait",
            "prefill.job",
            "prefill.compute",
            "kv_transfer.send",
            "kv_transfer.receive",
        ],
    );
    // Every span of the request, from all four services, is in this one trace.
    let services: std::collections::BTreeSet<&str> = trace
        .iter()
        .map(|span| span.service_name.as_str())
        .collect();
    assert_eq!(
        services,
        [
            "tandem-decode",
            "tandem-gateway",
            "tandem-prefill",
            "tandem-scheduler"
        ]
        .into_iter()
        .collect(),
        "{trace:#?}"
    );
    let other_traces: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|span| span.attributes.get("request_id") == Some(&request_id))
        .filter(|span| span.trace_id != CLIENT_TRACE_ID)
        .collect();
    assert!(
        other_traces.is_empty(),
        "spans of the request outside its trace: {other_traces:#?}"
    );

    // The request's path, parent to child.
    let gateway = span(&trace, "gateway.request");
    let route = span(&trace, "scheduler.route");
    let decode = span(&trace, "decode.request");
    let queue_wait = span(&trace, "prefill.queue_wait");
    let job = span(&trace, "prefill.job");
    let compute = span(&trace, "prefill.compute");
    let send = span(&trace, "kv_transfer.send");
    let receive = span(&trace, "kv_transfer.receive");
    let expected_links: [(&ReceivedSpan, &str, &str); 8] = [
        (gateway, CLIENT_SPAN_ID, "tandem-gateway"),
        (route, &gateway.span_id, "tandem-scheduler"),
        (decode, &route.span_id, "tandem-decode"),
        (queue_wait, &decode.span_id, "tandem-prefill"),
        (job, &decode.span_id, "tandem-prefill"),
        (compute, &job.span_id, "tandem-prefill"),
        (send, &job.span_id, "tandem-prefill"),
        (receive, &send.span_id, "tandem-decode"),
    ];
    for (child, parent_span_id, service) in expected_links {
        assert_eq!(
            child.parent_span_id, parent_span_id,
            "parent of {}: {trace:#?}",
            child.name
        );
        assert_eq!(child.service_name, service, "service of {}", child.name);
    }
    // Every span of the trace hangs from one of its spans, but the gateway's, which hangs from the client's.
    let span_ids: std::collections::BTreeSet<&str> =
        trace.iter().map(|span| span.span_id.as_str()).collect();
    for span in &trace {
        assert!(
            span.parent_span_id == CLIENT_SPAN_ID
                || span_ids.contains(span.parent_span_id.as_str()),
            "{} has a parent outside the trace: {trace:#?}",
            span.name
        );
    }
    // Attributes: the request id, workers, token counts, bytes.
    for span in [
        gateway, route, decode, queue_wait, job, compute, send, receive,
    ] {
        assert_eq!(
            span.attributes.get("request_id"),
            Some(&request_id),
            "{span:#?}"
        );
    }
    assert_eq!(route.attributes["decode_worker_id"], "decode-1");
    assert_eq!(decode.attributes["decode_worker_id"], "decode-1");
    assert_eq!(decode.attributes["prefill"], "remote");
    assert_eq!(decode.attributes["completion_tokens"], "6");
    assert_eq!(decode.attributes["prompt_tokens"], "200");
    assert_eq!(gateway.attributes["completion_tokens"], "6");
    assert_eq!(gateway.attributes["finish_reason"], "length");
    assert_eq!(job.attributes["prefill_worker_id"], "prefill-1");
    let bytes: u64 = send.attributes["bytes"].parse().unwrap();
    assert!(bytes > 0);
    assert_eq!(receive.attributes["bytes"], send.attributes["bytes"]);
    assert_eq!(receive.attributes["transport"], "tcp");

    // Every role serves its metrics on its own port; the counters say what this one request did.
    let gateway_metrics = scrape(gateway_port);
    assert_eq!(
        gateway_metrics.value(
            "tandem:request_success_total",
            &[("finished_reason", "length")]
        ),
        1.0
    );
    assert_eq!(
        gateway_metrics.value("tandem:prompt_tokens_total", &[]),
        200.0
    );
    assert_eq!(
        gateway_metrics.value("tandem:generation_tokens_total", &[]),
        6.0
    );
    assert_eq!(
        gateway_metrics.value("tandem:time_to_first_token_seconds_count", &[]),
        1.0
    );
    wait_for_value(
        scheduler_port,
        "tandem:routing_decisions_total",
        &[("policy", "kv")],
        1.0,
    );
    wait_for_value(
        prefill_port,
        "tandem:kv_transfer_bytes_total",
        &[("side", "send")],
        bytes as f64,
    );
    wait_for_value(
        prefill_port,
        "tandem:prefill_queue_wait_seconds_count",
        &[("worker_id", "prefill-1")],
        1.0,
    );
    wait_for_value(
        decode_port,
        "tandem:kv_transfer_bytes_total",
        &[("side", "receive"), ("transport", "tcp")],
        bytes as f64,
    );
    wait_for_value(
        decode_port,
        "tandem:prefill_decisions_total",
        &[("worker_id", "decode-1"), ("where", "remote")],
        1.0,
    );
    wait_for_value(decode_port, "tandem:num_requests_running", &[], 0.0);
    let decode_metrics = scrape(decode_port);
    assert!(decode_metrics.has("tandem:kv_blocks_free"));
    assert!(
        decode_metrics.value(
            "tandem:log_appended_events_total",
            &[("backend", "jetstream")]
        ) > 0.0
    );
    assert_eq!(
        decode_metrics.value("tandem:otel_spans_dropped_total", &[]),
        0.0
    );
}

#[test]
fn metrics_move_by_exactly_what_the_requests_did_and_json_logs_carry_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("serve");
    // Trace export by gRPC to a collector that is down (nothing listens there): requests must not notice.
    let collector_down = format!("http://127.0.0.1:{}", free_port());
    // Debug lines of the gateway are inside the request's span; JSON lines carry its fields.
    let server = TandemServe::start_with_env(
        &data_dir,
        &["--log-format", "json", "--kv-blocks", "512"],
        &[
            ("RUST_LOG", "info,tandem_gateway=debug"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_down),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let before = scrape(server.port);

    let mut prompt_tokens = 0.0;
    let mut completion_tokens = 0.0;
    let mut request_ids = Vec::new();
    let requests = 3;
    for index in 0..requests {
        let (status, answer) = server.post_json(
            "/v1/chat/completions",
            &json!({
                "model": "qwen3",
                "messages": [{"role": "user", "content": format!("Question number {index}: why is the sky blue?")}],
                "max_tokens": 4 + index,
                "temperature": 0,
                "ignore_eos": true,
            }),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "length");
        prompt_tokens += answer["usage"]["prompt_tokens"].as_f64().unwrap();
        completion_tokens += answer["usage"]["completion_tokens"].as_f64().unwrap();
        request_ids.push(
            answer["id"]
                .as_str()
                .unwrap()
                .trim_start_matches("chatcmpl-")
                .to_string(),
        );
    }
    // Refused before it is accepted: counts nowhere.
    let (status, _) = server.post_json(
        "/v1/chat/completions",
        &json!({"model": "qwen3", "messages": [], "max_tokens": 4}),
    );
    assert_eq!(status, 400);

    let after = scrape(server.port);
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(
        moved(
            "tandem:request_success_total",
            &[("finished_reason", "length")]
        ),
        f64::from(requests)
    );
    assert_eq!(moved("tandem:request_failure_total", &[]), 0.0);
    assert_eq!(moved("tandem:prompt_tokens_total", &[]), prompt_tokens);
    assert_eq!(
        moved("tandem:generation_tokens_total", &[]),
        completion_tokens
    );
    assert_eq!(completion_tokens, f64::from(4 + 5 + 6));
    for histogram in [
        "tandem:time_to_first_token_seconds_count",
        "tandem:e2e_request_latency_seconds_count",
    ] {
        assert_eq!(moved(histogram, &[]), f64::from(requests), "{histogram}");
    }
    // Each answer's tokens came in updates after the first: one inter-token gap per later token at most.
    assert!(
        moved("tandem:inter_token_latency_seconds_count", &[])
            <= completion_tokens - f64::from(requests)
    );
    // The decode worker looked up every prompt in its prefix cache, and prefilled each locally (no prefill worker).
    assert_eq!(
        moved("tandem:prefix_cache_queries_total", &[]),
        prompt_tokens
    );
    assert_eq!(
        moved("tandem:prefill_decisions_total", &[("where", "local")]),
        f64::from(requests)
    );
    assert_eq!(
        moved("tandem:routing_decisions_total", &[]),
        f64::from(requests)
    );
    assert!(
        moved(
            "tandem:log_appended_events_total",
            &[("backend", "embedded")]
        ) > 0.0
    );
    assert!(
        moved(
            "tandem:log_append_seconds_count",
            &[("backend", "embedded")]
        ) > 0.0
    );
    // Idle again (the engine thread updates its gauges just after the last token went out): nothing running, every
    // block either free or holding a cached prefix.
    wait_for_value(server.port, "tandem:num_requests_running", &[], 0.0);
    wait_for_value(server.port, "tandem:num_requests_waiting", &[], 0.0);
    assert_eq!(after.value("tandem:gateway_requests_in_flight", &[]), 0.0);
    assert_eq!(
        after.value("tandem:kv_blocks_used", &[]) + after.value("tandem:kv_blocks_free", &[]),
        512.0
    );

    // The spans of those requests could not be exported: counted as failed exports, never waited for.
    let started = Instant::now();
    while scrape(server.port).value("tandem:otel_export_failures_total", &[]) == 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no failed export was counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let log = server.log();
    server.stop();
    // Every line is a JSON object; the request's own lines name it.
    let mut lines_of: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        if let Some(request_id) = parsed["span"]["request_id"].as_str() {
            *lines_of.entry(request_id.to_string()).or_default() += 1;
        }
    }
    for request_id in &request_ids {
        assert!(
            lines_of.get(request_id).copied().unwrap_or(0) > 0,
            "no log line carries {request_id}: {lines_of:?}"
        );
    }
}
