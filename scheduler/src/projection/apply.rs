//! How one accepted event changes a request's or a worker's record: plain functions of plain data, with no
//! storage, so the fold is the same for a live projection and a rebuild.

use tandem_events::Event;
use tandem_events::lifecycle::RequestLifecycle;
use tandem_events::schema::Body;

use super::tables::{RequestRecord, WorkerRecord};

/// Folds a request event that the lifecycle just advanced on (`lifecycle` is its state after the event) into the
/// request's record. Repeats and work landing after a cancellation change nothing and are not passed here.
pub fn fold_request_event(
    record: &mut RequestRecord,
    event: &Event,
    sequence: u64,
    lifecycle: &RequestLifecycle,
) {
    let at_ns = event.timestamp_ns();
    match event.body() {
        Body::Received(received) => {
            record.model = received.model.clone();
            record.prompt_tokens = received.prompt_tokens;
            record.received_at_ns = Some(at_ns);
            record.received_sequence = sequence;
        }
        Body::Routed(routed) => {
            record.routed_at_ns = Some(at_ns);
            record.decode_worker_id = routed.decode_worker_id.clone();
            record.routing_attempts += 1;
        }
        Body::PrefillLocal(local) => {
            record.prefill_local_at_ns = Some(at_ns);
            record.decode_worker_id = local.decode_worker_id.clone();
        }
        Body::PrefillQueued(queued) => {
            record.prefill_queued_at_ns = Some(at_ns);
            record.decode_worker_id = queued.decode_worker_id.clone();
        }
        Body::PrefillStarted(started) => {
            record.prefill_started_at_ns = Some(at_ns);
            record.prefill_worker_id = started.prefill_worker_id.clone();
        }
        Body::PrefillDone(done) => {
            record.prefill_done_at_ns = Some(at_ns);
            record.prefill_worker_id = done.prefill_worker_id.clone();
        }
        Body::KvTransferred(_) => record.kv_transferred_at_ns = Some(at_ns),
        Body::DecodeStarted(started) => {
            record.decode_started_at_ns = Some(at_ns);
            record.decode_worker_id = started.decode_worker_id.clone();
        }
        Body::TokensDecoded(_) => {
            record.first_checkpoint_at_ns.get_or_insert(at_ns);
            record.last_checkpoint_at_ns = Some(at_ns);
        }
        Body::Migrated(_) => {
            // The request starts over on another decode worker: its per-attempt phases begin again, while the
            // checkpointed tokens (and when they were written) stay.
            record.migrations += 1;
            record.prefill_local_at_ns = None;
            record.prefill_queued_at_ns = None;
            record.prefill_started_at_ns = None;
            record.prefill_done_at_ns = None;
            record.kv_transferred_at_ns = None;
            record.decode_started_at_ns = None;
            record.prefill_worker_id.clear();
        }
        Body::Completed(completed) => {
            record.terminal_at_ns = Some(at_ns);
            record.finish_reason = completed.finish_reason.clone();
            record.completion_tokens = completed.completion_tokens;
        }
        Body::Failed(failed) => {
            record.terminal_at_ns = Some(at_ns);
            record.failure_reason = failed.reason.clone();
        }
        Body::Cancelled(cancelled) => {
            record.terminal_at_ns = Some(at_ns);
            record.failure_reason = cancelled.reason.clone();
        }
        Body::WorkerJoined(_)
        | Body::WorkerHeartbeat(_)
        | Body::WorkerLeft(_)
        | Body::WorkerLost(_)
        | Body::KvBlocksStored(_)
        | Body::KvBlocksRemoved(_) => {}
    }
    record.state = format!("{:?}", lifecycle.state());
    record.tokens_checkpointed = lifecycle.tokens_checkpointed();
    record.last_event_sequence = sequence;
    record.last_event_at_ns = Some(at_ns);
}

/// KV blocks a request holds on its decode worker: its prompt and checkpointed tokens in whole blocks (the
/// block being filled counts). 0 when the block size is unknown.
pub fn request_kv_blocks(record: &RequestRecord) -> u32 {
    let tokens = record.prompt_tokens + record.tokens_checkpointed;
    match record.block_size_tokens {
        0 => 0,
        block_size => tokens.div_ceil(block_size),
    }
}

/// Folds a worker event into the worker's record. Returns false for worker events the record does not track
/// (KV block announcements feed the prefix index, which is not part of this projection).
pub fn fold_worker_event(record: &mut WorkerRecord, event: &Event) -> bool {
    let at_ns = event.timestamp_ns();
    match event.body() {
        Body::WorkerJoined(joined) => {
            record.role = joined.role.clone();
            record.device = joined.device.clone();
            record.model = joined.model.clone();
            record.transfer_endpoint = joined.transfer_endpoint.clone();
            record.total_blocks = joined.total_blocks;
            record.block_size_tokens = joined.block_size_tokens;
            record.max_batch_sequences = joined.max_batch_sequences;
            record.joined_at_ns = Some(at_ns);
            record.left_at_ns = None;
            record.lost_at_ns = None;
            record.departure_reason.clear();
        }
        Body::WorkerHeartbeat(heartbeat) => {
            record.last_heartbeat_at_ns = Some(at_ns);
            record.active_sequences = heartbeat.active_sequences;
            record.waiting_sequences = heartbeat.waiting_sequences;
            record.free_blocks = heartbeat.free_blocks;
            record.queued_prefill_tokens = heartbeat.queued_prefill_tokens;
        }
        Body::WorkerLeft(left) => {
            record.left_at_ns = Some(at_ns);
            record.departure_reason = left.reason.clone();
        }
        Body::WorkerLost(lost) => {
            record.lost_at_ns = Some(at_ns);
            record.departure_reason = lost.reason.clone();
            if lost.last_heartbeat_ns > 0 {
                let last = record
                    .last_heartbeat_at_ns
                    .unwrap_or(0)
                    .max(lost.last_heartbeat_ns);
                record.last_heartbeat_at_ns = Some(last);
            }
        }
        _ => return false,
    }
    true
}
