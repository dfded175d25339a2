//! Choosing a decode worker: round-robin over the live ones. A plain function of plain data, so the choice is
//! tested without a runtime and its inputs go into the `Routed` event.

/// The worker chosen for a request and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub worker_id: String,
    pub reason: String,
}

/// Picks the worker after `previous` in sorted order (wrapping), or the first one; `None` when none is live.
pub fn round_robin(live_workers: &[String], previous: Option<&str>) -> Option<Choice> {
    let mut sorted: Vec<&String> = live_workers.iter().collect();
    sorted.sort();
    sorted.dedup();
    let next = match previous {
        Some(previous) => sorted
            .iter()
            .find(|worker| worker.as_str() > previous)
            .or_else(|| sorted.first()),
        None => sorted.first(),
    }?;
    Some(Choice {
        worker_id: (*next).clone(),
        reason: format!("round robin over {} live decode worker(s)", sorted.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn turns_through_workers_in_order_and_wraps() {
        let live = workers(&["d-b", "d-a", "d-c"]);
        let mut previous: Option<String> = None;
        let mut chosen = Vec::new();
        for _ in 0..4 {
            let choice = round_robin(&live, previous.as_deref()).unwrap();
            previous = Some(choice.worker_id.clone());
            chosen.push(choice.worker_id);
        }
        assert_eq!(chosen, vec!["d-a", "d-b", "d-c", "d-a"]);
    }

    #[test]
    fn a_vanished_previous_worker_moves_on_and_none_live_is_none() {
        let live = workers(&["d-a", "d-c"]);
        assert_eq!(round_robin(&live, Some("d-b")).unwrap().worker_id, "d-c");
        assert_eq!(round_robin(&[], None), None);
        assert!(round_robin(&live, None).unwrap().reason.contains("2 live"));
    }
}
