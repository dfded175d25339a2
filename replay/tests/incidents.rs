//! A log with known incidents (a stuck request, an illegal order, a migrated request, a redelivered prefill)
//! beside healthy requests: `audit` finds exactly those, `timeline` shows them.

mod support;

use std::collections::BTreeMap;

use support::*;
use tandem_events::log::EventLog;
use tandem_events::log::OutgoingMessage;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_replay::audit::{AuditOptions, AuditReport, FindingKind, Rebuild};
use tandem_replay::filter::{RequestFilter, StateFilter};
use tandem_replay::source::{Progress, ReadRange, Source};
use tandem_replay::synthetic::Occurrences;
use tandem_replay::timeline::{Timeline, read_request};
use tandem_scheduler::projection::Projection;

const HEALTHY_REMOTE: &str = "01KAXHEALTHYREMOTE00000001";
const HEALTHY_LOCAL: &str = "01KAXHEALTHYLOCAL000000001";
const STUCK: &str = "01KAXSTUCK0000000000000001";
const ILLEGAL: &str = "01KAXILLEGAL00000000000001";
const MIGRATED: &str = "01KAXM1GRATED0000000000001";
const REDELIVERED: &str = "01KAXREDE11VERED0000000001";
const LATE: &str = "01KAXLATE00000000000000001";

const KV_BLOCK_BYTES: u64 = 4096;

fn incident_flows() -> Vec<Flow> {
    vec![
        Flow::new(HEALTHY_REMOTE, T0)
            .at(0, "gateway-0", received(40))
            .at(1, "scheduler-0", routed("decode-0", 1))
            .at(2, "decode-0", queued("decode-0", 40, 3))
            .at(5, "prefill-0", prefill_started("prefill-0", 1))
            .at(25, "prefill-0", prefill_done("prefill-0"))
            .at(
                28,
                "prefill-0",
                kv("prefill-0", "decode-0", 3, KV_BLOCK_BYTES),
            )
            .at(29, "decode-0", decode_started("decode-0"))
            .at(60, "decode-0", tokens("decode-0", 0, 16))
            .at(90, "decode-0", tokens("decode-0", 16, 8))
            .at(91, "decode-0", completed("decode-0", 24)),
        Flow::new(HEALTHY_LOCAL, T0 + 10 * MS)
            .at(0, "gateway-0", received(8))
            .at(2, "scheduler-0", routed("decode-1", 1))
            .at(3, "decode-1", local("decode-1"))
            .at(6, "decode-1", decode_started("decode-1"))
            .at(40, "decode-1", tokens("decode-1", 0, 16))
            .at(41, "decode-1", completed("decode-1", 16)),
        // Taken by a prefill worker that never came back; nothing follows.
        Flow::new(STUCK, T0 + 20 * MS)
            .at(0, "gateway-0", received(40))
            .at(1, "scheduler-0", routed("decode-0", 1))
            .at(2, "decode-0", queued("decode-0", 40, 3))
            .at(4, "prefill-1", prefill_started("prefill-1", 1)),
        // Writes token index 8 twice: the second checkpoint starts inside the first.
        Flow::new(ILLEGAL, T0 + 30 * MS)
            .at(0, "gateway-0", received(8))
            .at(1, "scheduler-0", routed("decode-1", 1))
            .at(2, "decode-1", local("decode-1"))
            .at(5, "decode-1", decode_started("decode-1"))
            .at(30, "decode-1", tokens("decode-1", 0, 16))
            .at(50, "decode-1", tokens("decode-1", 8, 16))
            .at(60, "decode-1", tokens("decode-1", 16, 8))
            .at(61, "decode-1", completed("decode-1", 24)),
        Flow::new(MIGRATED, T0 + 40 * MS)
            .at(0, "gateway-0", received(8))
            .at(1, "scheduler-0", routed("decode-0", 1))
            .at(2, "decode-0", local("decode-0"))
            .at(5, "decode-0", decode_started("decode-0"))
            .at(30, "decode-0", tokens("decode-0", 0, 16))
            .at(2_000, "scheduler-0", migrated("decode-0", 16))
            .at(2_001, "scheduler-0", routed("decode-1", 2))
            .at(2_002, "decode-1", local("decode-1"))
            .at(2_010, "decode-1", decode_started("decode-1"))
            .at(2_040, "decode-1", tokens("decode-1", 16, 16))
            .at(2_041, "decode-1", completed("decode-1", 32)),
        Flow::new(REDELIVERED, T0 + 50 * MS)
            .at(0, "gateway-0", received(40))
            .at(1, "scheduler-0", routed("decode-0", 1))
            .at(2, "decode-0", queued("decode-0", 40, 3))
            .at(4, "prefill-0", prefill_started("prefill-0", 1))
            .at(10_004, "prefill-1", prefill_started("prefill-1", 2))
            .at(10_030, "prefill-1", prefill_done("prefill-1"))
            .at(
                10_032,
                "prefill-1",
                kv("prefill-1", "decode-0", 3, KV_BLOCK_BYTES),
            )
            .at(10_033, "decode-0", decode_started("decode-0"))
            .at(10_060, "decode-0", tokens("decode-0", 0, 16))
            .at(10_061, "decode-0", completed("decode-0", 16)),
        // Ten minutes later: the end of the log, so the stuck request has been quiet for that long; this one is
        // live but recent.
        Flow::new(LATE, T0 + 600_000 * MS)
            .at(0, "gateway-0", received(8))
            .at(1, "scheduler-0", routed("decode-1", 1)),
    ]
}

async fn incident_log(dir: &std::path::Path) -> EmbeddedLog {
    let log = EmbeddedLog::open(dir).expect("open log");
    let mut occurrences = Occurrences::default();
    append(&log, &mut occurrences, &interleave(incident_flows())).await;
    log
}

async fn audit(source: &Source, options: AuditOptions) -> AuditReport {
    let mut rebuild = Rebuild::new(options);
    source
        .scan(&ReadRange::default(), &mut Progress::quiet(), |message| {
            rebuild.observe(message);
            Ok(())
        })
        .await
        .expect("scan");
    rebuild.finish(source.description())
}

fn kinds_by_request(report: &AuditReport) -> BTreeMap<String, Vec<FindingKind>> {
    let mut kinds: BTreeMap<String, Vec<FindingKind>> = BTreeMap::new();
    for finding in &report.findings {
        kinds
            .entry(finding.request_id.clone())
            .or_default()
            .push(finding.kind);
    }
    kinds
}

#[tokio::test]
async fn audit_finds_exactly_the_incidents() {
    let dir = tempfile::tempdir().unwrap();
    let log = incident_log(dir.path()).await;
    let report = audit(&source_of(&log), AuditOptions::default()).await;

    let expected: BTreeMap<String, Vec<FindingKind>> = [
        (STUCK, FindingKind::Stuck),
        (ILLEGAL, FindingKind::IllegalOrder),
        (MIGRATED, FindingKind::Migrated),
        (REDELIVERED, FindingKind::PrefillRedelivered),
    ]
    .into_iter()
    .map(|(id, kind)| (id.to_string(), vec![kind]))
    .collect();
    assert_eq!(
        kinds_by_request(&report),
        expected,
        "{}",
        report.render_text()
    );
    assert_eq!(report.errors(), 2, "stuck and illegal order are errors");
    assert_eq!(report.notices(), 2, "migration and redelivery are notices");
    assert_eq!(report.requests, 7);
    assert_eq!(
        (report.completed, report.live),
        (5, 1),
        "LATE is live, not stuck"
    );

    // Each finding lists its events: the illegal checkpoint is among them, the stuck request's last step too.
    let illegal = report
        .findings
        .iter()
        .find(|f| f.request_id == ILLEGAL)
        .unwrap();
    assert!(
        illegal.summary.contains("written twice"),
        "{}",
        illegal.summary
    );
    assert_eq!(illegal.events.last().unwrap().kind, "tokens_decoded");
    let stuck = report
        .findings
        .iter()
        .find(|f| f.request_id == STUCK)
        .unwrap();
    assert_eq!(stuck.events.last().unwrap().kind, "prefill_started");
    assert!(
        stuck.summary.contains("PrefillRunning"),
        "{}",
        stuck.summary
    );

    let text = report.render_text();
    assert!(text.contains("2 errors, 2 notices"), "{text}");
}

#[tokio::test]
async fn audit_filters_select_the_requests_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = incident_log(dir.path()).await;
    let source = source_of(&log);
    let on_decode_1 = audit(
        &source,
        AuditOptions {
            filter: RequestFilter {
                worker: Some("decode-1".into()),
                ..RequestFilter::default()
            },
            ..AuditOptions::default()
        },
    )
    .await;
    let ids: Vec<&str> = on_decode_1
        .findings
        .iter()
        .map(|f| f.request_id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec![ILLEGAL, MIGRATED],
        "requests decode-1 took part in"
    );

    let live = audit(
        &source,
        AuditOptions {
            filter: RequestFilter {
                state: Some(StateFilter::Live),
                ..RequestFilter::default()
            },
            ..AuditOptions::default()
        },
    )
    .await;
    assert_eq!(
        kinds_by_request(&live).keys().collect::<Vec<_>>(),
        vec![STUCK]
    );

    // The stuck request has been quiet for ten minutes when the log ends: a looser threshold lets it be live.
    let lenient = audit(
        &source,
        AuditOptions {
            stuck_after_ns: 11 * 60_000 * MS,
            ..AuditOptions::default()
        },
    )
    .await;
    assert_eq!(lenient.counts().get(&FindingKind::Stuck), None);
    assert_eq!(lenient.live, 2);
}

#[tokio::test]
async fn timeline_shows_each_incident() {
    let dir = tempfile::tempdir().unwrap();
    let log = incident_log(dir.path()).await;
    let source = source_of(&log);
    let timeline = |id: &'static str| {
        let source = &source;
        async move {
            let messages = read_request(source, id, &mut Progress::quiet())
                .await
                .unwrap();
            Timeline::build(id, source.description(), &messages)
        }
    };

    let healthy = timeline(HEALTHY_REMOTE).await;
    assert_eq!(healthy.events.len(), 10);
    assert_eq!(healthy.state, "Completed");
    assert_eq!(healthy.durations.route_ns, Some(MS));
    assert_eq!(healthy.durations.queue_wait_ns, Some(3 * MS));
    assert_eq!(healthy.durations.prefill_ns, Some(20 * MS));
    assert_eq!(healthy.durations.kv_transfer_ns, Some(3 * MS));
    assert_eq!(healthy.durations.ttft_ns, Some(29 * MS));
    assert_eq!(healthy.durations.decode_ns, Some(62 * MS));
    assert_eq!(
        healthy.routings[0].scores.len(),
        2,
        "routing scores are shown"
    );
    assert_eq!(healthy.workers, vec!["decode-0", "prefill-0"]);
    let gaps = healthy.token_gaps.unwrap();
    assert_eq!((gaps.checkpoints, gaps.tokens), (2, 24));

    let illegal = timeline(ILLEGAL).await;
    assert_eq!(illegal.violations, 1);
    let flagged: Vec<u64> = illegal
        .events
        .iter()
        .filter(|e| e.lifecycle.starts_with("VIOLATION"))
        .map(|e| e.sequence)
        .collect();
    assert_eq!(flagged.len(), 1);
    assert!(
        illegal
            .render_text()
            .contains("VIOLATION: tokens_decoded in state Decoding")
    );

    let migrated = timeline(MIGRATED).await;
    assert_eq!(migrated.migrations.len(), 1);
    assert_eq!(migrated.migrations[0].from_worker_id, "decode-0");
    assert_eq!(
        migrated
            .routings
            .iter()
            .map(|r| r.attempt)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(migrated.workers, vec!["decode-0", "decode-1"]);
    assert_eq!(migrated.completion_tokens, 32);
    assert!(
        migrated
            .spans
            .iter()
            .any(|s| s.lane == "decode" && s.label.contains("(migrated)"))
    );
    let svg = migrated.render_svg();
    assert!(
        svg.starts_with("<svg") && svg.contains("migrated: off decode-0"),
        "{svg}"
    );

    let redelivered = timeline(REDELIVERED).await;
    assert_eq!(redelivered.prefill_attempts, 2);
    assert_eq!(
        redelivered.durations.queue_wait_ns,
        Some(2 * MS),
        "from the queue to the first take"
    );
    assert!(redelivered.render_text().contains("REDELIVERED"));
    assert!(
        redelivered
            .spans
            .iter()
            .any(|s| s.label.starts_with("prefill (redelivered)"))
    );

    let stuck = timeline(STUCK).await;
    assert_eq!(stuck.state, "PrefillRunning");
    assert!(
        stuck.spans.iter().any(|s| s.open && s.lane == "prefill"),
        "{:?}",
        stuck.spans
    );
    assert!(stuck.render_html().contains("<!doctype html>"));
}

#[tokio::test]
async fn a_request_not_on_the_log_is_an_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = incident_log(dir.path()).await;
    let error = read_request(
        &source_of(&log),
        "01KAXNOTTHERE0000000000001",
        &mut Progress::quiet(),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("is not on the log"), "{error}");
}

#[tokio::test]
async fn kv_mismatches_unfinished_prefills_and_malformed_payloads_are_findings() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path()).unwrap();
    let mut occurrences = Occurrences::default();
    let flows = vec![
        // 40 tokens need 3 blocks of 16; the destination reserves 2 and the transfer moves 3.
        Flow::new("01KAXKVM1SMATCH00000000001", T0)
            .at(0, "gateway-0", received(40))
            .at(1, "scheduler-0", routed("decode-0", 1))
            .at(2, "decode-0", queued("decode-0", 40, 2))
            .at(3, "prefill-0", prefill_started("prefill-0", 1))
            .at(10, "prefill-0", prefill_done("prefill-0"))
            .at(
                11,
                "prefill-0",
                kv("prefill-0", "decode-0", 3, KV_BLOCK_BYTES),
            )
            .at(12, "decode-0", decode_started("decode-0"))
            .at(20, "decode-0", tokens("decode-0", 0, 4))
            .at(21, "decode-0", completed("decode-0", 4)),
        // Decoding started and completed, but the prefill worker's PrefillDone never came.
        Flow::new("01KAXUNF1N1SHED00000000001", T0 + MS)
            .at(0, "gateway-0", received(40))
            .at(1, "scheduler-0", routed("decode-1", 1))
            .at(2, "decode-1", queued("decode-1", 40, 3))
            .at(3, "prefill-0", prefill_started("prefill-0", 1))
            .at(12, "decode-1", decode_started("decode-1"))
            .at(20, "decode-1", tokens("decode-1", 0, 4))
            .at(21, "decode-1", completed("decode-1", 4)),
    ];
    append(&log, &mut occurrences, &interleave(flows)).await;
    log.append(OutgoingMessage {
        subject: "tandem.ev.received.01KAXGARBAGE0000000000001".into(),
        dedup_id: "garbage".into(),
        payload: bytes::Bytes::from_static(&[0xff, 0xff, 0xff]),
    })
    .await
    .unwrap();

    let report = audit(&source_of(&log), AuditOptions::default()).await;
    let counts = report.counts();
    assert_eq!(
        counts.get(&FindingKind::KvMismatch),
        Some(&2),
        "{}",
        report.render_text()
    );
    assert_eq!(counts.get(&FindingKind::PrefillUnfinished), Some(&1));
    assert_eq!(counts.get(&FindingKind::Malformed), Some(&1));
    assert_eq!(report.findings.len(), 4, "{}", report.render_text());
    let kv_summaries: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::KvMismatch)
        .map(|f| f.summary.as_str())
        .collect();
    assert!(
        kv_summaries[0].contains("needs 3 blocks"),
        "{kv_summaries:?}"
    );
    assert!(
        kv_summaries[1].contains("moved 3 blocks into a destination of 2"),
        "{kv_summaries:?}"
    );
}

#[tokio::test]
async fn the_schedulers_projection_matches_the_rebuild_and_a_wrong_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = incident_log(&dir.path().join("log")).await;
    let source = source_of(&log);
    let messages = read_all(&log).await;

    let mut rebuild = Rebuild::new(AuditOptions::default());
    for message in &messages {
        rebuild.observe(message);
    }

    let faithful = Projection::open(&dir.path().join("faithful.redb")).unwrap();
    let mut faithful = faithful;
    faithful.apply_batch(&messages).unwrap();
    let check = rebuild
        .compare_with_projection(&faithful, "faithful.redb")
        .unwrap();
    assert_eq!(check.comparison.differences, 0, "{:?}", check.findings);
    assert_eq!(check.comparison.requests_compared, 7);
    assert_eq!(
        check.comparison.last_applied_sequence,
        messages.last().unwrap().sequence
    );

    // A projection that missed the completion of one request (as a lost message would leave it).
    let completion = messages
        .iter()
        .find(|m| m.subject == format!("tandem.ev.completed.{HEALTHY_LOCAL}"))
        .unwrap()
        .sequence;
    let mut wrong = Projection::open(&dir.path().join("wrong.redb")).unwrap();
    let mut lossy = messages.clone();
    // Keep the sequence dense for the projection: the lost completion becomes a heartbeat-free no-op payload of
    // another request's repeat (the previous message again, under the lost one's sequence).
    let index = lossy.iter().position(|m| m.sequence == completion).unwrap();
    lossy[index].payload = lossy[index - 1].payload.clone();
    lossy[index].subject = lossy[index - 1].subject.clone();
    wrong.apply_batch(&lossy).unwrap();
    let check = rebuild
        .compare_with_projection(&wrong, "wrong.redb")
        .unwrap();
    assert!(check.comparison.differences >= 1);
    let mismatch = check
        .findings
        .iter()
        .find(|f| f.request_id == HEALTHY_LOCAL)
        .unwrap_or_else(|| panic!("{:?}", check.findings));
    assert!(
        mismatch
            .summary
            .contains("state: \"Decoding\" in the projection, \"Completed\" from the log"),
        "{}",
        mismatch.summary
    );

    let mut report = rebuild.finish(source.description());
    report.attach_projection(check);
    assert!(report.render_text().contains("projection wrong.redb"));
}
