//! [`PrefixIndex`]: prefix caching by chained hashes of full blocks. A full block's hash covers its tokens
//! and the hash of the block before it, so equal hashes mean equal whole prefixes; the tokens are kept and
//! compared as well, so a 64-bit collision can never hand a sequence someone else's KV.

use std::collections::HashMap;

use super::BlockId;

/// The chained hash of a full block (FNV-1a over the parent hash and the token ids; stable across runs
/// and machines, so hashes can later be compared between workers).
pub(crate) fn chained_block_hash(parent_hash: Option<u64>, token_ids: &[u32]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    match parent_hash {
        Some(parent) => {
            feed(&[1]);
            feed(&parent.to_le_bytes());
        }
        None => feed(&[0]),
    }
    for token in token_ids {
        feed(&token.to_le_bytes());
    }
    hash
}

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

    /// Forgets a block whose storage is about to hold something else.
    pub(crate) fn evict(&mut self, block: BlockId) {
        if let Some(hash) = self.hash_of_block.remove(&block) {
            self.by_hash.remove(&hash);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
