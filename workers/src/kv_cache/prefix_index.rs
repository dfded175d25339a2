//! [`PrefixIndex`]: prefix caching by chained hashes of full blocks. A full block's hash covers its tokens
//! and the hash of the block before it, so equal hashes mean equal whole prefixes; the tokens are kept and
//! compared as well, so a 64-bit collision can never hand a sequence someone else's KV. The hash itself is the
//! contract of [`tandem_events::blocks`], so the scheduler names blocks as the workers do.

use std::collections::HashMap;

use super::BlockId;

struct CachedBlock {
    block: BlockId,
    parent_hash: Option<u64>,
    token_ids: Vec<u32>,
}

#[derive(Default)]
pub(crate) struct PrefixIndex {
    by_hash: HashMap<u64, CachedBlock>,
    hash_of_block: HashMap<BlockId, u64>,
}

impl PrefixIndex {
    /// The cached block holding exactly this full block after exactly this parent, if any.
    pub(crate) fn lookup(
        &self,
        hash: u64,
        parent_hash: Option<u64>,
        token_ids: &[u32],
    ) -> Option<BlockId> {
        self.by_hash
            .get(&hash)
            .filter(|cached| cached.parent_hash == parent_hash && cached.token_ids == token_ids)
            .map(|cached| cached.block)
    }

    /// Records a just-filled block. Returns false (and records nothing) when an equal block is already
    /// cached or this block is already registered.
    pub(crate) fn insert(
        &mut self,
        hash: u64,
        parent_hash: Option<u64>,
        token_ids: &[u32],
        block: BlockId,
    ) -> bool {
        if self.by_hash.contains_key(&hash) || self.hash_of_block.contains_key(&block) {
            return false;
        }
        self.by_hash.insert(
            hash,
            CachedBlock {
                block,
                parent_hash,
                token_ids: token_ids.to_vec(),
            },
        );
        self.hash_of_block.insert(block, hash);
        true
    }

    /// Forgets a block whose storage is about to hold something else; returns the hash it was cached under.
    pub(crate) fn evict(&mut self, block: BlockId) -> Option<u64> {
        let hash = self.hash_of_block.remove(&block)?;
        self.by_hash.remove(&hash);
        Some(hash)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// The hashes of every cached block, in no particular order.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_hash.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_events::blocks::chained_block_hash;

    #[test]
    fn hashes_chain_and_lookup_checks_tokens_and_parent() {
        let first = chained_block_hash(None, &[1, 2]);
        let second = chained_block_hash(Some(first), &[3, 4]);
        assert_ne!(
            second,
            chained_block_hash(None, &[3, 4]),
            "parent changes the hash"
        );
        assert_eq!(first, chained_block_hash(None, &[1, 2]));
        let mut index = PrefixIndex::default();
        assert!(index.insert(first, None, &[1, 2], 7));
        assert!(
            !index.insert(first, None, &[1, 2], 8),
            "equal block already cached"
        );
        assert_eq!(index.lookup(first, None, &[1, 2]), Some(7));
        assert_eq!(
            index.lookup(first, None, &[1, 9]),
            None,
            "tokens compared, not just the hash"
        );
        index.evict(7);
        assert_eq!(index.lookup(first, None, &[1, 2]), None);
        assert_eq!(index.len(), 0);
    }
}
