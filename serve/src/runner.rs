//! A model's step forward together with the KV storage it needs: the host forward
//! ([`HostDecoder`]) over host blocks where the model allows it (the CPU backend with weights
//! the kernels read), else burn's ragged forward over pooled tensors (any backend).

use ft_model::forward::host::{HostDecoder, Workspace};
use ft_model::forward::ragged::{Segment, ServedAdapter};
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::kv_pool::{HostKvPool, KvPool};

/// The forward of one engine or one generation, and its keys and values.
pub enum Runner<B: QuantBackend> {
    /// Plain Rust over host memory.
    Host {
        /// The model's weights as the host forward reads them.
        decoder: Box<HostDecoder<B>>,
        /// The cache's blocks.
        pool: HostKvPool,
        /// Buffers kept between steps.
        workspace: Box<Workspace>,
    },
    /// burn's tensor operations.
    Burn {
        /// The cache's blocks.
        pool: KvPool<B>,
    },
}

impl<B: QuantBackend> Runner<B> {
    /// The runner for `model` with room for `blocks` blocks of `block_size` positions.
    pub fn new(model: &LlamaForCausalLM<B>, blocks: usize, block_size: usize) -> Self {
        let (layers, kv, d) = kv_shape(model);
        match HostDecoder::new(model) {
            Some(decoder) => Self::Host {
                decoder: Box::new(decoder),
                pool: HostKvPool::new(layers, kv, d, blocks, block_size),
                workspace: Box::default(),
            },
            None => Self::burn(model, blocks, block_size),
        }
    }

    /// burn's forward for `model`, even where the host forward could run (tests hold the two
    /// to each other), with room for `blocks` blocks of `block_size` positions.
    pub fn burn(model: &LlamaForCausalLM<B>, blocks: usize, block_size: usize) -> Self {
        let (layers, kv, d) = kv_shape(model);
        Self::Burn {
            pool: KvPool::new(layers, kv, d, blocks, block_size, &model.device()),
        }
    }

    /// Bytes of one token's keys and values in the cache [`Runner::new`] would give `model`.
    pub fn bytes_per_token(model: &LlamaForCausalLM<B>) -> usize {
        let (layers, kv, d) = kv_shape(model);
        match HostDecoder::new(model) {
            Some(_) => HostKvPool::bytes_per_token(layers, kv, d),
            None => KvPool::<B>::bytes_per_token(layers, kv, d),
        }
    }

    /// Whether the host forward runs.
    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host { .. })
    }

    /// Copies block `src` into block `dst` in every layer.
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        match self {
            Self::Host { pool, .. } => pool.copy_block(src, dst),
            Self::Burn { pool } => pool.copy_block(src, dst),
        }
    }

    /// One step: segment i continues the sequence whose blocks are `tables[i]` with its new
    /// tokens in `ids` (see [`LlamaForCausalLM::forward_ragged`]); returns the next-token
    /// logits after each row `wanted` of `ids`, one row of the vocabulary each.
    pub fn logits(
        &mut self,
        model: &LlamaForCausalLM<B>,
        ids: &[u32],
        segments: &[Segment],
        adapters: &[&ServedAdapter<B>],
        tables: Vec<&[usize]>,
        wanted: &[usize],
    ) -> Vec<f32> {
        assert!(
            segments.iter().all(|s| s.len > 0),
            "a segment has new tokens"
        );
        match self {
            Self::Host {
                decoder,
                pool,
                workspace,
            } => decoder.logits(
                ids,
                segments,
                adapters,
                pool.view(&tables),
                wanted,
                workspace,
            ),
            Self::Burn { pool } => {
                let starts = segments.iter().map(|s| s.start).collect();
                let lens = segments.iter().map(|s| s.len).collect();
                let mut kv = pool.step(tables, starts, lens);
                model
                    .forward_ragged(ids, segments, adapters, &mut kv, wanted)
                    .map_or_else(Vec::new, |hidden| model.host_logits(hidden))
            }
        }
    }
}

/// Layers, key/value heads and head size of `model`'s KV cache.
fn kv_shape<B: QuantBackend>(model: &LlamaForCausalLM<B>) -> (usize, usize, usize) {
    let attn = &model.model.layers[0].self_attn;
    (model.model.layers.len(), attn.num_kv_heads, attn.head_dim)
}
