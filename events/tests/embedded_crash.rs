//! The embedded log survives `kill -9` mid-append: every acknowledged append is there after reopening, nothing
//! half-written is read as a message, and appending goes on from the right sequence.
//!
//! The test re-runs its own binary as the appending child (selected by an environment variable), so the crash is
//! a real process death, not a dropped handle.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_events::Event;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, OutgoingMessage, StartAt};
use tandem_events::schema::{Body, TokensDecoded};

const CHILD_DIR_VAR: &str = "TANDEM_CRASH_CHILD_DIR";

fn checkpoint(index: u32) -> Event {
    Event::new(
        "crashreq",
        "crash-child",
        Body::TokensDecoded(TokensDecoded {
            decode_worker_id: "decode-crash".into(),
            start_index: index,
            // Big enough that a write in flight spans several pages.
            token_ids: (0..2048).map(|t| t ^ index).collect(),
            logprobs: vec![],
            text: None,
        }),
    )
}

/// The child: appends until killed, printing each acknowledged sequence.
#[test]
fn child_appender() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = EmbeddedLog::open(std::path::Path::new(&dir)).unwrap();
        let mut index = 0u32;
        loop {
            // Two appenders at once, so group commits hold several records when the kill lands.
            let first = OutgoingMessage::from_event(&checkpoint(index), index).unwrap();
            let second = OutgoingMessage::from_event(&checkpoint(index + 1), index + 1).unwrap();
            let (a, b) = tokio::join!(log.append(first), log.append(second));
            for (offset, ack) in [(0, a), (1, b)] {
                println!("acked {} {}", ack.unwrap().sequence, index + offset);
            }
            index += 2;
        }
    });
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    if std::env::var_os(CHILD_DIR_VAR).is_some() {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_appender",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR_VAR, data_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("acked ") {
            let mut parts = rest.split(' ');
            let sequence: u64 = parts.next().unwrap().parse().unwrap();
            let index: u32 = parts.next().unwrap().parse().unwrap();
            acked.push((sequence, index));
            if acked.len() >= 150 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acked.len() >= 150, "child stopped early");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = EmbeddedLog::open(data_dir.path()).unwrap();
        let last = log.last_sequence().await.unwrap();
        let stored = log.read(StartAt::Beginning, &[], 1_000_000).await.unwrap();
        assert_eq!(
            stored.len() as u64,
            last,
            "sequences are dense up to the last one"
        );
        for (position, message) in stored.iter().enumerate() {
            assert_eq!(message.sequence, position as u64 + 1);
            let event = message.event().expect("no torn record is read as an event");
            assert_eq!(event.id(), "crashreq");
        }
        for (sequence, index) in &acked {
            let message = &stored[(*sequence - 1) as usize];
            match message.event().unwrap().body() {
                Body::TokensDecoded(tokens) => assert_eq!(tokens.start_index, *index),
                other => panic!("unexpected {:?}", other.kind()),
            }
        }
        // The log goes on after the crash, and the dedup window still knows the acked ids.
        let (sequence, index) = acked[0];
        let retried = log.append_event(&checkpoint(index), index).await.unwrap();
        assert!(retried.duplicate);
        assert_eq!(retried.sequence, sequence);
        let fresh = log
            .append_event(&checkpoint(1_000_000), 1_000_000)
            .await
            .unwrap();
        assert_eq!(fresh.sequence, last + 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
