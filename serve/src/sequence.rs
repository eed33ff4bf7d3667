//! One sequence in the paged KV cache: its tokens, how many of them have keys and values
//! stored, the table of blocks holding them and the prefix-cache keys of its full blocks.

use crate::blocks::{chain_hash, root_hash, BlockHash, BlockManager};

/// A sequence being generated.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Prompt and generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose keys and values are stored.
    pub computed: usize,
    /// Block of each `block_size` positions.
    pub table: Vec<usize>,
    /// Keys of the leading full blocks whose keys are known.
    pub hashes: Vec<BlockHash>,
    /// The key before the first block (the adapter's).
    root: BlockHash,
    /// Summed log-probability of the generated tokens (beam search).
    pub sum_logprob: f64,
}

impl Sequence {
    /// A sequence of `tokens` with nothing stored, running `adapter`.
    pub fn new(tokens: Vec<u32>, adapter: Option<&str>) -> Self {
        Self {
            tokens,
            computed: 0,
            table: Vec::new(),
            hashes: Vec::new(),
            root: root_hash(adapter),
            sum_logprob: 0.0,
        }
    }

    /// Tokens still to run through the model.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Takes the longest run of leading full blocks from the prefix cache, always leaving at
    /// least one prompt token to compute (its logits start generation).
    pub fn reuse_prefix(&mut self, blocks: &mut BlockManager) {
        let bs = blocks.block_size();
        while self.computed == self.table.len() * bs
            && (self.table.len() + 1) * bs < self.tokens.len()
        {
            let i = self.table.len();
            let key = self.key_of(i, bs);
            match blocks.lookup(key) {
                Some(b) => {
                    self.table.push(b);
                    self.hashes.push(key);
                    self.computed += bs;
                }
                None => break,
            }
        }
    }

    /// Registers every newly completed block with the prefix cache (`register`), or only
    /// remembers its key.
    pub fn seal_full_blocks(&mut self, blocks: &mut BlockManager, register: bool) {
        let bs = blocks.block_size();
        while self.hashes.len() < self.computed / bs {
            let i = self.hashes.len();
            let key = self.key_of(i, bs);
            self.hashes.push(key);
            if register {
                blocks.register(self.table[i], key);
            }
        }
    }

    /// The key of block `i`, chained over the keys before it.
    fn key_of(&self, i: usize, bs: usize) -> BlockHash {
        let parent = if i == 0 {
            self.root
        } else {
            self.hashes[i - 1]
        };
        chain_hash(parent, &self.tokens[i * bs..(i + 1) * bs])
    }

    /// A copy sharing every block (beam search forks a beam).
    pub fn fork(&self, blocks: &mut BlockManager) -> Self {
        for &b in &self.table {
            blocks.share(b);
        }
        self.clone()
    }

    /// Drops every block reference and forgets what was stored (finished or preempted).
    pub fn release(&mut self, blocks: &mut BlockManager) {
        for b in self.table.drain(..) {
            blocks.release(b);
        }
        self.hashes.clear();
        self.computed = 0;
    }
}
