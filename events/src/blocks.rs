//! The block hash contract between decode workers and the scheduler: a full KV block is named by a chained hash of
//! its tokens and the hash of the block before it, so equal hashes mean equal whole prefixes. Workers name the
//! blocks of their prefix cache with it in `KvBlocksStored`/`KvBlocksRemoved`; the scheduler hashes a prompt the
//! same way ([`block_hashes`]) and counts the leading hashes a worker holds to find its longest cached prefix.
//!
//! The bytes hashed never change (FNV-1a, 64-bit, over a parent marker, the parent hash and the token ids, all
//! little-endian): hashes logged by one version are compared with hashes computed by another.

/// The chained hash of one full block: FNV-1a over `0` (no parent) or `1` followed by the parent hash, then every
/// token id, all little-endian. Stable across runs, machines and versions.
pub fn chained_block_hash(parent_hash: Option<u64>, token_ids: &[u32]) -> u64 {
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

/// The chained hashes of the full blocks of `token_ids`, in order; a partial last block has none. An empty list
/// when `block_size_tokens` is 0.
pub fn block_hashes(token_ids: &[u32], block_size_tokens: usize) -> Vec<u64> {
    if block_size_tokens == 0 {
        return Vec::new();
    }
    let mut hashes: Vec<u64> = Vec::with_capacity(token_ids.len() / block_size_tokens);
    for block_tokens in token_ids.chunks_exact(block_size_tokens) {
        let parent = hashes.last().copied();
        hashes.push(chained_block_hash(parent, block_tokens));
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // Pinned: a change here breaks every log and every scheduler index that holds hashes already.
        assert_eq!(chained_block_hash(None, &[]), 0xaf63_bd4c_8601_b7df);
        assert_eq!(chained_block_hash(None, &[1, 2]), KNOWN_FIRST);
        assert_eq!(chained_block_hash(Some(KNOWN_FIRST), &[3, 4]), KNOWN_SECOND);
    }

    // Computed independently (a Python FNV-1a over the same bytes).
    const KNOWN_FIRST: u64 = 0x8714_6320_6d35_667c;
    const KNOWN_SECOND: u64 = 0x7854_3e25_c91f_741f;

    #[test]
    fn hashes_chain_through_the_parent() {
        let first = chained_block_hash(None, &[1, 2]);
        let second = chained_block_hash(Some(first), &[3, 4]);
        assert_ne!(second, chained_block_hash(None, &[3, 4]));
        assert_ne!(
            chained_block_hash(Some(0), &[1, 2]),
            first,
            "a zero parent is not the same as no parent"
        );
        assert_eq!(block_hashes(&[1, 2, 3, 4], 2), vec![first, second]);
    }

    #[test]
    fn a_partial_last_block_has_no_hash_and_prefixes_share_hashes() {
        let tokens: Vec<u32> = (100..137).collect();
        let hashes = block_hashes(&tokens, 16);
        assert_eq!(hashes.len(), 2, "37 tokens: two full blocks of 16");
        assert_eq!(block_hashes(&tokens[..32], 16), hashes);
        assert_eq!(block_hashes(&tokens[..20], 16), hashes[..1]);
        let mut other = tokens.clone();
        other[20] = 7;
        let other_hashes = block_hashes(&other, 16);
        assert_eq!(other_hashes[0], hashes[0]);
        assert_ne!(other_hashes[1], hashes[1]);
        assert!(block_hashes(&tokens, 0).is_empty());
        assert!(block_hashes(&tokens[..15], 16).is_empty());
    }
}
