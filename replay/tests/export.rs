//! Export files: a log exported and read back gives the same messages, byte for byte, and the same stats and
//! audit as the log itself, on the embedded backend and on JetStream with a real nats-server; damaged files are
//! refused with a reason.

mod support;

use std::sync::Arc;

use support::*;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{EventLog, OutgoingMessage};
use tandem_events::nats_server::NatsServer;
use tandem_replay::ReplayError;
use tandem_replay::audit::{AuditOptions, AuditReport, Rebuild};
use tandem_replay::export::{ExportHeader, ExportReader, ExportWriter};
use tandem_replay::source::{Progress, ReadRange, Source};
use tandem_replay::stats::{StatsCollector, StatsOptions, StatsReport};
use tandem_replay::timeline::{Timeline, read_request};

async fn log_for_timeline(server: &NatsServer) -> JetStreamLog {
    JetStreamLog::connect(&server.url()).await.unwrap()
}

async fn stats(source: &Source, range: &ReadRange) -> StatsReport {
    let mut collector = StatsCollector::new(StatsOptions::default());
    source
        .scan(range, &mut Progress::quiet(), |message| {
            collector.observe(message);
            Ok(())
        })
        .await
        .unwrap();
    // The source's name differs between a log and its export; everything else must not.
    collector.finish("")
}

async fn audit(source: &Source) -> AuditReport {
    let mut rebuild = Rebuild::new(AuditOptions::default());
    source
        .scan(&ReadRange::default(), &mut Progress::quiet(), |message| {
            rebuild.observe(message);
            Ok(())
        })
        .await
        .unwrap();
    rebuild.finish("")
}

async fn export(source: &Source, range: &ReadRange, path: &std::path::Path) -> u64 {
    let header = ExportHeader::new(source.description(), "");
    let mut writer = ExportWriter::create(path, &header).unwrap();
    source
        .scan(range, &mut Progress::quiet(), |message| {
            writer.write(message)
        })
        .await
        .unwrap();
    writer.finish().unwrap().messages
}

/// A synthetic log plus one payload that does not decode (exports keep it as stored).
async fn fill(log: &dyn EventLog) {
    tandem_replay::synthetic::write_log(log, 3_000, 16, 11)
        .await
        .unwrap();
    log.append(OutgoingMessage {
        subject: "tandem.ev.completed.01KAXGARBAGE0000000000001".into(),
        dedup_id: "garbage".into(),
        payload: bytes::Bytes::from_static(b"\x08\xff not an envelope"),
    })
    .await
    .unwrap();
}

async fn check_round_trip(log: Arc<dyn EventLog>, dir: &std::path::Path) {
    let source = Source::from_log(Arc::clone(&log), "log under test");
    let file = dir.join("incident.tlog");
    let exported = export(&source, &ReadRange::default(), &file).await;
    let from_log = read_all(log.as_ref()).await;
    assert_eq!(exported, from_log.len() as u64);

    let file_source = Source::file(&file).unwrap();
    assert!(file_source.description().contains("log under test"));
    let from_file = scan_all(&file_source).await;
    assert_eq!(from_file, from_log, "every message comes back exactly");

    let log_stats = stats(&source, &ReadRange::default()).await;
    assert!(log_stats.requests > 100, "{log_stats:?}");
    assert!(log_stats.remote_prefills > 0 && log_stats.local_prefills > 0);
    assert_eq!(stats(&file_source, &ReadRange::default()).await, log_stats);

    let log_audit = audit(&source).await;
    let file_audit = audit(&file_source).await;
    assert_eq!(log_audit.findings, file_audit.findings);
    assert_eq!(
        log_audit.errors(),
        1,
        "the garbage payload: {}",
        log_audit.render_text()
    );

    // A window of the log exports only that window, and its stats are the window's.
    let middle = &from_log[from_log.len() / 2];
    let window = ReadRange {
        since_ns: Some(middle.stored_at_ns),
        ..ReadRange::default()
    };
    let window_file = dir.join("window.tlog");
    let in_window = export(&source, &window, &window_file).await;
    assert!(in_window > 0 && in_window <= from_log.len() as u64);
    let window_source = Source::file(&window_file).unwrap();
    assert_eq!(
        stats(&window_source, &ReadRange::default()).await,
        stats(&source, &window).await
    );
}

#[tokio::test]
async fn an_embedded_log_round_trips_through_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    fill(&log).await;
    check_round_trip(Arc::new(log), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_log_round_trips_through_an_export() {
    let server = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let log = JetStreamLog::connect(&server.url()).await.unwrap();
    fill(&log).await;
    let dir = tempfile::tempdir().unwrap();
    check_round_trip(Arc::new(log), dir.path()).await;

    // And through the URL, as `--nats` opens it.
    let source = Source::nats(&server.url()).await.unwrap();
    assert!(source.description().contains("JetStream"));
    assert!(stats(&source, &ReadRange::default()).await.requests > 100);

    // A timeline's read filters by the request's subjects on the server (and `Routed` by its envelope).
    let messages = read_all(&log_for_timeline(&server).await).await;
    let request_id = messages
        .iter()
        .find_map(|m| m.subject.strip_prefix("tandem.ev.received."))
        .unwrap()
        .to_string();
    let expected: Vec<_> = messages
        .iter()
        .filter(|m| m.event().is_ok_and(|event| event.id() == request_id))
        .cloned()
        .collect();
    let read = read_request(&source, &request_id, &mut Progress::quiet())
        .await
        .unwrap();
    assert_eq!(read, expected);
    let timeline = Timeline::build(&request_id, source.description(), &read);
    assert_eq!(timeline.violations, 0);
    assert_eq!(timeline.routings.len(), 1);
}

#[tokio::test]
async fn damaged_and_foreign_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    tandem_replay::synthetic::write_log(&log, 500, 8, 3)
        .await
        .unwrap();
    let source = source_of(&log);
    let file = dir.path().join("full.tlog");
    export(&source, &ReadRange::default(), &file).await;
    assert!(
        !dir.path().join("full.tlog.partial").exists(),
        "the partial file is renamed"
    );
    let header = ExportReader::open(&file).unwrap().header().clone();
    assert_eq!(
        (header.format.as_str(), header.version),
        ("tandem-export", 1)
    );
    let text = std::fs::read(&file).unwrap();
    assert!(
        text.starts_with(b"tandem-export v1\n{"),
        "the header is readable with head"
    );

    // Cut in the middle of the compressed records.
    let truncated = dir.path().join("truncated.tlog");
    std::fs::write(&truncated, &text[..text.len() * 2 / 3]).unwrap();
    let mut reader = ExportReader::open(&truncated).unwrap();
    let error = loop {
        match reader.next_message() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a truncated file read to its end"),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(error, ReplayError::CorruptExport { .. }),
        "{error}"
    );
    let scanned = Source::file(&truncated)
        .unwrap()
        .scan(&ReadRange::default(), &mut Progress::quiet(), |_| Ok(()))
        .await;
    assert!(
        scanned.is_err(),
        "a scan of a damaged file fails rather than ending early"
    );

    let foreign = dir.path().join("foreign.txt");
    std::fs::write(&foreign, "hello\nworld\n").unwrap();
    let error = Source::file(&foreign).unwrap_err();
    assert!(
        error.to_string().contains("is not a tandem export file"),
        "{error}"
    );
}
