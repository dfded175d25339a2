//! [`BlockAllocator`]: which KV blocks are in use (reference counts) and which are free, in least-recently
//! freed order so that cached prefix blocks survive as long as possible before being reused.

use std::collections::BTreeMap;

use super::BlockId;

pub(crate) struct BlockAllocator {
    ref_counts: Vec<u32>,
    /// Free blocks by the tick at which they were freed; the smallest tick is reused first.
    free_by_tick: BTreeMap<u64, BlockId>,
    /// The tick under which a free block sits in `free_by_tick`; meaningless while the block is in use.
    free_tick_of_block: Vec<u64>,
    next_tick: u64,
}

impl BlockAllocator {
    pub(crate) fn new(num_blocks: usize) -> Self {
        let free_by_tick = (0..num_blocks)
            .map(|block| (block as u64, block as BlockId))
            .collect();
        Self {
            ref_counts: vec![0; num_blocks],
            free_by_tick,
            free_tick_of_block: (0..num_blocks as u64).collect(),
            next_tick: num_blocks as u64,
        }
    }

    pub(crate) fn num_free(&self) -> usize {
        self.free_by_tick.len()
    }

    #[cfg(test)]
    pub(crate) fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes the least recently freed block, with one reference; `None` when every block is in use.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let (_, block) = self.free_by_tick.pop_first()?;
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference; a free block (a cached prefix block being reused) leaves the free list.
    pub(crate) fn retain(&mut self, block: BlockId) {
        let count = &mut self.ref_counts[block as usize];
        if *count == 0 {
            self.free_by_tick
                .remove(&self.free_tick_of_block[block as usize]);
        }
        *count += 1;
    }

    /// Drops a reference; returns true when the block became free.
    pub(crate) fn release(&mut self, block: BlockId) -> bool {
        let count = &mut self.ref_counts[block as usize];
        debug_assert!(*count > 0, "release of free block {block}");
        *count = count.saturating_sub(1);
        if *count > 0 {
            return false;
        }
        self.free_tick_of_block[block as usize] = self.next_tick;
        self.free_by_tick.insert(self.next_tick, block);
        self.next_tick += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_reuses_least_recently_freed() {
        let mut allocator = BlockAllocator::new(3);
        let a = allocator.allocate().unwrap();
        let b = allocator.allocate().unwrap();
        let c = allocator.allocate().unwrap();
        assert_eq!(allocator.allocate(), None);
        assert_eq!(allocator.num_free(), 0);
        assert!(allocator.release(b));
        assert!(allocator.release(a));
        assert_eq!(allocator.allocate(), Some(b), "b was freed first");
        assert_eq!(allocator.allocate(), Some(a));
        let _ = c;
    }

    #[test]
    fn reference_counts_keep_shared_blocks_alive_and_retain_revives_free_ones() {
        let mut allocator = BlockAllocator::new(2);
        let a = allocator.allocate().unwrap();
        allocator.retain(a);
        assert_eq!(allocator.ref_count(a), 2);
        assert!(!allocator.release(a));
        assert!(allocator.release(a));
        assert_eq!(allocator.num_free(), 2);
        allocator.retain(a);
        assert_eq!(allocator.num_free(), 1);
        assert_eq!(allocator.ref_count(a), 1);
        let other = allocator.allocate().unwrap();
        assert_ne!(other, a);
        assert_eq!(allocator.allocate(), None);
    }
}
