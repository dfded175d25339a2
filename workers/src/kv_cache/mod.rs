//! The paged KV cache's bookkeeping on the host: fixed-size blocks handed out by a reference-counting
//! [`allocator`], per-sequence [`BlockTable`]s, and prefix caching through the [`prefix_index`]. The KV
//! tensors themselves live in the backend (host memory for the CPU backend, device memory later), in the
//! block layout of [`layout`].

pub(crate) mod allocator;
pub(crate) mod layout;
pub(crate) mod prefix_index;

use allocator::BlockAllocator;
use prefix_index::PrefixIndex;
use tandem_events::blocks::chained_block_hash;

use crate::error::EngineError;

/// Index of a KV block in the backend's block pool.
pub type BlockId = u32;

/// The blocks of one sequence, in token order: token `t` lives in `blocks[t / block_size_tokens]`, slot
/// `t % block_size_tokens`.
#[derive(Debug, Default)]
pub(crate) struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    /// Chained hashes of the leading full blocks whose KV is computed.
    full_block_hashes: Vec<u64>,
}

/// A change to the set of full blocks in the prefix cache. Applied in order, these rebuild the exact set (what
/// a decode worker publishes as `KvBlocksStored`/`KvBlocksRemoved` for the scheduler's prefix index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Blocks entered the cache. Each listed block's parent is the one listed before it; the first one's is
    /// `parent_hash` (`None`: it starts a sequence).
    Stored {
        parent_hash: Option<u64>,
        block_hashes: Vec<u64>,
    },
    /// Blocks left the cache (their storage was taken for other tokens).
    Removed { block_hashes: Vec<u64> },
}

pub(crate) struct KvCacheManager {
    block_size_tokens: usize,
    allocator: BlockAllocator,
    prefix_index: PrefixIndex,
    prefix_caching: bool,
    /// Changes to the cached set not yet taken; `None` while nobody listens (the buffer would only grow).
    pending_events: Option<Vec<KvCacheEvent>>,
}

impl KvCacheManager {
    pub(crate) fn new(num_blocks: usize, block_size_tokens: usize, prefix_caching: bool) -> Self {
        Self {
            block_size_tokens,
            allocator: BlockAllocator::new(num_blocks),
            prefix_index: PrefixIndex::default(),
            prefix_caching,
            pending_events: None,
        }
    }

    /// From now on, record every change to the cached set for [`KvCacheManager::take_events`].
    pub(crate) fn record_events(&mut self) {
        self.pending_events.get_or_insert_with(Vec::new);
    }

    /// The changes recorded since the last call, in order, with consecutive changes merged: blocks stored as one
    /// chain form one `Stored`, consecutive evictions one `Removed`.
    pub(crate) fn take_events(&mut self) -> Vec<KvCacheEvent> {
        self.pending_events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The hashes of every block in the prefix cache, sorted.
    pub(crate) fn cached_block_hashes(&self) -> Vec<u64> {
        let mut hashes: Vec<u64> = self.prefix_index.hashes().collect();
        hashes.sort_unstable();
        hashes
    }

    fn note_stored(&mut self, parent_hash: Option<u64>, hash: u64) {
        let Some(events) = self.pending_events.as_mut() else {
            return;
        };
        if let Some(KvCacheEvent::Stored { block_hashes, .. }) = events.last_mut()
            && parent_hash.is_some()
            && block_hashes.last().copied() == parent_hash
        {
            block_hashes.push(hash);
            return;
        }
        events.push(KvCacheEvent::Stored {
            parent_hash,
            block_hashes: vec![hash],
        });
    }

    fn note_removed(&mut self, hash: u64) {
        let Some(events) = self.pending_events.as_mut() else {
            return;
        };
        if let Some(KvCacheEvent::Removed { block_hashes }) = events.last_mut() {
            block_hashes.push(hash);
            return;
        }
        events.push(KvCacheEvent::Removed {
            block_hashes: vec![hash],
        });
    }

    pub(crate) fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    pub(crate) fn num_cached_blocks(&self) -> usize {
        self.prefix_index.len()
    }

    #[cfg(test)]
    pub(crate) fn ref_count(&self, block: BlockId) -> u32 {
        self.allocator.ref_count(block)
    }

    /// A block table for a new prompt that already holds the cached full blocks of its longest cached
    /// prefix, and how many prompt tokens that covers. The last prompt token is never taken from the cache,
    /// so prefill always has at least one token to run and yields the logits that follow the prompt.
    pub(crate) fn start_sequence(&mut self, prompt: &[u32]) -> (BlockTable, usize) {
        let mut table = BlockTable::default();
        if !self.prefix_caching {
            return (table, 0);
        }
        let reusable_blocks = prompt.len().saturating_sub(1) / self.block_size_tokens;
        for block_tokens in prompt
            .chunks_exact(self.block_size_tokens)
            .take(reusable_blocks)
        {
            let parent = table.full_block_hashes.last().copied();
            let hash = chained_block_hash(parent, block_tokens);
            let Some(block) = self.prefix_index.lookup(hash, parent, block_tokens) else {
                break;
            };
            self.allocator.retain(block);
            table.blocks.push(block);
            table.full_block_hashes.push(hash);
        }
        let cached_tokens = table.blocks.len() * self.block_size_tokens;
        (table, cached_tokens)
    }

    /// Grows `table` to hold `num_tokens` tokens; allocates all needed blocks or none.
    pub(crate) fn reserve(
        &mut self,
        table: &mut BlockTable,
        num_tokens: usize,
    ) -> Result<(), EngineError> {
        let needed_blocks = num_tokens
            .div_ceil(self.block_size_tokens)
            .saturating_sub(table.blocks.len());
        if needed_blocks > self.allocator.num_free() {
            return Err(EngineError::OutOfBlocks {
                needed_blocks,
                free_blocks: self.allocator.num_free(),
            });
        }
        for _ in 0..needed_blocks {
            let Some(block) = self.allocator.allocate() else {
                unreachable!("free count checked above");
            };
            // The block's old contents are about to be overwritten: it can no longer serve its old prefix.
            if let Some(hash) = self.prefix_index.evict(block) {
                self.note_removed(hash);
            }
            table.blocks.push(block);
        }
        Ok(())
    }

    /// Registers the blocks that `num_computed_tokens` tokens of `token_ids` have filled, so later prompts
    /// with the same prefix reuse them.
    pub(crate) fn register_full_blocks(
        &mut self,
        table: &mut BlockTable,
        token_ids: &[u32],
        num_computed_tokens: usize,
    ) {
        if !self.prefix_caching {
            return;
        }
        let num_full_blocks = num_computed_tokens / self.block_size_tokens;
        for index in table.full_block_hashes.len()..num_full_blocks {
            let block_tokens =
                &token_ids[index * self.block_size_tokens..(index + 1) * self.block_size_tokens];
            let parent = table.full_block_hashes.last().copied();
            let hash = chained_block_hash(parent, block_tokens);
            // An equal block cached already (computed twice by concurrent prompts) leaves the set unchanged.
            if self
                .prefix_index
                .insert(hash, parent, block_tokens, table.blocks[index])
            {
                self.note_stored(parent, hash);
            }
            table.full_block_hashes.push(hash);
        }
    }

    /// Gives the table's blocks back. Registered blocks stay cached until their storage is reused.
    pub(crate) fn release(&mut self, table: BlockTable) {
        for block in table.blocks {
            self.allocator.release(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_prompt_with_the_same_prefix_shares_its_full_blocks() {
        let mut manager = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let (mut first, cached) = manager.start_sequence(&prompt);
        assert_eq!(cached, 0);
        manager.reserve(&mut first, prompt.len()).unwrap();
        assert_eq!(first.blocks.len(), 3);
        manager.register_full_blocks(&mut first, &prompt, prompt.len());
        assert_eq!(manager.num_cached_blocks(), 2);

        let mut other: Vec<u32> = (0..8).collect();
        other.extend([99, 98, 97]);
        let (second, cached) = manager.start_sequence(&other);
        assert_eq!(cached, 8);
        assert_eq!(second.blocks, first.blocks[..2]);
        assert_eq!(manager.ref_count(first.blocks[0]), 2);

        // Exactly two full blocks: the last token must be computed, so only the first block is reused.
        let (third, cached) = manager.start_sequence(&prompt[..8]);
        assert_eq!(cached, 4);
        manager.release(third);
        manager.release(second);
        manager.release(first);
        assert_eq!(manager.num_free_blocks(), 8);

        // Freed but still cached: a new prompt revives them.
        let (again, cached) = manager.start_sequence(&prompt);
        assert_eq!(cached, 8);
        assert_eq!(manager.num_free_blocks(), 6);
        manager.release(again);
    }

    #[test]
    fn reserve_is_all_or_nothing_and_reuse_evicts_cached_blocks() {
        let mut manager = KvCacheManager::new(3, 2, true);
        let prompt = [5, 6, 7, 8, 9];
        let (mut table, _) = manager.start_sequence(&prompt);
        manager.reserve(&mut table, 5).unwrap();
        manager.register_full_blocks(&mut table, &prompt, 5);
        manager.release(table);
        assert_eq!(manager.num_cached_blocks(), 2);

        let (mut big, _) = manager.start_sequence(&[1, 2, 3]);
        let error = manager.reserve(&mut big, 8).unwrap_err();
        assert!(matches!(
            error,
            EngineError::OutOfBlocks {
                needed_blocks: 4,
                free_blocks: 3
            }
        ));
        assert!(big.blocks.is_empty());
        manager.reserve(&mut big, 6).unwrap();
        assert_eq!(
            manager.num_cached_blocks(),
            0,
            "reused storage no longer serves the old prefix"
        );
        let (_, cached) = manager.start_sequence(&prompt);
        assert_eq!(cached, 0);
    }

    /// Applies recorded events to a set, as the scheduler does with the logged ones.
    fn rebuild(events: &[KvCacheEvent], set: &mut std::collections::BTreeSet<u64>) {
        for event in events {
            match event {
                KvCacheEvent::Stored {
                    parent_hash,
                    block_hashes,
                } => {
                    if let Some(parent) = parent_hash {
                        assert!(set.contains(parent), "a stored chain's parent is cached");
                    }
                    set.extend(block_hashes.iter().copied());
                }
                KvCacheEvent::Removed { block_hashes } => {
                    for hash in block_hashes {
                        assert!(set.remove(hash), "a removed block was stored before");
                    }
                }
            }
        }
    }

    #[test]
    fn recorded_events_rebuild_the_cached_set_through_eviction() {
        let mut manager = KvCacheManager::new(4, 2, true);
        manager.record_events();
        let mut rebuilt = std::collections::BTreeSet::new();
        let prompts: [&[u32]; 4] = [
            &[1, 2, 3, 4, 5],
            &[1, 2, 3, 4, 9, 9],
            &[7, 7, 7],
            &[8, 8, 8, 8, 8],
        ];
        for prompt in prompts {
            let (mut table, _) = manager.start_sequence(prompt);
            manager.reserve(&mut table, prompt.len()).unwrap();
            manager.register_full_blocks(&mut table, prompt, prompt.len());
            manager.release(table);
            rebuild(&manager.take_events(), &mut rebuilt);
            assert_eq!(
                rebuilt.iter().copied().collect::<Vec<_>>(),
                manager.cached_block_hashes()
            );
        }
        assert!(manager.take_events().is_empty(), "taken events are gone");
        // The second prompt extends the first one's chain: one `Stored`, merged. Another prompt starts its own.
        let mut again = KvCacheManager::new(8, 2, true);
        again.record_events();
        for prompt in [prompts[0], prompts[1], prompts[3]] {
            let (mut table, _) = again.start_sequence(prompt);
            again.reserve(&mut table, prompt.len()).unwrap();
            again.register_full_blocks(&mut table, prompt, prompt.len());
            again.release(table);
        }
        let hashes = tandem_events::blocks::block_hashes(prompts[1], 2);
        assert_eq!(
            again.take_events(),
            vec![
                KvCacheEvent::Stored {
                    parent_hash: None,
                    block_hashes: hashes
                },
                KvCacheEvent::Stored {
                    parent_hash: None,
                    block_hashes: tandem_events::blocks::block_hashes(prompts[3], 2)
                },
            ]
        );
    }

    #[test]
    fn nothing_is_recorded_unless_asked() {
        let mut manager = KvCacheManager::new(4, 2, true);
        let (mut table, _) = manager.start_sequence(&[1, 2, 3]);
        manager.reserve(&mut table, 3).unwrap();
        manager.register_full_blocks(&mut table, &[1, 2, 3], 3);
        assert!(manager.take_events().is_empty());
        assert_eq!(manager.cached_block_hashes().len(), 1);
    }
}
