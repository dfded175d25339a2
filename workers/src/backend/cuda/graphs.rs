//! CUDA graphs for decode steps. A decode step (one new token per sequence) launches some ten kernels per
//! layer; replaying them as one captured graph removes the per-launch cost that otherwise dominates a small
//! model's step. A graph is captured per (batch bucket, block-table capacity): the batch is padded up to
//! the bucket with rows that write their KV into a block kept for padding alone, and the step's metadata
//! goes to fixed offsets of the metadata buffer, so only its contents change between replays.

use std::collections::HashMap;

use cudarc::driver::CudaGraph;

/// Batch sizes that get a graph; a larger batch runs eagerly.
pub(crate) const BATCH_BUCKETS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// The smallest bucket holding `batch` sequences.
pub(crate) fn bucket_for(batch: usize) -> Option<usize> {
    BATCH_BUCKETS
        .iter()
        .copied()
        .find(|&bucket| bucket >= batch)
}

/// Block-table entries reserved per row: a power of two at least `longest_table`, so a graph serves
/// sequences as they grow until they pass it.
pub(crate) fn table_capacity(longest_table: usize) -> usize {
    longest_table.next_power_of_two().max(16)
}

/// One captured decode step, owned by one backend.
pub(crate) struct DecodeGraph(CudaGraph);

// SAFETY: a graph is launched and destroyed only through `&mut` access to the backend that owns it, so
// never from two threads at once (what CUDA asks of graph objects); moving it to another thread with its
// backend is allowed.
unsafe impl Send for DecodeGraph {}

impl DecodeGraph {
    pub(crate) fn new(graph: CudaGraph) -> Self {
        Self(graph)
    }

    pub(crate) fn graph(&self) -> &CudaGraph {
        &self.0
    }
}

/// The captured graphs by (bucket, table capacity). Cleared whenever the work buffers they point into are
/// reallocated.
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    pub(crate) by_shape: HashMap<(usize, usize), DecodeGraph>,
}
