//! The forward of a ragged batch, as serving engines run it (vLLM, S-LoRA): the new tokens of
//! many sequences, each at its own position, flattened into one row, so that every linear layer
//! reads its weights once per step for all of them. Attention runs per sequence over keys and
//! values that the caller stores (a paged KV cache). Each sequence may apply its own LoRA
//! adapter: the update is computed once per run of consecutive rows sharing an adapter
//! (Punica's segmented gather matmul, SGMV), and rows without one get the base alone.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use ft_adapters::peft::PeftAdapter;
use ft_adapters::Lora;
use ft_quant::QuantBackend;

use crate::adapter::lora_from;
use crate::error::ModelError;
use crate::llama::{grouped_attention, heads_first, Attend, LlamaForCausalLM, LoraLinear};

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
    /// Stores the rotated keys and the values `[1, kv, s, d]` of segment `seg`'s new tokens in
    /// `layer`, and returns every key and value of that sequence, `[1, kv, start + s, d]`.
    fn write_and_read(
        &mut self,
        layer: usize,
        seg: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>);
}

/// One PEFT adapter held apart from the model, so that rows of one batch can each use their
/// own: `layers[i][j]` is layer i's linear j in [`crate::adapter::TARGETS`] order.
#[derive(Debug)]
pub struct ServedAdapter<B: Backend> {
    layers: Vec<[Option<Lora<B>>; 7]>,
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
        let config = adapter.config.lora_config();
        let device = model.device();
        let mut layers: Vec<[Option<Lora<B>>; 7]> = (0..model.model.layers.len())
            .map(|_| Default::default())
            .collect();
        for (index, w) in plan {
            layers[index / 7][index % 7] = Some(lora_from(&config, w, &device));
        }
        Ok(Self { layers })
    }

    /// Parameters held, for memory accounting.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|l| {
                l.lora_a.val().dims().iter().product::<usize>()
                    + l.lora_b.val().dims().iter().product::<usize>()
            })
            .sum()
    }
}

/// Consecutive rows of the flattened batch that share an adapter.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: usize,
    len: usize,
    adapter: usize,
}

/// The adapters of one forward and the rows each applies to.
struct RowAdapters<'a, B: Backend> {
    runs: Vec<Run>,
    adapters: &'a [&'a ServedAdapter<B>],
}

impl<B: QuantBackend> RowAdapters<'_, B> {
    /// `linear` (module `module` of layer `layer`) on every row, plus each run's adapter.
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
        let out = y.dims()[2];
        for run in &self.runs {
            let Some(lora) = &self.adapters[run.adapter].layers[layer][module] else {
                continue;
            };
            let rows = [0..1, run.start..run.start + run.len, 0..out];
            let delta = lora.forward(x.clone().narrow(1, run.start, run.len));
            let updated = y.clone().slice(rows.clone()) + delta;
            y = y.slice_assign(rows, updated);
        }
        y
    }
}

impl<B: QuantBackend> LlamaForCausalLM<B> {
    /// Final hidden states of the last new token of each segment, `[segments, e]`.
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
    ) -> Tensor<B, 2> {
        let device = self.device();
        let n = ids.len();
        debug_assert_eq!(n, segments.iter().map(|s| s.len).sum::<usize>());
        let mut offsets = Vec::with_capacity(segments.len());
        let mut runs: Vec<Run> = Vec::new();
        let mut at = 0;
        for seg in segments {
            offsets.push(at);
            if let Some(a) = seg.adapter {
                match runs.last_mut() {
                    Some(r) if r.adapter == a && r.start + r.len == at => r.len += seg.len,
                    _ => runs.push(Run {
                        start: at,
                        len: seg.len,
                        adapter: a,
                    }),
                }
            }
            at += seg.len;
        }
        let rows = RowAdapters { runs, adapters };
        let attends: Vec<Attend<B>> = segments
            .iter()
            .map(|s| Attend::causal(&self.model.rotary_emb, s.start, s.len, &device))
            .collect();
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
            let mut outs = Vec::with_capacity(segments.len());
            for (i, (seg, attend)) in segments.iter().zip(&attends).enumerate() {
                let part = |t: &Tensor<B, 3>, heads| {
                    heads_first(t.clone().narrow(1, offsets[i], seg.len), heads, d)
                };
                let qi = attend.rotation.apply(part(&q, h)); // [1, h, s, d]
                let ki = attend.rotation.apply(part(&k, kvh)); // [1, kv, s, d]
                let (keys, values) = kv.write_and_read(l, i, ki, part(&v, kvh));
                outs.push(grouped_attention(qi, keys, values, attend.mask.as_ref()));
            }
            let attn = rows.project(&a.o_proj, l, 3, Tensor::cat(outs, 1));
            let x1 = x + attn;
            let normed = layer.post_attention_layernorm.forward(x1.clone());
            let m = &layer.mlp;
            let gate =
                burn::tensor::activation::silu(rows.project(&m.gate_proj, l, 4, normed.clone()));
            let up = rows.project(&m.up_proj, l, 5, normed);
            x = x1 + rows.project(&m.down_proj, l, 6, gate * up);
        }
        let e = x.dims()[2];
        let last: Vec<i64> = segments
            .iter()
            .zip(&offsets)
            .map(|(s, o)| (o + s.len - 1) as i64)
            .collect();
        let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [segments.len()]), &device);
        let hidden = x.reshape([n, e]).select(0, last);
        let [s, _] = hidden.dims();
        self.model
            .norm
            .forward(hidden.reshape([1, s, e]))
            .reshape([s, e])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::backend::NdArray;
    use burn::tensor::Tolerance;
    use ft_adapters::peft::{LoraWeights, Matrix, PeftConfig};

    use super::*;
    use crate::tiny::tiny_config;
    use crate::KvCache;

    type B = NdArray<f32>;

    /// Each sequence's keys and values in a plain growing cache.
    struct Caches(Vec<KvCache<B>>, Vec<usize>);

    impl KvStore<B> for Caches {
        fn write_and_read(
            &mut self,
            layer: usize,
            seg: usize,
            k: Tensor<B, 4>,
            v: Tensor<B, 4>,
        ) -> (Tensor<B, 4>, Tensor<B, 4>) {
            let seq = self.1[seg];
            crate::cache::LayerCache::append(self.0[seq].layer(layer), k, v)
        }
    }

    fn adapter(seed: usize, model: &LlamaForCausalLM<B>) -> ServedAdapter<B> {
        let matrix = |shape: [usize; 2], s: usize| Matrix {
            shape,
            data: (0..shape[0] * shape[1])
                .map(|i| (((i + s) * 7919 % 97) as f32 - 48.0) * 0.01)
                .collect(),
        };
        let c = tiny_config();
        let mut modules = BTreeMap::new();
        for i in 0..c.num_hidden_layers {
            modules.insert(
                format!("model.layers.{i}.self_attn.v_proj"),
                LoraWeights {
                    a: matrix([2, 32], seed + i),
                    b: matrix([16, 2], seed + i + 1),
                },
            );
            modules.insert(
                format!("model.layers.{i}.mlp.up_proj"),
                LoraWeights {
                    a: matrix([2, 32], seed + i + 2),
                    b: matrix([48, 2], seed + i + 3),
                },
            );
        }
        let config: PeftConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "target_modules": ["v_proj", "up_proj"], "bias": "none"
        }))
        .unwrap();
        let peft = PeftAdapter { config, modules };
        ServedAdapter::new(model, &peft, Path::new("a")).unwrap()
    }

    #[test]
    fn a_ragged_batch_of_mixed_adapters_equals_each_sequence_alone() {
        B::seed(&Default::default(), 11);
        let c = tiny_config();
        let base = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let adapters = [adapter(1, &base), adapter(50, &base)];
        let refs: Vec<&ServedAdapter<B>> = adapters.iter().collect();
        // Three sequences: base, adapter 0, adapter 1; prompts of different lengths.
        let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[100, 3], &[9, 9, 9, 40]];
        let which = [None, Some(0), Some(1)];
        let mut store = Caches(vec![KvCache::new(&c); 3], vec![0, 1, 2]);
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
        let first = base.forward_ragged(&ids, &segments, &refs, &mut store);
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
        let second = base.forward_ragged(&step_ids, &step, &refs, &mut store);

        for i in 0..3 {
            let mut alone = base.clone();
            if let Some(a) = which[i] {
                for (l, layer) in alone.model.layers.iter_mut().enumerate() {
                    let (linears, _) = layer.parts_mut();
                    for (j, (_, linear)) in linears.into_iter().enumerate() {
                        if let Some(lora) = &adapters[a].layers[l][j] {
                            linear.attach_in_place(lora.clone());
                        }
                    }
                }
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
