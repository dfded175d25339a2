//! The replay benchmark: a synthetic log of N events in an embedded data dir, then the time to read it, to rebuild
//! the projection in memory as `replay audit` does, and optionally to apply it to the scheduler's redb projection.

use std::path::Path;
use std::time::Instant;

use tandem_events::log::embedded::EmbeddedLog;
use tandem_scheduler::projection::Projection;

use crate::ReplayError;
use crate::audit::{AuditOptions, Rebuild};
use crate::source::{Progress, ReadRange, Source};
use crate::text::{bytes, thousands};

/// Messages per `apply_batch` when timing the scheduler's projection (the projector applies a fetch at a time).
const REDB_BATCH: usize = 4_096;

/// What was measured; times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchFigures {
    pub events: u64,
    pub requests: usize,
    pub log_bytes: u64,
    /// Writing the synthetic log (`None` when the data dir already held one).
    pub write_s: Option<f64>,
    pub read_decode_s: f64,
    pub rebuild_s: f64,
    pub rebuild_errors: usize,
    pub redb_projection_s: Option<f64>,
}

impl BenchFigures {
    pub fn render_text(&self) -> String {
        let rate = |seconds: f64| thousands((self.events as f64 / seconds.max(1e-9)) as u64);
        let mut out = format!(
            "log: {} events, {} requests, {} on disk\n",
            thousands(self.events),
            thousands(self.requests as u64),
            bytes(self.log_bytes)
        );
        if let Some(write_s) = self.write_s {
            out.push_str(&format!(
                "write synthetic log:        {write_s:>6.2} s  ({} events/s)\n",
                rate(write_s)
            ));
        }
        out.push_str(&format!(
            "read and decode:            {:>6.2} s  ({} events/s)\n",
            self.read_decode_s,
            rate(self.read_decode_s)
        ));
        out.push_str(&format!(
            "rebuild projection (audit): {:>6.2} s  ({} events/s), {} findings   goal: 1M events in ≤ 10 s\n",
            self.rebuild_s,
            rate(self.rebuild_s),
            self.rebuild_errors
        ));
        if let Some(redb_s) = self.redb_projection_s {
            out.push_str(&format!(
                "scheduler redb projection:  {redb_s:>6.2} s  ({} events/s)\n",
                rate(redb_s)
            ));
        }
        out
    }
}

/// Runs the benchmark on the log in `data_dir`, writing `events` synthetic events there first when it holds none.
pub async fn run(
    data_dir: &Path,
    events: u64,
    concurrency: usize,
    with_redb: bool,
) -> Result<BenchFigures, ReplayError> {
    let mut write_s = None;
    if !data_dir.join("events.redb").is_file() {
        let log = EmbeddedLog::open(data_dir)?;
        let started = Instant::now();
        crate::synthetic::write_log(&log, events, concurrency, 7).await?;
        write_s = Some(started.elapsed().as_secs_f64());
    }
    let source = Source::data_dir(data_dir)?;
    let log_bytes = std::fs::metadata(data_dir.join("events.redb"))
        .map_err(ReplayError::io(data_dir, "stat the log in"))?
        .len();

    let started = Instant::now();
    let summary = source
        .scan(&ReadRange::default(), &mut Progress::quiet(), |message| {
            // Decoded and dropped: what every command pays before its own work.
            let _ = message.event();
            Ok(())
        })
        .await?;
    let read_decode_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut rebuild = Rebuild::new(AuditOptions::default());
    source
        .scan(&ReadRange::default(), &mut Progress::quiet(), |message| {
            rebuild.observe(message);
            Ok(())
        })
        .await?;
    let requests = rebuild.request_count();
    let report = rebuild.finish(source.description());
    let rebuild_s = started.elapsed().as_secs_f64();

    let redb_projection_s = if with_redb {
        let path = data_dir.join("bench-projection.redb");
        let _ = std::fs::remove_file(&path);
        let mut projection = Projection::open(&path)?;
        let started = Instant::now();
        let mut batch = Vec::with_capacity(REDB_BATCH);
        let mut failure = None;
        source
            .scan(&ReadRange::default(), &mut Progress::stderr(), |message| {
                batch.push(message.clone());
                if batch.len() == REDB_BATCH {
                    if failure.is_none()
                        && let Err(error) = projection.apply_batch(&batch)
                    {
                        failure = Some(error);
                    }
                    batch.clear();
                }
                Ok(())
            })
            .await?;
        if let Some(error) = failure {
            return Err(error.into());
        }
        projection.apply_batch(&batch)?;
        let seconds = started.elapsed().as_secs_f64();
        drop(projection);
        let _ = std::fs::remove_file(&path);
        Some(seconds)
    } else {
        None
    };
    Ok(BenchFigures {
        events: summary.messages,
        requests,
        log_bytes,
        write_s,
        read_decode_s,
        rebuild_s,
        rebuild_errors: report.errors(),
        redb_projection_s,
    })
}
