//! The storage behind the paged KV cache: per layer, one key and one value tensor of
//! `[kv, blocks * block_size, d]`, where block b holds slots `b * block_size ..`. A sequence's
//! position p lives in slot `table[p / block_size] * block_size + p % block_size`.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use ft_model::ragged::KvStore;

/// Keys and values of every block, for every layer.
#[derive(Debug)]
pub struct KvPool<B: Backend> {
    keys: Vec<Tensor<B, 3>>,
    values: Vec<Tensor<B, 3>>,
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
        let empty = || Tensor::zeros([kv_heads, blocks * block_size, head_dim], device);
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
        let bs = self.block_size;
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let [kv, _, d] = t.dims();
            let piece = t.clone().narrow(1, src * bs, bs);
            // A copy that shares nothing with the pool, so the assignment stays in place.
            let piece = Tensor::from_data(piece.into_data(), &t.device());
            assign(t, [0..kv, dst * bs..dst * bs + bs, 0..d], piece);
        }
    }

    /// The view a ragged forward writes and reads through: segment i continues the sequence
    /// whose block table is `tables[i]`, after `starts[i]` stored tokens.
    pub fn step<'a>(
        &'a mut self,
        tables: Vec<&'a [usize]>,
        starts: Vec<usize>,
        lens: &[usize],
    ) -> StepKv<'a, B> {
        let device = self.keys[0].device();
        let bs = self.block_size;
        let reads = tables
            .iter()
            .zip(starts.iter().zip(lens))
            .map(|(table, (start, len))| {
                let slots: Vec<i64> = (0..start + len)
                    .map(|p| (table[p / bs] * bs + p % bs) as i64)
                    .collect();
                let n = slots.len();
                Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [n]), &device)
            })
            .collect();
        StepKv {
            pool: self,
            tables,
            starts,
            reads,
        }
    }
}

/// One step's access to the pool, as [`KvStore`].
pub struct StepKv<'a, B: Backend> {
    pool: &'a mut KvPool<B>,
    tables: Vec<&'a [usize]>,
    starts: Vec<usize>,
    /// Per segment: the slot of each of its positions, new ones included.
    reads: Vec<Tensor<B, 1, Int>>,
}

impl<B: Backend> KvStore<B> for StepKv<'_, B> {
    fn write_and_read(
        &mut self,
        layer: usize,
        seg: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, kv, s, d] = k.dims();
        let bs = self.pool.block_size;
        let (table, start) = (self.tables[seg], self.starts[seg]);
        let k = k.reshape([kv, s, d]);
        let v = v.reshape([kv, s, d]);
        // Write the new positions block by block: within a block the slots are consecutive.
        let mut p = start;
        while p < start + s {
            let block = table[p / bs];
            let n = (bs - p % bs).min(start + s - p);
            let slot = block * bs + p % bs;
            let rows = [0..kv, slot..slot + n, 0..d];
            let piece = |t: &Tensor<B, 3>| t.clone().narrow(1, p - start, n);
            assign(&mut self.pool.keys[layer], rows.clone(), piece(&k));
            assign(&mut self.pool.values[layer], rows, piece(&v));
            p += n;
        }
        let slots = self.reads[seg].clone();
        let keys = self.pool.keys[layer].clone().select(1, slots.clone());
        let values = self.pool.values[layer].clone().select(1, slots);
        (keys.unsqueeze::<4>(), values.unsqueeze::<4>())
    }
}

/// Writes `piece` into `rows` of `t` in place: the pool's tensor is taken out first, so the
/// backend sees it uniquely owned and does not copy it.
fn assign<B: Backend>(
    t: &mut Tensor<B, 3>,
    rows: [std::ops::Range<usize>; 3],
    piece: Tensor<B, 3>,
) {
    let owned = std::mem::replace(t, Tensor::empty([0, 0, 0], &piece.device()));
    *t = owned.slice_assign(rows, piece);
}
