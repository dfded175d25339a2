//! Where an eager step's time goes, for measuring: with `TANDEM_CUDA_LAUNCH_TIMES=1` the backend records a CUDA
//! event after each kind of launch of a prefill or mixed step, or of the eager decode step that precedes each
//! graph capture, and once the step has finished the time between consecutive events is summed per kind and
//! logged (one `info` line per step). The events cost a little, and they keep programmatic launch from
//! overlapping the kernels around them, so the totals run over an untimed step's. Captured decode graphs are
//! never timed.

use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use super::device::{CudaError, DriverContext};

/// The events of the step in flight, each after the launches of its kind.
pub(crate) struct LaunchTimes {
    marks: Mutex<Vec<(&'static str, CudaEvent)>>,
}

impl LaunchTimes {
    /// `Some` when `TANDEM_CUDA_LAUNCH_TIMES=1`.
    pub(crate) fn from_env() -> Option<Self> {
        let wanted = std::env::var("TANDEM_CUDA_LAUNCH_TIMES").is_ok_and(|value| value == "1");
        wanted.then(|| Self {
            marks: Mutex::new(Vec::new()),
        })
    }

    /// Starts timing a step: forgets the marks of any step that failed before its report, and records the
    /// event the step's first kind is timed from.
    pub(crate) fn start(&self, stream: &CudaStream) -> Result<(), CudaError> {
        self.lock().clear();
        self.mark(stream, "start")
    }

    /// Records an event on `stream` after the launches of `kind`.
    pub(crate) fn mark(&self, stream: &CudaStream, kind: &'static str) -> Result<(), CudaError> {
        let event = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .during(|| format!("recording the launch-time event after {kind}"))?;
        self.lock().push((kind, event));
        Ok(())
    }

    /// Once the step's work has finished: logs the time per kind of its `tokens`-token step and forgets it.
    pub(crate) fn report(&self, tokens: usize) -> Result<(), CudaError> {
        let marks = std::mem::take(&mut *self.lock());
        let mut spans = Vec::with_capacity(marks.len());
        for pair in marks.windows(2) {
            let milliseconds = pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .during(|| "reading the launch-time events".into())?;
            spans.push((pair[1].0, milliseconds));
        }
        if spans.is_empty() {
            return Ok(());
        }
        let totals = totals_per_kind(spans);
        let total: f32 = totals.iter().map(|(_, milliseconds)| milliseconds).sum();
        let kinds = totals
            .iter()
            .map(|(kind, milliseconds)| format!("{kind} {milliseconds:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!("launch times of a {tokens}-token step (ms): total {total:.3}: {kinds}");
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, CudaEvent)>> {
        // A panic while the list was held leaves it whole: only pushes, clears and takes touch it.
        self.marks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sums the spans of each kind, in the order the kinds first appear.
fn totals_per_kind(spans: Vec<(&'static str, f32)>) -> Vec<(&'static str, f32)> {
    let mut totals: Vec<(&'static str, f32)> = Vec::new();
    for (kind, milliseconds) in spans {
        match totals.iter_mut().find(|(seen, _)| *seen == kind) {
            Some((_, total)) => *total += milliseconds,
            None => totals.push((kind, milliseconds)),
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_per_kind_in_first_seen_order() {
        let spans = vec![
            ("embed", 0.5),
            ("qkv_proj", 1.0),
            ("attention", 2.0),
            ("qkv_proj", 1.5),
            ("attention", 3.0),
            ("lm_head", 0.25),
        ];
        assert_eq!(
            totals_per_kind(spans),
            vec![
                ("embed", 0.5),
                ("qkv_proj", 2.5),
                ("attention", 5.0),
                ("lm_head", 0.25)
            ]
        );
    }
}
