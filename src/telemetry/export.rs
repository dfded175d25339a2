//! The span processor between the tracer and the OTLP exporter: finished spans go into a bounded queue and are
//! exported in batches from a thread of their own, so a request never waits for the collector. When the queue is
//! full (the collector is slow or down) a span is dropped and counted (`tandem:otel_spans_dropped_total`).
//!
//! Why not the SDK's `BatchSpanProcessor`: it keeps its dropped-span count to itself (a log line at shutdown), and
//! it exports outside any tokio runtime, where the gRPC (tonic) and hyper HTTP clients cannot run. This thread runs a
//! current-thread runtime of its own, in which the exporter is also built.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tandem_events::metric_names::{OTEL_EXPORT_FAILURES, OTEL_SPANS_DROPPED, OTEL_SPANS_EXPORTED};
use tokio::sync::{mpsc, oneshot};

/// Finished spans held while the collector is slow: beyond this many, new ones are dropped.
pub const MAX_QUEUED_SPANS: usize = 4096;
/// Spans per export call.
const MAX_EXPORT_BATCH: usize = 512;
/// A batch goes out at least this often while spans are waiting.
const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// One export call may take this long; then its spans count as failed.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

enum Control {
    /// Export everything queued, then answer.
    Flush(oneshot::Sender<()>),
    /// Export everything queued, shut the exporter down, answer and stop.
    Shutdown(oneshot::Sender<()>),
}

/// A [`SpanProcessor`] with a bounded queue and an export thread (see the module's doc).
#[derive(Debug)]
pub struct BoundedBatchProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Spans dropped so far (also counted in `tandem:otel_spans_dropped_total`).
    dropped: Arc<AtomicU64>,
    /// How long one export call may take, flushes included.
    export_timeout: Duration,
}

impl BoundedBatchProcessor {
    /// Starts the export thread and builds the exporter there with `build_exporter` (tonic needs a runtime to
    /// build in); an error building it is returned here. An export call taking longer than `export_timeout` is
    /// given up.
    pub fn start<E, B>(
        build_exporter: B,
        export_timeout: Duration,
    ) -> Result<BoundedBatchProcessor, String>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (spans, span_queue) = mpsc::channel(MAX_QUEUED_SPANS);
        let (control, control_queue) = mpsc::unbounded_channel();
        let (built, built_answer) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = built.send(Err(format!("the export thread's runtime: {error}")));
                        return;
                    }
                };
                let exporter = {
                    let _entered = runtime.enter();
                    build_exporter()
                };
                let exporter = match exporter {
                    Ok(exporter) => {
                        let _ = built.send(Ok(()));
                        exporter
                    }
                    Err(error) => {
                        let _ = built.send(Err(error));
                        return;
                    }
                };
                // Spans made while exporting (by the exporter's own libraries) must not feed this queue.
                let _suppressed = Context::enter_telemetry_suppressed_scope();
                runtime.block_on(export_loop(
                    exporter,
                    span_queue,
                    control_queue,
                    export_timeout,
                ));
            })
            .map_err(|error| format!("cannot start the export thread: {error}"))?;
        built_answer
            .recv()
            .map_err(|_| "the export thread stopped before building the exporter".to_string())??;
        Ok(BoundedBatchProcessor {
            spans,
            control,
            thread: Mutex::new(Some(thread)),
            dropped: Arc::new(AtomicU64::new(0)),
            export_timeout,
        })
    }

    /// The count of dropped spans, readable after the processor has moved into a provider.
    #[cfg(test)]
    fn dropped_count(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<()>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (answer, answered) = oneshot::channel();
        self.control
            .send(make(answer))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        // Called from any thread, runtime or not: wait without needing one.
        let (done, waited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(answered.blocking_recv().is_ok());
        });
        match waited.recv_timeout(timeout) {
            Ok(true) => Ok(()),
            Ok(false) => Err(OTelSdkError::AlreadyShutdown),
            Err(_) => Err(OTelSdkError::Timeout(timeout)),
        }
    }
}

impl SpanProcessor for BoundedBatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        // Never waits: a full queue means the collector cannot keep up, and the request must not pay for it.
        if self.spans.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(OTEL_SPANS_DROPPED).increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, self.export_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.ask(Control::Shutdown, timeout);
        if result.is_ok()
            && let Some(thread) = self
                .thread
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        {
            let _ = thread.join();
        }
        result
    }
}

async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut span_queue: mpsc::Receiver<SpanData>,
    mut control_queue: mpsc::UnboundedReceiver<Control>,
    export_timeout: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_EXPORT_BATCH);
    let mut failing = false;
    let mut ticks = tokio::time::interval(EXPORT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            span = span_queue.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= MAX_EXPORT_BATCH {
                        export(&exporter, &mut batch, &mut failing, export_timeout).await;
                    }
                }
                None => break,
            },
            _ = ticks.tick() => export(&exporter, &mut batch, &mut failing, export_timeout).await,
            control = control_queue.recv() => match control {
                Some(Control::Flush(answer)) => {
                    drain(&mut span_queue, &exporter, &mut batch, &mut failing, export_timeout).await;
                    let _ = answer.send(());
                }
                Some(Control::Shutdown(answer)) => {
                    drain(&mut span_queue, &exporter, &mut batch, &mut failing, export_timeout).await;
                    let _ = exporter.shutdown();
                    let _ = answer.send(());
                    return;
                }
                None => break,
            },
        }
    }
    export(&exporter, &mut batch, &mut failing, export_timeout).await;
    // Dropped after this, still inside the runtime its connections were made in.
    let _ = exporter.shutdown_with_timeout(export_timeout);
}

/// Exports everything queued now, in batches.
async fn drain<E: SpanExporter>(
    span_queue: &mut mpsc::Receiver<SpanData>,
    exporter: &E,
    batch: &mut Vec<SpanData>,
    failing: &mut bool,
    export_timeout: Duration,
) {
    while let Ok(span) = span_queue.try_recv() {
        batch.push(span);
        if batch.len() >= MAX_EXPORT_BATCH {
            export(exporter, batch, failing, export_timeout).await;
        }
    }
    export(exporter, batch, failing, export_timeout).await;
}

async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    failing: &mut bool,
    export_timeout: Duration,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::replace(batch, Vec::with_capacity(MAX_EXPORT_BATCH));
    let count = spans.len() as u64;
    let outcome = match tokio::time::timeout(export_timeout, exporter.export(spans)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_elapsed) => Err(format!("no answer within {export_timeout:?}")),
    };
    match outcome {
        Ok(()) => {
            metrics::counter!(OTEL_SPANS_EXPORTED).increment(count);
            if std::mem::replace(failing, false) {
                tracing::info!("OTLP export works again");
            }
        }
        Err(error) => {
            metrics::counter!(OTEL_EXPORT_FAILURES).increment(1);
            // Said once per outage, not once per batch: a collector that is down would flood the log.
            if !std::mem::replace(failing, true) {
                tracing::warn!(%error, spans = count, "OTLP export failed (is the collector at OTEL_EXPORTER_OTLP_ENDPOINT up?); spans are dropped until it answers");
            } else {
                tracing::debug!(%error, spans = count, "OTLP export failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// A collector that takes connections and never answers: exports hang. Spans ended meanwhile must neither
    /// wait nor grow without bound: past the queue's size they are dropped and counted.
    #[test]
    fn a_collector_that_never_answers_costs_dropped_spans_not_waiting() {
        let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1/traces", black_hole.local_addr().unwrap());
        let hang = Duration::from_secs(3600);
        let processor = BoundedBatchProcessor::start(
            move || {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(endpoint)
                    .with_timeout(hang)
                    .build()
                    .map_err(|error| error.to_string())
            },
            hang,
        )
        .unwrap();
        let dropped = processor.dropped_count();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        let ended = MAX_QUEUED_SPANS + 2 * MAX_EXPORT_BATCH;
        for index in 0..ended {
            drop(tracer.start(format!("span {index}")));
        }
        // At most one batch left the queue (the export of which hangs); the queue holds the rest it can.
        let dropped = dropped.load(Ordering::Relaxed) as usize;
        assert!(
            dropped >= ended - MAX_QUEUED_SPANS - MAX_EXPORT_BATCH,
            "{dropped} dropped of {ended}"
        );
        assert!(
            dropped <= ended - MAX_QUEUED_SPANS,
            "{dropped} dropped of {ended}"
        );
        // Shutting down gives up after its timeout rather than wait for the collector.
        assert!(
            provider
                .shutdown_with_timeout(Duration::from_millis(100))
                .is_err()
        );
        drop(black_hole);
    }
}
