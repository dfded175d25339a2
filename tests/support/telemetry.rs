//! Telemetry receivers for end-to-end tests: an OTLP trace collector, over HTTP/protobuf and over gRPC, that
//! decodes the real protobuf (`ExportTraceServiceRequest`) the processes export, and a reader of the Prometheus
//! text format.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as a collector received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service_name: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
}

/// An OTLP trace collector on two free loopback ports: HTTP/protobuf (`port`) and gRPC (`grpc_port`), both
/// accepting every export.
pub struct OtlpCollector {
    pub port: u16,
    pub grpc_port: u16,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Export requests that were not valid OTLP protobuf: a test fails on any.
    malformed: Arc<Mutex<Vec<String>>>,
}

impl OtlpCollector {
    pub fn start() -> OtlpCollector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("collector port");
        let port = listener.local_addr().expect("address").port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let malformed = Arc::new(Mutex::new(Vec::new()));
        let (spans_in, malformed_in) = (Arc::clone(&spans), Arc::clone(&malformed));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (spans, malformed) = (Arc::clone(&spans_in), Arc::clone(&malformed_in));
                std::thread::spawn(move || serve_connection(stream, &spans, &malformed));
            }
        });
        let grpc_port = serve_grpc(Arc::clone(&spans));
        OtlpCollector {
            port,
            grpc_port,
            spans,
            malformed,
        }
    }

    /// `OTEL_EXPORTER_OTLP_*` for a process that exports here over gRPC.
    pub fn grpc_exporter_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://127.0.0.1:{}", self.grpc_port),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
        ]
    }

    /// `OTEL_EXPORTER_OTLP_*` for a process that exports here.
    pub fn exporter_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
        ]
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        assert!(
            self.malformed.lock().unwrap().is_empty(),
            "malformed exports: {:?}",
            self.malformed.lock().unwrap()
        );
        self.spans.lock().unwrap().clone()
    }

    /// Waits until the spans of trace `trace_id` include every name in `names`, and returns that trace's spans.
    pub fn wait_for_trace(&self, trace_id: &str, names: &[&str]) -> Vec<ReceivedSpan> {
        let started = Instant::now();
        loop {
            let trace: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|span| span.trace_id == trace_id)
                .collect();
            if names
                .iter()
                .all(|name| trace.iter().any(|span| span.name == *name))
            {
                return trace;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "trace {trace_id} never held all of {names:?}; it holds {:?}",
                trace.iter().map(|span| &span.name).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Answers HTTP/1.1 requests on one connection until it closes; each body is an export request.
fn serve_connection(
    stream: TcpStream,
    spans: &Mutex<Vec<ReceivedSpan>>,
    malformed: &Mutex<Vec<String>>,
) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.starts_with("POST /v1/traces") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(export) => spans.lock().unwrap().extend(flatten(export)),
                Err(error) => malformed.lock().unwrap().push(error.to_string()),
            }
        } else {
            malformed
                .lock()
                .unwrap()
                .push(format!("unexpected request {}", request_line.trim()));
        }
        // An empty body is the protobuf encoding of an empty ExportTraceServiceResponse: everything accepted.
        let answer =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The OTLP gRPC trace service: every export's spans are kept.
struct GrpcCollector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.spans
            .lock()
            .unwrap()
            .extend(flatten(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves the gRPC trace service on a free loopback port (on a thread with its own runtime); returns the port.
fn serve_grpc(spans: Arc<Mutex<Vec<ReceivedSpan>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("collector gRPC port");
    let port = listener.local_addr().expect("address").port();
    listener.set_nonblocking(true).expect("non-blocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(GrpcCollector { spans }))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("the gRPC collector serves");
        });
    });
    port
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in export.resource_spans {
        let service_name = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| {
                resource
                    .attributes
                    .iter()
                    .find(|attribute| attribute.key == "service.name")
            })
            .and_then(|attribute| attribute.value.as_ref())
            .map(|value| text_of(value.value.as_ref()))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .into_iter()
                        .map(|attribute| {
                            let value = attribute
                                .value
                                .as_ref()
                                .map(|value| text_of(value.value.as_ref()))
                                .unwrap_or_default();
                            (attribute.key, value)
                        })
                        .collect(),
                });
            }
        }
    }
    spans
}

fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A scrape of `GET /metrics`: the samples of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// (metric name, labels, value) per sample line.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Scrape { samples }
    }

    /// The sum of the samples of `name` whose labels include `labels` (0 when there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(sample_name, sample_labels, _)| {
                sample_name == name
                    && labels.iter().all(|(key, value)| {
                        sample_labels.get(*key).map(String::as_str) == Some(*value)
                    })
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// Whether any sample of `name` is there.
    pub fn has(&self, name: &str) -> bool {
        self.samples
            .iter()
            .any(|(sample_name, _, _)| sample_name == name)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after.find('"').unwrap_or(after.len());
        labels.insert(
            key.trim_start_matches(',').trim().to_string(),
            after[..end].to_string(),
        );
        rest = after.get(end + 1..).unwrap_or("");
    }
    labels
}
