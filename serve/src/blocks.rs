//! Block accounting of the paged KV cache (Kwon et al. 2023, "Efficient Memory Management for
//! Large Language Model Serving with PagedAttention", arXiv:2309.06180): the cache is cut into
//! fixed-size blocks, each sequence owns a table of blocks, and a free list hands them out.
//!
//! Prefix caching (vLLM's automatic prefix caching): a full block is keyed by the hash of every
//! token up to its end (and the adapter, whose weights change the keys and values), so a new
//! sequence starting with the same tokens reuses it by reference count. A block nobody
//! references keeps its contents and its key until it is needed again; the least recently
//! released such block is evicted first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The key of a full block: a hash chained over the blocks before it.
pub type BlockHash = u64;

/// The hash before a sequence's first block: the adapter (or the base) the sequence runs.
pub fn root_hash(adapter: Option<&str>) -> BlockHash {
    let mut h = DefaultHasher::new();
    adapter.hash(&mut h);
    h.finish()
}

/// The key of a block holding `tokens` after the block keyed `parent`.
pub fn chain_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Reference counts, the free list and the prefix cache's index of full blocks.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    /// Blocks holding nothing worth keeping.
    free: VecDeque<usize>,
    /// The key of each block registered in the prefix cache.
    key: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, usize>,
    /// Unreferenced cached blocks by release time, oldest first.
    evictable: BTreeMap<u64, usize>,
    released_at: Vec<u64>,
    clock: u64,
    /// Prefix cache hits and lookups, in blocks.
    hits: u64,
    lookups: u64,
}

impl BlockManager {
    /// `blocks` blocks of `block_size` tokens, all free.
    pub fn new(blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; blocks],
            free: (0..blocks).collect(),
            key: vec![None; blocks],
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            hits: 0,
            lookups: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks some sequence references.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// Blocks that can be handed out now (free, or cached and unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks kept by the prefix cache (referenced or not).
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Prefix cache block hits and lookups since the start.
    pub fn hit_stats(&self) -> (u64, u64) {
        (self.hits, self.lookups)
    }

    /// A block for new contents, referenced once: a free one, else the least recently
    /// released cached one (its key is forgotten). `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<usize> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(k) = self.key[b].take() {
                    self.cached.remove(&k);
                }
                b
            }
        };
        self.refs[block] = 1;
        Some(block)
    }

    /// The cached block keyed `hash`, now referenced once more.
    pub fn lookup(&mut self, hash: BlockHash) -> Option<usize> {
        self.lookups += 1;
        let block = *self.cached.get(&hash)?;
        if self.refs[block] == 0 {
            self.evictable.remove(&self.released_at[block]);
        }
        self.refs[block] += 1;
        self.hits += 1;
        Some(block)
    }

    /// Records that full block `block` holds the tokens keyed `hash`. A block already cached
    /// under that key keeps it (the new block stays private).
    pub fn register(&mut self, block: usize, hash: BlockHash) {
        if self.key[block].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, block);
            self.key[block] = Some(hash);
        }
    }

    /// Whether `block` is referenced by more than one table (writing to it needs a copy).
    pub fn is_shared(&self, block: usize) -> bool {
        self.refs[block] > 1
    }

    /// One more reference to `block` (a forked sequence shares its parent's blocks).
    pub fn share(&mut self, block: usize) {
        self.refs[block] += 1;
    }

    /// Drops one reference; an unreferenced block becomes free, or evictable if cached.
    pub fn release(&mut self, block: usize) {
        debug_assert!(self.refs[block] > 0, "block {block} released twice");
        self.refs[block] -= 1;
        if self.refs[block] == 0 {
            if self.key[block].is_some() {
                self.clock += 1;
                self.released_at[block] = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_free_and_cached_ones_are_evicted_oldest_first() {
        let mut m = BlockManager::new(3, 4);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        let c = m.allocate().unwrap();
        assert_eq!(m.allocate(), None, "all three referenced");
        m.register(a, 11);
        m.register(b, 22);
        m.release(b);
        m.release(a);
        m.release(c);
        assert_eq!(m.used(), 0);
        assert_eq!(m.cached(), 2);
        // The plain free block goes first, then b (released before a).
        assert_eq!(m.allocate(), Some(c));
        assert_eq!(m.allocate(), Some(b));
        assert_eq!(m.lookup(22), None, "b's key was evicted with it");
        assert_eq!(m.lookup(11), Some(a), "a is still cached");
        assert_eq!(m.hit_stats(), (1, 2));
    }

    #[test]
    fn a_shared_block_is_freed_by_its_last_reference() {
        let mut m = BlockManager::new(2, 4);
        let a = m.allocate().unwrap();
        m.share(a);
        assert!(m.is_shared(a));
        m.release(a);
        assert!(!m.is_shared(a));
        assert_eq!(m.used(), 1);
        m.release(a);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn hashes_depend_on_every_earlier_token_and_the_adapter() {
        let base = root_hash(None);
        let one = chain_hash(base, &[1, 2]);
        assert_eq!(one, chain_hash(root_hash(None), &[1, 2]));
        assert_ne!(one, chain_hash(root_hash(Some("sql")), &[1, 2]));
        assert_ne!(
            chain_hash(one, &[3, 4]),
            chain_hash(chain_hash(base, &[1, 5]), &[3, 4])
        );
    }
}
