//! Choosing a decode worker for a request: the routing policies, as plain functions of plain data (the
//! candidates' cached prefix and load, read from the projection), so every choice is tested without a runtime and
//! its inputs go into the `Routed` event.
//!
//! The KV-aware policy is Dynamo's form: `cost = overlap_weight × blocks still to prefill after the cached
//! overlap + active decode blocks`, lowest wins; with a temperature above zero the choice is sampled from a
//! softmax over the negated costs instead (spreading load between near-equal workers). Workers that lack room for
//! the prompt's blocks are passed over while any other has room. Round-robin and random are baselines.

use std::hash::{DefaultHasher, Hash, Hasher};

use tandem_events::schema::WorkerScore;

/// How the scheduler picks a decode worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingPolicy {
    /// Cached-prefix overlap weighed against load.
    KvAware {
        /// Weight of a block still to prefill against one active decode block.
        overlap_weight: f64,
        /// 0: lowest cost wins; above 0: sample by softmax(-cost / temperature).
        temperature: f64,
    },
    RoundRobin,
    Random,
}

impl RoutingPolicy {
    /// The policy's name in `Routed.policy` and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            RoutingPolicy::KvAware { .. } => "kv",
            RoutingPolicy::RoundRobin => "round-robin",
            RoutingPolicy::Random => "random",
        }
    }

    /// Parses `kv`, `round-robin` or `random`; the KV-aware weights come from the caller.
    pub fn parse(
        name: &str,
        overlap_weight: f64,
        temperature: f64,
    ) -> Result<RoutingPolicy, String> {
        match name {
            "kv" | "kv-aware" => Ok(RoutingPolicy::KvAware {
                overlap_weight,
                temperature,
            }),
            "round-robin" | "round_robin" => Ok(RoutingPolicy::RoundRobin),
            "random" => Ok(RoutingPolicy::Random),
            other => Err(format!(
                "unknown routing policy {other:?}: use kv, round-robin or random"
            )),
        }
    }
}

/// A live decode worker as the projection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub worker_id: String,
    /// Leading blocks of the request's prompt this worker has cached.
    pub cached_prefix_blocks: u32,
    /// KV blocks held by its live requests (and routings decided but not yet on the log).
    pub active_decode_blocks: u32,
    pub active_sequences: u32,
    /// Its KV capacity in blocks (0: unknown).
    pub total_blocks: u32,
}

/// The worker chosen for a request, why, and every candidate's score.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub worker_id: String,
    pub reason: String,
    pub scores: Vec<WorkerScore>,
}

/// Picks a worker for `request_id` whose prompt spans `prompt_blocks` blocks; `None` when there is no candidate.
/// `previous` is the last worker round-robin chose.
pub fn choose(
    policy: RoutingPolicy,
    request_id: &str,
    prompt_blocks: u32,
    candidates: &[Candidate],
    previous: Option<&str>,
) -> Option<Choice> {
    if candidates.is_empty() {
        return None;
    }
    let overlap_weight = match policy {
        RoutingPolicy::KvAware { overlap_weight, .. } => overlap_weight,
        _ => 1.0,
    };
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    sorted.dedup_by(|a, b| a.worker_id == b.worker_id);
    let scores: Vec<WorkerScore> = sorted
        .iter()
        .map(|candidate| score(candidate, prompt_blocks, overlap_weight))
        .collect();
    let (index, reason) = match policy {
        RoutingPolicy::KvAware { temperature, .. } => {
            kv_aware(request_id, prompt_blocks, &sorted, &scores, temperature)
        }
        RoutingPolicy::RoundRobin => {
            let index = previous
                .and_then(|previous| {
                    sorted
                        .iter()
                        .position(|candidate| candidate.worker_id.as_str() > previous)
                })
                .unwrap_or(0);
            (
                index,
                format!("round robin over {} live decode worker(s)", sorted.len()),
            )
        }
        RoutingPolicy::Random => {
            let index = (request_hash(request_id, 0) % sorted.len() as u64) as usize;
            (
                index,
                format!(
                    "uniformly at random over {} live decode worker(s)",
                    sorted.len()
                ),
            )
        }
    };
    Some(Choice {
        worker_id: sorted[index].worker_id.clone(),
        reason,
        scores,
    })
}

fn score(candidate: &Candidate, prompt_blocks: u32, overlap_weight: f64) -> WorkerScore {
    let overlap_blocks = candidate.cached_prefix_blocks.min(prompt_blocks);
    let prefill_blocks = prompt_blocks - overlap_blocks;
    WorkerScore {
        worker_id: candidate.worker_id.clone(),
        overlap_blocks,
        prefill_blocks,
        active_decode_blocks: candidate.active_decode_blocks,
        cost: overlap_weight * f64::from(prefill_blocks)
            + f64::from(candidate.active_decode_blocks),
    }
}

fn has_room(candidate: &Candidate, prompt_blocks: u32) -> bool {
    candidate.total_blocks == 0
        || candidate
            .total_blocks
            .saturating_sub(candidate.active_decode_blocks)
            > prompt_blocks
}

fn kv_aware(
    request_id: &str,
    prompt_blocks: u32,
    sorted: &[&Candidate],
    scores: &[WorkerScore],
    temperature: f64,
) -> (usize, String) {
    let with_room: Vec<usize> = (0..sorted.len())
        .filter(|&index| has_room(sorted[index], prompt_blocks))
        .collect();
    let eligible = if with_room.is_empty() {
        (0..sorted.len()).collect()
    } else {
        with_room
    };
    let index = if temperature > 0.0 {
        sample_softmax(request_id, &eligible, scores, temperature)
    } else {
        // Lowest cost; then fewer running sequences; then a per-request order, so equal workers share the load
        // instead of the first id taking every tie.
        *eligible
            .iter()
            .min_by(|&&a, &&b| {
                scores[a]
                    .cost
                    .total_cmp(&scores[b].cost)
                    .then(sorted[a].active_sequences.cmp(&sorted[b].active_sequences))
                    .then(
                        request_hash(request_id, a as u64).cmp(&request_hash(request_id, b as u64)),
                    )
            })
            .unwrap_or(&0)
    };
    let chosen = &scores[index];
    let reason = format!(
        "kv-aware: {} of {} prompt blocks cached there, {} to prefill, {} active decode blocks, cost {:.1} \
         (lowest of {}{})",
        chosen.overlap_blocks,
        prompt_blocks,
        chosen.prefill_blocks,
        chosen.active_decode_blocks,
        chosen.cost,
        eligible.len(),
        if temperature > 0.0 {
            format!(", sampled at temperature {temperature}")
        } else {
            String::new()
        }
    );
    (index, reason)
}

/// Samples an index from `eligible` with probability ∝ exp(-(cost - min cost) / temperature), from a draw
/// derived from the request id: a redelivered request is routed the same way.
fn sample_softmax(
    request_id: &str,
    eligible: &[usize],
    scores: &[WorkerScore],
    temperature: f64,
) -> usize {
    let min_cost = eligible
        .iter()
        .map(|&index| scores[index].cost)
        .fold(f64::INFINITY, f64::min);
    let weights: Vec<f64> = eligible
        .iter()
        .map(|&index| (-(scores[index].cost - min_cost) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let draw = (request_hash(request_id, u64::MAX) >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut running = 0.0;
    for (position, weight) in weights.iter().enumerate() {
        running += weight;
        if draw < running {
            return eligible[position];
        }
    }
    eligible[eligible.len() - 1]
}

fn request_hash(request_id: &str, salt: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    request_id.hash(&mut hasher);
    salt.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, cached: u32, active_blocks: u32) -> Candidate {
        Candidate {
            worker_id: id.into(),
            cached_prefix_blocks: cached,
            active_decode_blocks: active_blocks,
            active_sequences: active_blocks / 4,
            total_blocks: 1000,
        }
    }

    const KV: RoutingPolicy = RoutingPolicy::KvAware {
        overlap_weight: 1.0,
        temperature: 0.0,
    };

    #[test]
    fn kv_aware_prefers_the_cached_prefix_until_load_outweighs_it() {
        let candidates = [candidate("d-a", 0, 10), candidate("d-b", 8, 10)];
        let choice = choose(KV, "r1", 10, &candidates, None).unwrap();
        assert_eq!(choice.worker_id, "d-b");
        assert_eq!(choice.scores.len(), 2);
        assert_eq!(choice.scores[1].overlap_blocks, 8);
        assert_eq!(choice.scores[1].prefill_blocks, 2);
        assert_eq!(choice.scores[1].cost, 12.0);
        assert_eq!(choice.scores[0].cost, 20.0);
        assert!(choice.reason.contains("8 of 10"), "{}", choice.reason);

        // d-b is busier by more than the 8 blocks it saves.
        let candidates = [candidate("d-a", 0, 10), candidate("d-b", 8, 19)];
        assert_eq!(
            choose(KV, "r1", 10, &candidates, None).unwrap().worker_id,
            "d-a"
        );

        // A heavier overlap weight makes the cache count for more.
        let heavy = RoutingPolicy::KvAware {
            overlap_weight: 2.0,
            temperature: 0.0,
        };
        assert_eq!(
            choose(heavy, "r1", 10, &candidates, None)
                .unwrap()
                .worker_id,
            "d-b"
        );
    }

    #[test]
    fn workers_without_room_are_passed_over_while_another_has_room() {
        let mut full = candidate("d-a", 10, 990);
        full.total_blocks = 1000;
        let roomy = candidate("d-b", 0, 0);
        let chosen = choose(KV, "r", 10, &[full.clone(), roomy], None).unwrap();
        assert_eq!(chosen.worker_id, "d-b");
        // When none has room, the cheapest still wins (the worker queues it).
        assert_eq!(choose(KV, "r", 10, &[full], None).unwrap().worker_id, "d-a");
    }

    #[test]
    fn ties_spread_over_requests_and_sampling_is_deterministic_per_request() {
        let candidates = [candidate("d-a", 0, 0), candidate("d-b", 0, 0)];
        let chosen: std::collections::HashSet<String> = (0..32)
            .map(|i| {
                choose(KV, &format!("req-{i}"), 4, &candidates, None)
                    .unwrap()
                    .worker_id
            })
            .collect();
        assert_eq!(chosen.len(), 2, "equal workers both get requests");

        let warm = RoutingPolicy::KvAware {
            overlap_weight: 1.0,
            temperature: 2.0,
        };
        let candidates = [candidate("d-a", 0, 0), candidate("d-b", 6, 0)];
        let first = choose(warm, "req-x", 8, &candidates, None).unwrap();
        assert_eq!(first, choose(warm, "req-x", 8, &candidates, None).unwrap());
        let to_cached = (0..400)
            .filter(|i| {
                choose(warm, &format!("req-{i}"), 8, &candidates, None)
                    .unwrap()
                    .worker_id
                    == "d-b"
            })
            .count();
        // exp(-6/2) ≈ 0.05: the cached worker gets about 95 %.
        assert!((340..=400).contains(&to_cached), "{to_cached}");
    }

    #[test]
    fn round_robin_turns_and_random_covers_every_worker() {
        let candidates = [
            candidate("d-b", 0, 0),
            candidate("d-a", 0, 0),
            candidate("d-c", 0, 0),
        ];
        let mut previous: Option<String> = None;
        let mut order = Vec::new();
        for _ in 0..4 {
            let choice = choose(
                RoutingPolicy::RoundRobin,
                "r",
                1,
                &candidates,
                previous.as_deref(),
            )
            .unwrap();
            previous = Some(choice.worker_id.clone());
            order.push(choice.worker_id);
        }
        assert_eq!(order, ["d-a", "d-b", "d-c", "d-a"]);
        let random: std::collections::HashSet<String> = (0..64)
            .map(|i| {
                choose(
                    RoutingPolicy::Random,
                    &format!("r{i}"),
                    1,
                    &candidates,
                    None,
                )
                .unwrap()
                .worker_id
            })
            .collect();
        assert_eq!(random.len(), 3);
        assert!(choose(KV, "r", 1, &[], None).is_none());
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!(
            RoutingPolicy::parse("round-robin", 1.0, 0.0),
            Ok(RoutingPolicy::RoundRobin)
        );
        assert_eq!(RoutingPolicy::parse("kv", 1.0, 0.0).unwrap().name(), "kv");
        assert!(RoutingPolicy::parse("fastest", 1.0, 0.0).is_err());
    }
}
