//! Which requests a report covers: by id, by a worker that took part, by the state they are in at the end of the
//! read. (The time window is a [`crate::source::ReadRange`]: it limits what is read, not what is reported.)

use std::collections::{HashMap, HashSet};

use tandem_events::lifecycle::{RequestLifecycle, RequestState};
use tandem_events::log::LogMessage;

use crate::ReplayError;
use crate::phases::workers_named;

/// The states `--state` accepts, besides `live` and `terminal`.
const STATES: [RequestState; 13] = [
    RequestState::New,
    RequestState::Received,
    RequestState::Routed,
    RequestState::PrefillLocal,
    RequestState::PrefillQueued,
    RequestState::PrefillRunning,
    RequestState::PrefillDone,
    RequestState::KvTransferred,
    RequestState::Decoding,
    RequestState::Migrating,
    RequestState::Completed,
    RequestState::Failed,
    RequestState::Cancelled,
];

/// A state to select requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    Is(RequestState),
    /// Between `Received` and a terminal event.
    Live,
    Terminal,
}

impl StateFilter {
    /// `decoding`, `prefill_queued`, `PrefillQueued`, `live`, `terminal`...
    pub fn parse(text: &str) -> Result<StateFilter, ReplayError> {
        let wanted: String = text
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase();
        match wanted.as_str() {
            "live" => return Ok(StateFilter::Live),
            "terminal" => return Ok(StateFilter::Terminal),
            _ => {}
        }
        STATES
            .into_iter()
            .find(|state| format!("{state:?}").to_ascii_lowercase() == wanted)
            .map(StateFilter::Is)
            .ok_or_else(|| ReplayError::Invalid {
                what: "--state",
                reason: format!(
                    "{text:?} is not a request state; use live, terminal, or one of {}",
                    STATES
                        .iter()
                        .map(|state| format!("{state:?}").to_ascii_lowercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    pub fn matches(self, state: RequestState) -> bool {
        match self {
            StateFilter::Is(wanted) => state == wanted,
            StateFilter::Live => state.is_live(),
            StateFilter::Terminal => state.is_terminal(),
        }
    }
}

/// Selects requests; every field left `None` selects all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFilter {
    pub request_id: Option<String>,
    /// A worker that took part (routed to, prefilled, decoded, migrated from).
    pub worker: Option<String>,
    pub state: Option<StateFilter>,
}

impl RequestFilter {
    pub fn matches(&self, request_id: &str, workers: &[String], state: RequestState) -> bool {
        self.request_id.as_deref().is_none_or(|id| id == request_id)
            && self
                .worker
                .as_deref()
                .is_none_or(|worker| workers.iter().any(|w| w == worker))
            && self.state.is_none_or(|filter| filter.matches(state))
    }

    pub fn is_empty(&self) -> bool {
        self.request_id.is_none() && self.worker.is_none() && self.state.is_none()
    }

    /// The filter in words, for report headers.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.request_id {
            parts.push(format!("request {id}"));
        }
        if let Some(worker) = &self.worker {
            parts.push(format!("worker {worker}"));
        }
        if let Some(state) = &self.state {
            parts.push(match state {
                StateFilter::Is(state) => format!("state {state:?}"),
                StateFilter::Live => "live requests".into(),
                StateFilter::Terminal => "finished requests".into(),
            });
        }
        parts.join(", ")
    }
}

/// Finds the requests a filter selects, in a first pass over the log (a state is only known at the end of the
/// read); `export` then writes their events in a second pass.
#[derive(Debug, Default)]
pub struct RequestSelector {
    requests: HashMap<String, (RequestLifecycle, Vec<String>)>,
}

impl RequestSelector {
    pub fn observe(&mut self, message: &LogMessage) {
        let Ok(event) = message.event() else { return };
        if event.kind().is_worker_event() {
            return;
        }
        let (lifecycle, workers) = self.requests.entry(event.id().to_string()).or_default();
        // A violation leaves the lifecycle where it was; `audit` is where violations are reported.
        let _ = lifecycle.apply(event.body());
        for worker in workers_named(event.body()) {
            if !workers.iter().any(|known| known == worker) {
                workers.push(worker.to_string());
            }
        }
    }

    pub fn selected(&self, filter: &RequestFilter) -> HashSet<String> {
        self.requests
            .iter()
            .filter(|(id, (lifecycle, workers))| filter.matches(id, workers, lifecycle.state()))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_in_any_spelling() {
        assert_eq!(
            StateFilter::parse("prefill_queued").unwrap(),
            StateFilter::Is(RequestState::PrefillQueued)
        );
        assert_eq!(
            StateFilter::parse("Decoding").unwrap(),
            StateFilter::Is(RequestState::Decoding)
        );
        assert_eq!(StateFilter::parse("live").unwrap(), StateFilter::Live);
        assert!(StateFilter::parse("asleep").is_err());
        assert!(StateFilter::Live.matches(RequestState::Decoding));
        assert!(!StateFilter::Live.matches(RequestState::Completed));
    }
}
