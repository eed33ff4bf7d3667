//! The storage behind the paged KV cache: per layer, one key and one value tensor of
//! `[blocks, kv, block_size, d]` ([`KvPool`], for burn's forward, f32), or the same layout in
//! host vectors ([`HostKvPool`], for the host forward, f16). A sequence's position p lives in block
//! `table[p / block_size]` at offset `p % block_size`; reading a sequence gathers its blocks
//! (one index per block, not per token) and lays them end to end.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use ft_model::forward::host::HostKv;
use ft_model::forward::ragged::KvStore;
use ft_model::QuantBackend;
use half::f16;

/// Keys and values of every block, for every layer.
#[derive(Debug)]
pub struct KvPool<B: Backend> {
    keys: Vec<Tensor<B, 4>>,
    values: Vec<Tensor<B, 4>>,
    block_size: usize,
}

impl<B: Backend> KvPool<B> {
    /// Zeroed storage for `blocks` blocks of `block_size` tokens.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        blocks: usize,
        block_size: usize,
        device: &B::Device,
    ) -> Self {
        let empty = || Tensor::zeros([blocks, kv_heads, block_size, head_dim], device);
        Self {
            keys: (0..layers).map(|_| empty()).collect(),
            values: (0..layers).map(|_| empty()).collect(),
            block_size,
        }
    }

    /// Bytes of one token's keys and values over all layers (f32).
    pub fn bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * layers * kv_heads * head_dim * 4
    }

    /// Copies block `src` into block `dst` in every layer (copy on write of a shared block).
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let [_, kv, bs, d] = t.dims();
            let piece = t.clone().narrow(0, src, 1);
            // A copy that shares nothing with the pool, so the assignment stays in place.
            let piece = Tensor::from_data(piece.into_data(), &t.device());
            assign(t, [dst..dst + 1, 0..kv, 0..bs, 0..d], piece);
        }
    }

    /// The view a ragged forward writes and reads through: segment i continues the sequence
    /// whose block table is `tables[i]`, after `starts[i]` stored tokens, with `lens[i]` new.
    pub fn step<'a>(
        &'a mut self,
        tables: Vec<&'a [usize]>,
        starts: Vec<usize>,
        lens: Vec<usize>,
    ) -> StepKv<'a, B> {
        StepKv {
            pool: self,
            tables,
            starts,
            lens,
            reads: Vec::new(),
        }
    }
}

/// Keys and values of every block, for every layer, in host memory: what
/// [`ft_model::forward::host::HostDecoder`] writes and attends over in place.
#[derive(Debug)]
pub struct HostKvPool {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    block_size: usize,
    /// Values in one block of one layer.
    block_len: usize,
}

impl HostKvPool {
    /// Zeroed storage for `blocks` blocks of `block_size` tokens.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        blocks: usize,
        block_size: usize,
    ) -> Self {
        let block_len = kv_heads * block_size * head_dim;
        let empty = || vec![f16::ZERO; blocks * block_len];
        Self {
            keys: (0..layers).map(|_| empty()).collect(),
            values: (0..layers).map(|_| empty()).collect(),
            block_size,
            block_len,
        }
    }

    /// Bytes of one token's keys and values over all layers (f16).
    pub fn bytes_per_token(layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * layers * kv_heads * head_dim * 2
    }

    /// Copies block `src` into block `dst` in every layer (copy on write of a shared block).
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let len = self.block_len;
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            t.copy_within(src * len..(src + 1) * len, dst * len);
        }
    }

    /// The view a host forward writes and reads through: segment i's positions are in the
    /// blocks of `tables[i]`.
    pub fn view<'a>(&'a mut self, tables: &'a [&'a [usize]]) -> HostKv<'a> {
        HostKv {
            keys: &mut self.keys,
            values: &mut self.values,
            block_size: self.block_size,
            tables,
        }
    }
}

/// One step's access to the pool, as [`KvStore`].
pub struct StepKv<'a, B: Backend> {
    pool: &'a mut KvPool<B>,
    tables: Vec<&'a [usize]>,
    starts: Vec<usize>,
    lens: Vec<usize>,
    /// The blocks each group of segments reads, padded to the most, built on first use.
    reads: Vec<(Vec<usize>, BlockList<B>)>,
}

/// Blocks of a group of sequences, each padded to the most: the block ids, blocks per
/// sequence, and the longest sequence in tokens.
type BlockList<B> = (Tensor<B, 1, Int>, usize, usize);

impl<B: Backend> StepKv<'_, B> {
    /// The blocks of `segs`' sequences, each list padded to the longest with its first block;
    /// that many blocks; and the longest sequence in tokens.
    fn blocks(&mut self, segs: &[usize]) -> BlockList<B> {
        if let Some((_, list)) = self.reads.iter().find(|(s, _)| s == segs) {
            return list.clone();
        }
        let bs = self.pool.block_size;
        let len = |i: usize| self.starts[i] + self.lens[i];
        let t = segs.iter().map(|&i| len(i)).max().unwrap_or(0);
        let nb = t.div_ceil(bs);
        let mut blocks = Vec::with_capacity(segs.len() * nb);
        for &i in segs {
            let table = &self.tables[i][..len(i).div_ceil(bs)];
            blocks.extend(
                (0..nb)
                    .map(|b| table.get(b).unwrap_or(&table[0]))
                    .map(|&b| b as i64),
            );
        }
        let n = blocks.len();
        let device = self.pool.keys[0].device();
        let blocks = Tensor::<B, 1, Int>::from_data(TensorData::new(blocks, [n]), &device);
        self.reads.push((segs.to_vec(), (blocks.clone(), nb, t)));
        (blocks, nb, t)
    }
}

impl<B: QuantBackend> KvStore<B> for StepKv<'_, B> {
    fn write(&mut self, layer: usize, seg: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let [_, kv, s, d] = k.dims();
        let bs = self.pool.block_size;
        let (table, start) = (self.tables[seg], self.starts[seg]);
        // Write the new positions block by block.
        let mut p = start;
        while p < start + s {
            let block = table[p / bs];
            let n = (bs - p % bs).min(start + s - p);
            let at = [block..block + 1, 0..kv, p % bs..p % bs + n, 0..d];
            let piece = |t: &Tensor<B, 4>| t.clone().narrow(2, p - start, n);
            assign(&mut self.pool.keys[layer], at.clone(), piece(&k));
            assign(&mut self.pool.values[layer], at, piece(&v));
            p += n;
        }
    }

    fn read(&mut self, layer: usize, segs: &[usize]) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (blocks, nb, t) = self.blocks(segs);
        let m = segs.len();
        let gather = |pool: &Tensor<B, 4>| {
            let [_, kv, bs, d] = pool.dims();
            let picked = pool.clone().select(0, blocks.clone()); // [m*nb, kv, bs, d]
            let rows =
                picked
                    .reshape([m, nb, kv, bs, d])
                    .swap_dims(1, 2)
                    .reshape([m, kv, nb * bs, d]);
            if nb * bs > t {
                rows.narrow(2, 0, t)
            } else {
                rows
            }
        };
        (
            gather(&self.pool.keys[layer]),
            gather(&self.pool.values[layer]),
        )
    }

    fn attend_decode(
        &mut self,
        layer: usize,
        segs: &[usize],
        q: Tensor<B, 4>,
    ) -> Option<Tensor<B, 3>> {
        let [m, h, _, d] = q.dims();
        let rows: Vec<(&[usize], usize)> = segs
            .iter()
            .map(|&i| (self.tables[i], self.starts[i] + self.lens[i]))
            .collect();
        // The pool's tensors are borrowed for the call only, so later writes stay in place.
        let keys = self.pool.keys[layer].clone().into_primitive().tensor();
        let values = self.pool.values[layer].clone().into_primitive().tensor();
        let q = q.reshape([m, h, d]).into_primitive().tensor();
        let out = B::paged_decode_attention(q, &keys, &values, &rows)?;
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// Writes `piece` into `at` of `t` in place: the pool's tensor is taken out first, so the
/// backend sees it uniquely owned and does not copy it.
fn assign<B: Backend>(t: &mut Tensor<B, 4>, at: [std::ops::Range<usize>; 4], piece: Tensor<B, 4>) {
    let owned = std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &piece.device()));
    *t = owned.slice_assign(at, piece);
}
