//! The forward of a ragged batch, as serving engines run it (vLLM, S-LoRA): the new tokens of
//! many sequences, each at its own position, flattened into one row, so that every linear layer
//! reads its weights once per step for all of them. Attention runs per sequence over keys and
//! values that the caller stores (a paged KV cache). Each sequence may apply its own LoRA
//! adapter: the update is computed once per run of consecutive rows sharing an adapter
//! (Punica's segmented gather matmul, SGMV), and rows without one get the base alone.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use ft_adapters::peft::{Matrix, PeftAdapter};
use ft_quant::QuantBackend;

use crate::error::ModelError;
use crate::forward::llama::{
    grouped_attention, heads_first, Attend, LlamaForCausalLM, LoraLinear, Rotation,
};
use crate::forward::{adapter_runs, Run};

/// One sequence's new tokens in a ragged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Tokens of the sequence already in its KV store: the position of the first new token.
    pub start: usize,
    /// New tokens.
    pub len: usize,
    /// Index of the sequence's adapter in the forward's adapter list; `None` runs the base.
    pub adapter: Option<usize>,
}

/// Where a ragged forward keeps the keys and values of its sequences.
pub trait KvStore<B: Backend> {
    /// Stores the rotated keys and the values `[1, kv, s, d]` of segment `seg`'s new tokens
    /// in `layer`.
    fn write(&mut self, layer: usize, seg: usize, k: Tensor<B, 4>, v: Tensor<B, 4>);

    /// Every stored key and value of the sequences of segments `segs` in `layer`, one row
    /// each, `[segs.len(), kv, t, d]` with t the longest; a shorter sequence's row is padded
    /// with arbitrary finite values past its end.
    fn read(&mut self, layer: usize, segs: &[usize]) -> (Tensor<B, 4>, Tensor<B, 4>);

    /// The attention of one new token per segment of `segs` (queries `[m, h, 1, d]`, rotated)
    /// over every stored position, `[m, 1, h*d]`, where the store can compute it in place;
    /// `None` has the forward [`Self::read`] and attend with tensor ops.
    fn attend_decode(
        &mut self,
        _layer: usize,
        _segs: &[usize],
        _q: Tensor<B, 4>,
    ) -> Option<Tensor<B, 3>> {
        None
    }
}

/// One PEFT adapter held apart from the model, so that rows of one batch can each use their
/// own: `layers[i][j]` is layer i's linear j in [`crate::adapter::TARGETS`] order.
#[derive(Debug)]
pub struct ServedAdapter<B: Backend> {
    layers: Vec<[Option<LowRank<B>>; 7]>,
}

/// One module's update scale * x A^T B^T, kept as A and scale * B^T so that a run of rows
/// costs two products (and the host kernels read A's rows as dot products).
#[derive(Debug)]
struct LowRank<B: Backend> {
    /// [r, in]
    a: Tensor<B, 2>,
    /// [r, out], the scale folded in.
    b_t: Tensor<B, 2>,
}

impl<B: Backend> ServedAdapter<B> {
    /// The adapter read from `dir`, checked against `model` as
    /// [`LlamaForCausalLM::attach_adapter`] checks it.
    pub fn new(
        model: &LlamaForCausalLM<B>,
        adapter: &PeftAdapter,
        dir: &Path,
    ) -> Result<Self, ModelError> {
        let plan = model.plan_adapter(adapter, dir)?;
        let scale = adapter.config.lora_config().scale() as f32;
        let device = model.device();
        let mut layers: Vec<[Option<LowRank<B>>; 7]> = (0..model.model.layers.len())
            .map(|_| Default::default())
            .collect();
        for (index, w) in plan {
            layers[index / 7][index % 7] = Some(LowRank {
                a: Tensor::from_data(
                    TensorData::new(w.a.data.clone(), w.a.shape).convert::<B::FloatElem>(),
                    &device,
                ),
                b_t: transposed(&w.b, scale, &device),
            });
        }
        Ok(Self { layers })
    }
}

impl<B: QuantBackend> ServedAdapter<B> {
    /// Per layer and module, A [r, in] and scale * B^T [r, out] as backend primitives, with
    /// r: what the host forward ([`crate::forward::host`]) reads in place.
    #[allow(clippy::type_complexity)]
    pub(crate) fn host_parts(&self) -> Vec<[Option<(FloatTensor<B>, FloatTensor<B>, usize)>; 7]> {
        self.layers
            .iter()
            .map(|mods| {
                std::array::from_fn(|j| {
                    let w = mods[j].as_ref()?;
                    let r = w.a.dims()[0];
                    Some((
                        w.a.clone().into_primitive().tensor(),
                        w.b_t.clone().into_primitive().tensor(),
                        r,
                    ))
                })
            })
            .collect()
    }
}

/// A, scale * B^T and the rank of one module's update, as backend primitives.
pub(crate) type HostLowRank<B> = (FloatTensor<B>, FloatTensor<B>, usize);

/// `m` transposed and times `scale`, as a tensor on `device`.
fn transposed<B: Backend>(m: &Matrix, scale: f32, device: &B::Device) -> Tensor<B, 2> {
    let [rows, cols] = m.shape;
    let data: Vec<f32> = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m.data[r * cols + c] * scale))
        .collect();
    Tensor::from_data(
        TensorData::new(data, [cols, rows]).convert::<B::FloatElem>(),
        device,
    )
}

/// The adapters of one forward and the rows each applies to.
struct RowAdapters<'a, B: Backend> {
    runs: Vec<Run>,
    adapters: &'a [&'a ServedAdapter<B>],
}

impl<B: QuantBackend> RowAdapters<'_, B> {
    /// `linear` (module `module` of layer `layer`) on every row, plus each run's adapter;
    /// the updates of adjacent runs are added in one piece.
    ///
    /// # Shapes
    /// - x: `[1, n, in]` -> `[1, n, out]`
    fn project(
        &self,
        linear: &LoraLinear<B>,
        layer: usize,
        module: usize,
        x: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let mut y = linear.forward(x.clone());
        let [_, _, out] = y.dims();
        let n_in = x.dims()[2];
        let mut pending: Vec<Tensor<B, 2>> = Vec::new();
        let mut span = 0..0;
        let flush =
            |y: Tensor<B, 3>, pending: &mut Vec<Tensor<B, 2>>, span: &std::ops::Range<usize>| {
                if pending.is_empty() {
                    return y;
                }
                let delta = Tensor::cat(std::mem::take(pending), 0).unsqueeze::<3>();
                let rows = [0..1, span.clone(), 0..out];
                let updated = y.clone().slice(rows.clone()) + delta;
                y.slice_assign(rows, updated)
            };
        for run in &self.runs {
            let Some(w) = &self.adapters[run.adapter].layers[layer][module] else {
                continue;
            };
            if span.end != run.start {
                y = flush(y, &mut pending, &span);
                span = run.start..run.start;
            }
            let xs = x
                .clone()
                .narrow(1, run.start, run.len)
                .reshape([run.len, n_in]);
            pending.push(xs.matmul(w.a.clone().transpose()).matmul(w.b_t.clone()));
            span.end = run.start + run.len;
        }
        flush(y, &mut pending, &span)
    }
}

/// What the decoding segments of one forward share across layers.
struct DecodeBatch<B: Backend> {
    /// Each decoding segment's row in the flattened batch.
    rows: Tensor<B, 1, Int>,
    /// Each one's RoPE angles, `[m, 1, 1, d]`.
    rotation: Rotation<B>,
    /// `[m, 1, 1, t]`: true past each sequence's end; `None` when all have the same length.
    mask: Option<Tensor<B, 4, Bool>>,
}

impl<B: QuantBackend> DecodeBatch<B> {
    fn new(
        model: &LlamaForCausalLM<B>,
        segments: &[Segment],
        offsets: &[usize],
        decode: &[usize],
        device: &B::Device,
    ) -> Option<Self> {
        if decode.is_empty() {
            return None;
        }
        let m = decode.len();
        let rows: Vec<i64> = decode.iter().map(|&i| offsets[i] as i64).collect();
        let positions: Vec<i64> = decode.iter().map(|&i| segments[i].start as i64).collect();
        let lengths: Vec<usize> = decode.iter().map(|&i| segments[i].start + 1).collect();
        let t = lengths.iter().copied().max().unwrap_or(1);
        let mask = lengths.iter().any(|&l| l != t).then(|| {
            let blocked: Vec<bool> = lengths
                .iter()
                .flat_map(|&l| (0..t).map(move |j| j >= l))
                .collect();
            Tensor::<B, 4, Bool>::from_data(TensorData::new(blocked, [m, 1, 1, t]), device)
        });
        Some(Self {
            rows: Tensor::from_data(TensorData::new(rows, [m]), device),
            rotation: model.model.rotary_emb.at_positions(Tensor::from_data(
                TensorData::new(positions, [m, 1]),
                device,
            )),
            mask,
        })
    }
}

impl<B: QuantBackend> LlamaForCausalLM<B> {
    /// Final hidden states of the rows `wanted` of the flattened batch, `[wanted.len(), e]`
    /// (a segment's last row gives its next token; every row of a prompt scores the prompt);
    /// `None` when none is wanted (a step of prompt chunks that only stores keys and values:
    /// no zero-row tensor reaches a backend).
    ///
    /// `ids` holds the segments' new tokens one after the other; each segment continues its
    /// own sequence in `kv` with its own adapter from `adapters`. A sequence's result is what
    /// [`Self::forward_hidden`] gives it alone, up to the rounding of batched products.
    pub fn forward_ragged(
        &self,
        ids: &[u32],
        segments: &[Segment],
        adapters: &[&ServedAdapter<B>],
        kv: &mut impl KvStore<B>,
        wanted: &[usize],
    ) -> Option<Tensor<B, 2>> {
        let device = self.device();
        let n = ids.len();
        debug_assert_eq!(n, segments.iter().map(|s| s.len).sum::<usize>());
        let offsets: Vec<usize> = segments
            .iter()
            .scan(0, |at, seg| {
                let start = *at;
                *at += seg.len;
                Some(start)
            })
            .collect();
        let rows = RowAdapters {
            runs: adapter_runs(segments),
            adapters,
        };
        // Decoding segments (one new token each) attend together as one padded batch;
        // longer ones (prompt chunks) one by one.
        let decode: Vec<usize> = (0..segments.len())
            .filter(|&i| segments[i].len == 1)
            .collect();
        let chunks: Vec<usize> = (0..segments.len())
            .filter(|&i| segments[i].len > 1)
            .collect();
        let decoding = DecodeBatch::new(self, segments, &offsets, &decode, &device);
        let attends: Vec<Attend<B>> = chunks
            .iter()
            .map(|&i| {
                Attend::causal(
                    &self.model.rotary_emb,
                    segments[i].start,
                    segments[i].len,
                    &device,
                )
            })
            .collect();
        // Attention outputs come decode rows first, then each chunk's rows: back to batch order.
        let order: Vec<usize> = decode
            .iter()
            .map(|&i| offsets[i])
            .chain(
                chunks
                    .iter()
                    .flat_map(|&i| offsets[i]..offsets[i] + segments[i].len),
            )
            .collect();
        let restore = (order.iter().enumerate().any(|(j, &o)| j != o)).then(|| {
            let mut inverse = vec![0i64; n];
            for (j, &o) in order.iter().enumerate() {
                inverse[o] = j as i64;
            }
            Tensor::<B, 1, Int>::from_data(TensorData::new(inverse, [n]), &device)
        });
        let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let mut x = self.embed(Tensor::<B, 2, Int>::from_data(
            TensorData::new(input, [1, n]),
            &device,
        ));
        for (l, layer) in self.model.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let (h, kvh, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
            let normed = layer.input_layernorm.forward(x.clone());
            let q = rows.project(&a.q_proj, l, 0, normed.clone()); // [1, n, h*d]
            let k = rows.project(&a.k_proj, l, 1, normed.clone()); // [1, n, kv*d]
            let v = rows.project(&a.v_proj, l, 2, normed); // [1, n, kv*d]
            let mut outs = Vec::with_capacity(chunks.len() + 1);
            if let Some(batch) = &decoding {
                let m = decode.len();
                let pick = |t: &Tensor<B, 3>, heads| {
                    t.clone()
                        .select(1, batch.rows.clone())
                        .reshape([m, heads, 1, d])
                };
                let qd = batch.rotation.apply(pick(&q, h)); // [m, h, 1, d]
                let kd = batch.rotation.apply(pick(&k, kvh)); // [m, kv, 1, d]
                let vd = pick(&v, kvh);
                for (j, &seg) in decode.iter().enumerate() {
                    kv.write(
                        l,
                        seg,
                        kd.clone().narrow(0, j, 1),
                        vd.clone().narrow(0, j, 1),
                    );
                }
                let out = kv.attend_decode(l, &decode, qd.clone()).unwrap_or_else(|| {
                    let (keys, values) = kv.read(l, &decode); // [m, kv, t, d]
                    grouped_attention(qd, keys, values, batch.mask.as_ref())
                }); // [m, 1, h*d]
                outs.push(out.reshape([1, m, h * d]));
            }
            for (&i, attend) in chunks.iter().zip(&attends) {
                let seg = segments[i];
                let part = |t: &Tensor<B, 3>, heads| {
                    heads_first(t.clone().narrow(1, offsets[i], seg.len), heads, d)
                };
                let qi = attend.rotation.apply(part(&q, h)); // [1, h, s, d]
                let ki = attend.rotation.apply(part(&k, kvh)); // [1, kv, s, d]
                kv.write(l, i, ki, part(&v, kvh));
                let (keys, values) = kv.read(l, &[i]);
                outs.push(grouped_attention(qi, keys, values, attend.mask.as_ref()));
            }
            let mut attn = Tensor::cat(outs, 1); // [1, n, h*d]
            if let Some(inverse) = &restore {
                attn = attn.select(1, inverse.clone());
            }
            let attn = rows.project(&a.o_proj, l, 3, attn);
            let x1 = x + attn;
            let normed = layer.post_attention_layernorm.forward(x1.clone());
            let m = &layer.mlp;
            let gate =
                burn::tensor::activation::silu(rows.project(&m.gate_proj, l, 4, normed.clone()));
            let up = rows.project(&m.up_proj, l, 5, normed);
            x = x1 + rows.project(&m.down_proj, l, 6, gate * up);
        }
        let e = x.dims()[2];
        assert!(wanted.iter().all(|&r| r < n), "wanted rows of the batch");
        if wanted.is_empty() {
            return None;
        }
        let s = wanted.len();
        let rows: Vec<i64> = wanted.iter().map(|&r| r as i64).collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [s]), &device);
        let hidden = x.reshape([n, e]).select(0, rows);
        Some(
            self.model
                .norm
                .forward(hidden.reshape([1, s, e]))
                .reshape([s, e]),
        )
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::Tolerance;

    use super::*;
    use crate::tiny::{tiny_adapter, tiny_config};
    use crate::KvCache;

    type B = NdArray<f32>;

    /// Each sequence's keys and values in a plain growing cache: `.1[seg]` is segment seg's
    /// sequence, `.2` what each (layer, sequence) holds.
    struct Caches(
        Vec<KvCache<B>>,
        Vec<usize>,
        std::collections::HashMap<(usize, usize), (Tensor<B, 4>, Tensor<B, 4>)>,
    );

    impl KvStore<B> for Caches {
        fn write(&mut self, layer: usize, seg: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
            let seq = self.1[seg];
            let all = crate::cache::LayerCache::append(self.0[seq].layer(layer), k, v);
            self.2.insert((layer, seq), all);
        }

        fn read(&mut self, layer: usize, segs: &[usize]) -> (Tensor<B, 4>, Tensor<B, 4>) {
            let parts: Vec<_> = segs
                .iter()
                .map(|&s| self.2[&(layer, self.1[s])].clone())
                .collect();
            let t = parts.iter().map(|(k, _)| k.dims()[2]).max().unwrap_or(0);
            let pad = |x: Tensor<B, 4>| {
                let [b, kv, len, d] = x.dims();
                Tensor::cat(
                    vec![x, Tensor::ones([b, kv, t - len, d], &Default::default())],
                    2,
                )
            };
            let (ks, vs): (Vec<_>, Vec<_>) =
                parts.into_iter().map(|(k, v)| (pad(k), pad(v))).unzip();
            (Tensor::cat(ks, 0), Tensor::cat(vs, 0))
        }
    }

    #[test]
    fn a_ragged_batch_of_mixed_adapters_equals_each_sequence_alone() {
        B::seed(&Default::default(), 11);
        let c = tiny_config();
        let base = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let pefts = [tiny_adapter(1), tiny_adapter(50)];
        let adapters: Vec<ServedAdapter<B>> = pefts
            .iter()
            .map(|p| ServedAdapter::new(&base, p, Path::new("a")).unwrap())
            .collect();
        let refs: Vec<&ServedAdapter<B>> = adapters.iter().collect();
        // Three sequences: base, adapter 0, adapter 1; prompts of different lengths.
        let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[100, 3], &[9, 9, 9, 40]];
        let which = [None, Some(0), Some(1)];
        let mut store = Caches(vec![KvCache::new(&c); 3], vec![0, 1, 2], Default::default());
        let segments: Vec<Segment> = prompts
            .iter()
            .zip(which)
            .map(|(p, adapter)| Segment {
                start: 0,
                len: p.len(),
                adapter,
            })
            .collect();
        let ids: Vec<u32> = prompts.concat();
        let lasts = [4, 6, 10]; // the last row of each prompt
        let first = base
            .forward_ragged(&ids, &segments, &refs, &mut store, &lasts)
            .unwrap();
        // Then one decode step each, in another order.
        let step_ids = [17u32, 18, 19];
        store.1 = vec![2, 0, 1];
        let order = [2, 0, 1];
        let step: Vec<Segment> = order
            .iter()
            .map(|&i| Segment {
                start: prompts[i].len(),
                len: 1,
                adapter: which[i],
            })
            .collect();
        let second = base
            .forward_ragged(&step_ids, &step, &refs, &mut store, &[0, 1, 2])
            .unwrap();

        for i in 0..3 {
            let mut alone = base.clone();
            if let Some(a) = which[i] {
                alone.attach_adapter(&pefts[a], Path::new("a")).unwrap();
            }
            let mut seq: Vec<u32> = prompts[i].to_vec();
            let full = |seq: &[u32]| {
                let v: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
                let ids = Tensor::<B, 2, Int>::from_data(
                    TensorData::new(v, [1, seq.len()]),
                    &Default::default(),
                );
                let h = alone.forward_hidden(ids, None);
                let [_, s, e] = h.dims();
                h.narrow(1, s - 1, 1).reshape([1, e])
            };
            let want = full(&seq);
            let got = first.clone().narrow(0, i, 1);
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-4));
            seq.push(step_ids[order.iter().position(|&o| o == i).unwrap()]);
            let want = full(&seq);
            let row = order.iter().position(|&o| o == i).unwrap();
            let got = second.clone().narrow(0, row, 1);
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-4));
        }
    }
}
