//! The process's telemetry: log lines (readable text, or JSON with `--log-format json`; the span fields, so the
//! request id, on every line inside a request), trace export by OTLP when an `OTEL_EXPORTER_OTLP_*` endpoint is
//! set, and the Prometheus recorder behind `GET /metrics`. The roles only use `tracing` and `metrics`; what
//! carries a trace between processes is in `tandem_events::trace`.
//!
//! `service.name` is the role (`tandem-gateway`, `tandem-scheduler`, `tandem-decode`, `tandem-prefill`);
//! `tandem serve`, all roles in one process, is `tandem` (its span names still say which role made them).
//! `OTEL_SERVICE_NAME` overrides it.

mod export;

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use export::BoundedBatchProcessor;

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event, prefixed with the spans it happened in (`gateway.request{request_id=…}`).
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (`request_id`, …) and the span list.
    Json,
}

/// What a process records beyond its log lines.
#[derive(Clone, Copy, Debug)]
pub struct Signals {
    /// `service.name` of its spans; `None`: no trace export even when an endpoint is set (tools, benchmarks).
    pub service_name: Option<&'static str>,
    /// Install the Prometheus recorder (the serving roles).
    pub metrics: bool,
}

impl Signals {
    /// Log lines only.
    pub const LOGS_ONLY: Signals = Signals {
        service_name: None,
        metrics: false,
    };

    /// A serving role: traces (when an endpoint is set) as `service_name`, and metrics.
    pub const fn role(service_name: &'static str) -> Signals {
        Signals {
            service_name: Some(service_name),
            metrics: true,
        }
    }
}

/// Keeps trace export running; dropping it exports what is queued (bounded wait) and stops.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("warning: spans still queued for OTLP export were lost at exit: {error}");
        }
    }
}

/// The Prometheus recorder, once installed.
static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The metrics in the Prometheus text format (version 0.0.4), or `None` when this process records none.
pub fn prometheus_text() -> Option<String> {
    PROMETHEUS.get().map(PrometheusHandle::render)
}

/// Installs logging, and trace export and metrics as `signals` asks. Call once, first thing.
pub fn init(format: LogFormat, signals: Signals) -> Result<Telemetry> {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
    };
    let (tracer_provider, export_note) = match signals.service_name {
        Some(service_name) => match otlp_configured() {
            Some(endpoint) => (
                Some(tracer_provider(service_name)?),
                Some(format!(
                    "exporting traces by OTLP to {endpoint} as {service_name}"
                )),
            ),
            None => (None, None),
        },
        None => (None, None),
    };
    // Spans go to the exporter whatever RUST_LOG says about log lines: only tandem's own, at info and above.
    let trace_layer = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tandem"))
            .with_filter(
                Targets::new()
                    .with_target("tandem", LevelFilter::INFO)
                    .with_default(LevelFilter::OFF),
            )
    });
    tracing_subscriber::registry()
        .with(log_layer)
        .with(trace_layer)
        .try_init()
        .context("installing the log subscriber")?;
    if let Some(provider) = &tracer_provider {
        // Spans recorded straight through OpenTelemetry (queue waits, KV receipts) use the global provider.
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    if let Some(note) = export_note {
        tracing::info!("{note}");
    }
    if signals.metrics {
        install_prometheus()?;
    }
    Ok(Telemetry { tracer_provider })
}

/// The endpoint trace export goes to, when the standard variables ask for export.
fn otlp_configured() -> Option<String> {
    let set = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
    };
    if set("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|value| value.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

fn tracer_provider(service_name: &'static str) -> Result<SdkTracerProvider> {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    let resource = resource.build();
    let exporter_resource = resource.clone();
    // gRPC or HTTP/protobuf as OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says (default: HTTP/protobuf on 4318).
    let processor = BoundedBatchProcessor::start(
        move || {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .build()
                .map_err(|error| format!("building the OTLP span exporter: {error}"))?;
            opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &exporter_resource);
            Ok(exporter)
        },
        export::EXPORT_TIMEOUT,
    )
    .map_err(anyhow::Error::msg)
    .context("starting OTLP trace export (check the OTEL_EXPORTER_OTLP_* variables)")?;
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

fn install_prometheus() -> Result<()> {
    let handle = PrometheusBuilder::new()
        .set_buckets(tandem_events::metric_names::LATENCY_BUCKETS_SECONDS)
        .context("the histogram buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    tandem_events::metric_names::describe();
    // Histograms are folded into their buckets at upkeep; a scrape does it too, this bounds memory between scrapes.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .context("starting the metrics upkeep thread")?;
    let _ = PROMETHEUS.set(handle);
    Ok(())
}

/// `GET /metrics` for a role's HTTP port: the Prometheus text exposition.
pub fn metrics_router() -> axum::Router {
    axum::Router::new().route("/metrics", axum::routing::get(metrics_handler))
}

async fn metrics_handler() -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match prometheus_text() {
        Some(text) => tandem_gateway::prometheus_text_response(text),
        None => (StatusCode::NOT_FOUND, "this process records no metrics\n").into_response(),
    }
}
