//! The projection's derived indexes, kept in the same transaction as the records they derive from: the prefix
//! index (which decode worker caches which KV block), each decode worker's live requests, and the requests that
//! wait for a routing. They are what the scheduler's decisions read, so a restarted scheduler decides from exactly
//! what the log says, and a projection rebuilt from scratch has the same indexes.

use redb::{ReadableTable, WriteTransaction};
use tandem_events::lifecycle::RequestState;

use super::apply::request_kv_blocks;
use super::tables::{ACTIVE_REQUESTS, PREFIX_INDEX, RequestRecord, UNROUTED, WORKER_BLOCKS};

/// Moves a request between the routing queue and its decode worker's live set after an event changed it from
/// `previous_worker` to `record` in `state`.
pub(super) fn track_request(
    txn: &WriteTransaction,
    request_id: &str,
    previous_worker: &str,
    record: &RequestRecord,
    state: RequestState,
) -> Result<(), redb::Error> {
    let mut active = txn.open_table(ACTIVE_REQUESTS)?;
    let mut unrouted = txn.open_table(UNROUTED)?;
    if !previous_worker.is_empty() {
        active.remove((previous_worker, request_id))?;
    }
    match state {
        RequestState::Received => {
            unrouted.insert(request_id, 1)?;
        }
        RequestState::Migrating => {
            unrouted.insert(request_id, record.routing_attempts + 1)?;
        }
        state if !state.is_live() => {
            unrouted.remove(request_id)?;
        }
        _ => {
            unrouted.remove(request_id)?;
            if !record.decode_worker_id.is_empty() {
                active.insert(
                    (record.decode_worker_id.as_str(), request_id),
                    request_kv_blocks(record),
                )?;
            }
        }
    }
    Ok(())
}

/// A decode worker cached these blocks.
pub(super) fn store_blocks(
    txn: &WriteTransaction,
    worker_id: &str,
    block_hashes: &[u64],
) -> Result<(), redb::Error> {
    let mut prefix_index = txn.open_table(PREFIX_INDEX)?;
    let mut worker_blocks = txn.open_table(WORKER_BLOCKS)?;
    for &hash in block_hashes {
        prefix_index.insert((hash, worker_id), ())?;
        worker_blocks.insert((worker_id, hash), ())?;
    }
    Ok(())
}

/// A decode worker evicted these blocks.
pub(super) fn remove_blocks(
    txn: &WriteTransaction,
    worker_id: &str,
    block_hashes: &[u64],
) -> Result<(), redb::Error> {
    let mut prefix_index = txn.open_table(PREFIX_INDEX)?;
    let mut worker_blocks = txn.open_table(WORKER_BLOCKS)?;
    for &hash in block_hashes {
        prefix_index.remove((hash, worker_id))?;
        worker_blocks.remove((worker_id, hash))?;
    }
    Ok(())
}

/// A worker (re)joined, left or was lost: whatever it cached is gone.
pub(super) fn forget_worker_blocks(
    txn: &WriteTransaction,
    worker_id: &str,
) -> Result<(), redb::Error> {
    let mut worker_blocks = txn.open_table(WORKER_BLOCKS)?;
    let mut hashes = Vec::new();
    for row in worker_blocks.range((worker_id, 0)..=(worker_id, u64::MAX))? {
        hashes.push(row?.0.value().1);
    }
    if hashes.is_empty() {
        return Ok(());
    }
    let mut prefix_index = txn.open_table(PREFIX_INDEX)?;
    for hash in hashes {
        prefix_index.remove((hash, worker_id))?;
        worker_blocks.remove((worker_id, hash))?;
    }
    Ok(())
}
