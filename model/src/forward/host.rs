//! The ragged forward of [`super::ragged`] run on the CPU in plain Rust over host buffers, as
//! llama.cpp runs a step: every thread of a [`team`] takes its share of each operation and
//! the threads meet at a barrier between operations.
//!
//! Through burn, a decode step is some 600 tensor operations, each allocating its result and
//! handing its work to the thread pool; at one to a few dozen rows those costs, not the
//! arithmetic, set the speed. Here the weights are read where they are (packed blocks, or
//! f32 tensors in place), the matrix products are the [`matvec`] kernels, RMSNorm, RoPE,
//! SwiGLU and the residuals are loops over rows, and keys and values go straight into the
//! paged cache's host blocks, which attention reads in place ([`attend_group`]).
//!
//! The arithmetic is the burn forward's, in the same order where it matters: a row's result
//! depends only on its own sequence, never on the rows it shares a step with.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;
use ft_quant::attention::{attend_group, KvElement, PagedLayout};
use ft_quant::matvec::{self, Q8Rows, Weights};
use ft_quant::packed::PackedData;
use ft_quant::team::{self, SharedMut, Team};
use ft_quant::{PackedWeight, QuantBackend};
use half::f16;

use crate::forward::llama::{LlamaForCausalLM, LoraLinear};
use crate::forward::ragged::{HostLowRank, Segment, ServedAdapter};
use crate::forward::{adapter_runs, Run};

// ----------------------------------------------------------------------------
// The paged KV cache in host memory

/// The keys and values of a paged cache in host memory, and where each segment's go. They
/// are held as f16, as llama.cpp's cache holds them: at 16 sequences reading them is most of
/// the attention's time.
pub struct HostKv<'a> {
    /// Per layer, the keys of every block, `[blocks, kv, block_size, d]`.
    pub keys: &'a mut [Vec<f16>],
    /// Per layer, the values, laid out as the keys.
    pub values: &'a mut [Vec<f16>],
    /// Positions per block.
    pub block_size: usize,
    /// Each segment's block table, covering its positions after this step.
    pub tables: &'a [&'a [usize]],
}

// ----------------------------------------------------------------------------
// Weights as the kernels read them: projections, layers and the model's sizes

/// A weight as the decoder reads it: packed in a kernel format, or an f32 tensor read in
/// place.
enum Stored<B: QuantBackend> {
    Packed(Arc<PackedWeight>),
    /// NF4 or FP4, with its absmax values decoded once (double quantization undone).
    FourBit {
        weight: Arc<PackedWeight>,
        absmax: Vec<f32>,
    },
    Dense(FloatTensor<B>),
}

impl<B: QuantBackend> Stored<B> {
    /// The weight of `linear`, if the kernels can read it.
    fn of(linear: &ft_quant::Linear<B>) -> Option<Self> {
        match (&linear.packed, &linear.weight) {
            (Some(p), _) => Self::packed(p.weight.clone()),
            (None, Some(w)) => Self::dense(w.val()),
            (None, None) => None,
        }
    }

    fn packed(weight: Arc<PackedWeight>) -> Option<Self> {
        if weight.kernel_weights().is_some() {
            return Some(Self::Packed(weight));
        }
        match &weight.data {
            PackedData::FourBit { absmax, .. }
                if weight.shape[1].is_multiple_of(matvec::FOUR_BIT_BLOCK) =>
            {
                let absmax = absmax.values();
                Some(Self::FourBit { weight, absmax })
            }
            _ => None,
        }
    }

    fn dense(weight: Tensor<B, 2>) -> Option<Self> {
        let t = weight.into_primitive().tensor();
        B::host_f32(&t)?;
        Some(Self::Dense(t))
    }

    fn weights(&self) -> Weights<'_> {
        match self {
            Self::Packed(w) => w.kernel_weights(),
            Self::FourBit { weight, absmax } => match &weight.data {
                PackedData::FourBit { kind, codes, .. } => Some(Weights::FourBit {
                    code: kind.code(),
                    codes,
                    absmax,
                }),
                _ => None,
            },
            Self::Dense(t) => B::host_f32(t).map(Weights::F32),
        }
        .expect("checked when the decoder was built")
    }
}

/// The update of an adapter attached to the model itself (`ft generate --adapter`).
struct OwnedLowRank {
    a: Vec<f32>,
    b_t: Vec<f32>,
    r: usize,
}

/// One projection: its weight, bias and the model's own adapter, if any.
struct HostLinear<B: QuantBackend> {
    weight: Stored<B>,
    /// [out]
    bias: Option<Vec<f32>>,
    lora: Option<OwnedLowRank>,
    n_in: usize,
    n_out: usize,
}

impl<B: QuantBackend> HostLinear<B> {
    fn new(layer: &LoraLinear<B>) -> Option<Self> {
        let [n_out, n_in] = layer.base.shape();
        let lora = layer.lora.as_ref().map(|l| {
            let a = host_vec(l.lora_a.val()); // [r, in]
            let b = host_vec(l.lora_b.val()); // [out, r]
            let r = a.len() / n_in.max(1);
            let scale = l.scale as f32;
            OwnedLowRank {
                a,
                b_t: (0..r)
                    .flat_map(|j| (0..n_out).map(move |o| (j, o)))
                    .map(|(j, o)| b[o * r + j] * scale)
                    .collect(),
                r,
            }
        });
        Some(Self {
            weight: Stored::of(&layer.base)?,
            bias: layer.base.bias.as_ref().map(|b| host_vec(b.val())),
            lora,
            n_in,
            n_out,
        })
    }
}

/// A tensor's values copied to the host.
pub(crate) fn host_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// One decoder layer's weights.
struct HostLayer<B: QuantBackend> {
    /// q, k, v, o, gate, up, down: [`crate::adapter::TARGETS`] order.
    linears: [HostLinear<B>; 7],
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
}

/// The sizes of the model.
#[derive(Debug, Clone, Copy)]
struct Dims {
    e: usize,
    h: usize,
    kv: usize,
    d: usize,
    f: usize,
    vocab: usize,
    eps: f32,
}

// ----------------------------------------------------------------------------
// The decoder: built from the model, and one step of a ragged batch on a team of threads

/// A model's weights arranged for the host forward: built once, beside the model, when every
/// weight is in host memory in a form the kernels read.
pub struct HostDecoder<B: QuantBackend> {
    /// [vocab, e], read in place.
    embed: FloatTensor<B>,
    /// RoPE tables [max_pos, d], read in place.
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    max_pos: usize,
    layers: Vec<HostLayer<B>>,
    norm: Vec<f32>,
    head: Stored<B>,
    dims: Dims,
}

impl<B: QuantBackend> std::fmt::Debug for HostDecoder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostDecoder({} layers, {:?})",
            self.layers.len(),
            self.dims
        )
    }
}

impl<B: QuantBackend> HostDecoder<B> {
    /// The decoder for `model`, or `None` where its backend does not keep f32 tensors in host
    /// memory or a weight is in a format the kernels do not read (then the burn forward runs).
    pub fn new(model: &LlamaForCausalLM<B>) -> Option<Self> {
        let embed = model.model.embed_tokens.val().into_primitive().tensor();
        B::host_f32(&embed)?;
        let rope = &model.model.rotary_emb;
        let [max_pos, d] = rope.cos.dims();
        let cos = rope.cos.clone().into_primitive().tensor();
        let sin = rope.sin.clone().into_primitive().tensor();
        B::host_f32(&cos)?;
        B::host_f32(&sin)?;
        let layers = model
            .model
            .layers
            .iter()
            .map(|layer| {
                let (a, m) = (&layer.self_attn, &layer.mlp);
                let linears = [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .map(HostLinear::new);
                if linears.iter().any(Option::is_none) {
                    return None;
                }
                Some(HostLayer {
                    linears: linears.map(|l| l.expect("checked above")),
                    input_norm: host_vec(layer.input_layernorm.weight.val()),
                    post_norm: host_vec(layer.post_attention_layernorm.weight.val()),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let (head, head_rows) = match &model.head_blocks {
            Some(p) => (Stored::packed(p.weight.clone())?, p.weight.shape[0]),
            None => {
                let w = model
                    .lm_head
                    .as_ref()
                    .unwrap_or(&model.model.embed_tokens)
                    .val();
                let rows = w.dims()[0];
                (Stored::dense(w)?, rows)
            }
        };
        let a = &model.model.layers.first()?.self_attn;
        let e = model.model.embed_tokens.dims()[1];
        let vocab = head_rows;
        let dims = Dims {
            e,
            h: a.num_heads,
            kv: a.num_kv_heads,
            d,
            f: model.model.layers[0].mlp.gate_proj.base.shape()[0],
            vocab,
            eps: model.model.norm.eps as f32,
        };
        Some(Self {
            embed,
            cos,
            sin,
            max_pos,
            layers,
            norm: host_vec(model.model.norm.weight.val()),
            head,
            dims,
        })
    }

    /// The logits after every position of `ids` run as one sequence from an empty cache,
    /// `[ids.len(), vocab]` (perplexity windows).
    pub fn sequence_logits(&self, ids: &[u32]) -> Vec<f32> {
        const BLOCK: usize = 16;
        let Dims { kv, d, .. } = self.dims;
        let blocks = ids.len().div_ceil(BLOCK).max(1);
        let empty = || vec![f16::ZERO; blocks * kv * BLOCK * d];
        let mut keys: Vec<Vec<f16>> = self.layers.iter().map(|_| empty()).collect();
        let mut values: Vec<Vec<f16>> = self.layers.iter().map(|_| empty()).collect();
        let table: Vec<usize> = (0..blocks).collect();
        let segment = Segment {
            start: 0,
            len: ids.len(),
            adapter: None,
        };
        let all: Vec<usize> = (0..ids.len()).collect();
        let kv = HostKv {
            keys: &mut keys,
            values: &mut values,
            block_size: BLOCK,
            tables: &[&table],
        };
        self.logits(ids, &[segment], &[], kv, &all, &mut Workspace::default())
    }

    /// Next-token logits after the rows `wanted` of the flattened batch, `[wanted.len(),
    /// vocab]`; the arguments are [`LlamaForCausalLM::forward_ragged`]'s. Each segment's keys
    /// and values go into `kv` at its positions.
    pub fn logits(
        &self,
        ids: &[u32],
        segments: &[Segment],
        adapters: &[&ServedAdapter<B>],
        kv: HostKv,
        wanted: &[usize],
        ws: &mut Workspace,
    ) -> Vec<f32> {
        let Dims {
            e,
            h,
            kv: kvh,
            d,
            f,
            vocab,
            ..
        } = self.dims;
        let n = ids.len();
        assert_eq!(n, segments.iter().map(|s| s.len).sum::<usize>());
        assert!(wanted.iter().all(|&r| r < n), "wanted rows of the batch");
        let positions: Vec<(usize, usize)> = segments
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.len).map(move |j| (i, s.start + j)))
            .collect();
        // Checked here, before the team starts: every thread must reach every barrier.
        assert!(
            positions.iter().all(|&(_, p)| p < self.max_pos),
            "positions within the RoPE tables"
        );
        let pool_blocks = kv
            .keys
            .first()
            .map_or(0, |k| k.len() / (kvh * kv.block_size * d));
        for (i, s) in segments.iter().enumerate() {
            let table = kv.tables[i];
            assert!(
                (s.start + s.len).div_ceil(kv.block_size) <= table.len()
                    && table.iter().all(|&b| b < pool_blocks),
                "segment {i}'s block table covers its positions within the pool"
            );
            assert!(
                s.adapter.is_none_or(|a| a < adapters.len()),
                "segment {i}'s adapter is one of the step's"
            );
        }
        // A (token, key/value head) pair's attention reads every position up to the token's,
        // plus a fixed cost for its softmax and output.
        let attention_costs: Vec<usize> = positions
            .iter()
            .flat_map(|&(_, p)| std::iter::repeat_n(p + 1 + 16, kvh))
            .collect();
        let runs = adapter_runs(segments);
        // Adapter matrices read in place for the step: primitives held here, slices below.
        let held: Vec<Vec<[Option<HostLowRank<B>>; 7]>> =
            adapters.iter().map(|a| a.host_parts()).collect();
        let low_rank: Vec<Vec<[Option<matvec::LowRank>; 7]>> = held
            .iter()
            .map(|layers| {
                layers
                    .iter()
                    .map(|mods| {
                        std::array::from_fn(|j| {
                            let (a, b, r) = mods[j].as_ref()?;
                            let host = "a served adapter on the model's host backend";
                            Some(matvec::LowRank {
                                a: B::host_f32(a).expect(host),
                                b_t: B::host_f32(b).expect(host),
                                r: *r,
                            })
                        })
                    })
                    .collect()
            })
            .collect();

        let qkv_width = (h + 2 * kvh) * d;
        // Every element of these is written before it is read.
        ws.x.resize(n * e, 0.0);
        ws.xn.resize(n * e, 0.0);
        ws.qkv.resize(n * qkv_width, 0.0);
        ws.attn.resize(n * h * d, 0.0);
        ws.act.resize(n * f, 0.0);
        ws.hidden.resize(wanted.len() * e, 0.0);
        let threads = team::size();
        ws.scratch.resize_with(threads, Default::default);
        let mut logits = vec![0f32; wanted.len() * vocab];
        // Each row quantized once for the products that read it, by the thread that wrote it:
        // the normed rows (q, k, v, then gate and up), the attention's output, the MLP's
        // activations and the final normed rows.
        let [q_normed, q_attn, q_act, q_hidden] = &mut ws.q8;
        let (q_normed, q_attn, q_act, q_hidden) = (
            q_normed.share(n * e),
            q_attn.share(n * h * d),
            q_act.share(n * f),
            q_hidden.share(wanted.len() * e),
        );
        let (x, xn, qkv, attn, act, hidden, out) = (
            SharedMut::new(&mut ws.x),
            SharedMut::new(&mut ws.xn),
            SharedMut::new(&mut ws.qkv),
            SharedMut::new(&mut ws.attn),
            SharedMut::new(&mut ws.act),
            SharedMut::new(&mut ws.hidden),
            SharedMut::new(&mut logits),
        );
        let scratch = &ws.scratch;
        let keys: Vec<SharedMut<f16>> = kv.keys.iter_mut().map(|k| SharedMut::new(k)).collect();
        let values: Vec<SharedMut<f16>> = kv.values.iter_mut().map(|v| SharedMut::new(v)).collect();
        let layout = PagedLayout {
            heads: h,
            kv_heads: kvh,
            block_size: kv.block_size,
            head_dim: d,
        };
        let embed = B::host_f32(&self.embed).expect("checked when built");
        let (cos, sin) = (
            B::host_f32(&self.cos).expect("checked when built"),
            B::host_f32(&self.sin).expect("checked when built"),
        );
        let step = Step {
            decoder: self,
            n,
            runs: &runs,
            low_rank: &low_rank,
        };

        team::run(|team| {
            let mut guard = scratch[team.index()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Scratch { work: s, gate } = &mut *guard;
            let tokens = team.share(n, 1);
            // SAFETY (every block below): each thread writes only its share (of tokens, of
            // output columns or of (token, head) pairs) between two barriers, and reads
            // shared buffers only after the barrier that ends their writes.
            for i in tokens.clone() {
                let id = ids[i] as usize;
                unsafe { x.slice_mut(i * e..(i + 1) * e) }
                    .copy_from_slice(&embed[id * e..(id + 1) * e]);
            }
            let needs_q8 =
                |linears: &[&HostLinear<B>]| linears.iter().any(|p| p.weight.weights().needs_q8());
            for (l, layer) in self.layers.iter().enumerate() {
                let [q_lin, k_lin, v_lin, o_lin, gate_lin, up_lin, down_lin] = &layer.linears;
                let qkv_q8 = needs_q8(&[q_lin, k_lin, v_lin]);
                for i in tokens.clone() {
                    let row = unsafe { x.slice(i * e..(i + 1) * e) };
                    let normed = unsafe { xn.slice_mut(i * e..(i + 1) * e) };
                    rms_norm(row, &layer.input_norm, self.dims.eps, normed);
                    if qkv_q8 {
                        unsafe { q_normed.quantize_at(i * e, normed) };
                    }
                }
                team.sync();
                // q | k | v, side by side in each token's row.
                let xs = unsafe { xn.get() };
                let xq = qkv_q8.then(|| unsafe { q_normed.get() });
                let parts = [
                    (q_lin, 0usize, 0usize),
                    (k_lin, 1, h * d),
                    (v_lin, 2, (h + kvh) * d),
                ];
                let share = team.share(qkv_width, matvec::WEIGHT_ROWS);
                for &(linear, module, offset) in &parts {
                    let mine = overlap(&share, offset..offset + linear.n_out);
                    if mine.is_empty() {
                        continue;
                    }
                    let local = mine.start - offset..mine.end - offset;
                    let ys = step.project(s, l, module, linear, xs, xq, local.clone());
                    unsafe { put_columns(&qkv, qkv_width, mine, ys) };
                }
                team.sync();
                // RoPE on q and k, then k and v into the cache.
                for i in tokens.clone() {
                    let (seg, pos) = positions[i];
                    let row = unsafe { qkv.slice_mut(i * qkv_width..(i + 1) * qkv_width) };
                    let (c, sn) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
                    for head in row[..(h + kvh) * d].chunks_exact_mut(d) {
                        rotate_half(head, c, sn);
                    }
                    let table = kv.tables[seg];
                    let block = table[pos / kv.block_size];
                    for g in 0..kvh {
                        let at = ((block * kvh + g) * kv.block_size + pos % kv.block_size) * d;
                        let k_src = &row[(h + g) * d..(h + g + 1) * d];
                        f16::narrow(k_src, unsafe { keys[l].slice_mut(at..at + d) });
                        let v_src = &row[(h + kvh + g) * d..(h + kvh + g + 1) * d];
                        f16::narrow(v_src, unsafe { values[l].slice_mut(at..at + d) });
                    }
                }
                team.sync();
                let (ks, vs) = unsafe { (keys[l].get(), values[l].get()) };
                let qs = unsafe { qkv.get() };
                let g = h / kvh;
                for pair in team.share_by_cost(&attention_costs) {
                    let (i, group) = (pair / kvh, pair % kvh);
                    let (seg, pos) = positions[i];
                    let q = &qs[i * qkv_width + group * g * d..][..g * d];
                    let o = unsafe { attn.slice_mut(pair * g * d..(pair + 1) * g * d) };
                    let table = kv.tables[seg];
                    attend_group(q, ks, vs, layout, group, table, pos + 1, &mut s.scores, o);
                }
                team.sync();
                let xs = unsafe { attn.get() };
                let o_q8 = needs_q8(&[o_lin]);
                if o_q8 {
                    // A token's heads come from several threads: quantized after they meet.
                    for i in tokens.clone() {
                        let at = i * h * d;
                        unsafe { q_attn.quantize_at(at, &xs[at..at + h * d]) };
                    }
                    team.sync();
                }
                let xq = o_q8.then(|| unsafe { q_attn.get() });
                step.add_projection(s, team, l, 3, o_lin, xs, xq, &x);
                team.sync();
                let gate_up_q8 = needs_q8(&[gate_lin, up_lin]);
                for i in tokens.clone() {
                    let row = unsafe { x.slice(i * e..(i + 1) * e) };
                    let normed = unsafe { xn.slice_mut(i * e..(i + 1) * e) };
                    rms_norm(row, &layer.post_norm, self.dims.eps, normed);
                    if gate_up_q8 {
                        unsafe { q_normed.quantize_at(i * e, normed) };
                    }
                }
                team.sync();
                // gate and up over the same columns, then silu(gate) * up, quantized by
                // whole blocks (the columns are shared out in blocks) for the down product.
                let xs = unsafe { xn.get() };
                let xq = gate_up_q8.then(|| unsafe { q_normed.get() });
                let down_q8 = needs_q8(&[down_lin]);
                let mine = team.share(f, matvec::BLOCK);
                if !mine.is_empty() {
                    gate.clear();
                    gate.extend_from_slice(step.project(s, l, 4, gate_lin, xs, xq, mine.clone()));
                    let up = step.project(s, l, 5, up_lin, xs, xq, mine.clone());
                    ft_quant::exp::silu_times(gate, up);
                    unsafe { put_columns(&act, f, mine.clone(), gate) };
                    if down_q8 {
                        for (i, row) in gate.chunks_exact(mine.len()).enumerate() {
                            unsafe { q_act.quantize_at(i * f + mine.start, row) };
                        }
                    }
                }
                team.sync();
                let xs = unsafe { act.get() };
                let xq = down_q8.then(|| unsafe { q_act.get() });
                step.add_projection(s, team, l, 6, down_lin, xs, xq, &x);
                team.sync();
            }
            // The final norm of the wanted rows, then the head.
            let head = self.head.weights();
            for w in team.share(wanted.len(), 1) {
                let i = wanted[w];
                let row = unsafe { x.slice(i * e..(i + 1) * e) };
                let normed = unsafe { hidden.slice_mut(w * e..(w + 1) * e) };
                rms_norm(row, &self.norm, self.dims.eps, normed);
                if head.needs_q8() {
                    unsafe { q_hidden.quantize_at(w * e, normed) };
                }
            }
            team.sync();
            let m = wanted.len();
            let hs = unsafe { hidden.get() };
            let xq = head.needs_q8().then(|| unsafe { q_hidden.get() });
            let mine = team.share(vocab, matvec::WEIGHT_ROWS);
            if !mine.is_empty() && m > 0 {
                let mut ys = std::mem::take(&mut s.out);
                ys.resize(mine.len() * m, 0.0);
                matvec::weight_rows(head, e, hs, xq, m, mine.clone(), &mut ys);
                unsafe { put_columns(&out, vocab, mine, &ys) };
                s.out = ys;
            }
        });
        logits
    }
}

// ----------------------------------------------------------------------------
// Projections: a thread's share of a linear's rows, with bias and adapters

/// What every thread of one step reads.
struct Step<'a, B: QuantBackend> {
    decoder: &'a HostDecoder<B>,
    n: usize,
    runs: &'a [Run],
    /// Per adapter, per layer, per module.
    low_rank: &'a [Vec<[Option<matvec::LowRank<'a>>; 7]>],
}

impl<B: QuantBackend> Step<'_, B> {
    /// Output rows `rows` of `linear` (module `module` of layer `layer`) for all n tokens of
    /// `x` (`xq`: x quantized, where the weight reads it), with bias and adapters: `[n,
    /// rows.len()]`, in `s.out`.
    #[allow(clippy::too_many_arguments)]
    fn project<'s>(
        &self,
        s: &'s mut Work,
        layer: usize,
        module: usize,
        linear: &HostLinear<B>,
        x: &[f32],
        xq: Option<&Q8Rows>,
        rows: Range<usize>,
    ) -> &'s [f32] {
        let n = self.n;
        let k = linear.n_in;
        s.out.resize(rows.len() * n, 0.0);
        let mut out = std::mem::take(&mut s.out);
        matvec::weight_rows(linear.weight.weights(), k, x, xq, n, rows.clone(), &mut out);
        if let Some(bias) = &linear.bias {
            for ys in out.chunks_mut(rows.len()) {
                for (y, b) in ys.iter_mut().zip(&bias[rows.clone()]) {
                    *y += b;
                }
            }
        }
        if let Some(own) = &linear.lora {
            let lr = matvec::LowRank {
                a: &own.a,
                b_t: &own.b_t,
                r: own.r,
            };
            lr.add(x, k, 0..n, rows.clone(), n, &mut out, &mut s.t);
        }
        for &run in self.runs {
            if let Some(lr) = &self.low_rank[run.adapter][layer][module] {
                let tokens = run.start..run.start + run.len;
                lr.add(x, k, tokens, rows.clone(), n, &mut out, &mut s.t);
            }
        }
        s.out = out;
        &s.out
    }

    /// This thread's share of the output columns of `linear` added into the residual `x`.
    #[allow(clippy::too_many_arguments)]
    fn add_projection(
        &self,
        s: &mut Work,
        team: &Team,
        layer: usize,
        module: usize,
        linear: &HostLinear<B>,
        input: &[f32],
        input_q8: Option<&Q8Rows>,
        x: &SharedMut<f32>,
    ) {
        let e = self.decoder.dims.e;
        let mine = team.share(linear.n_out, matvec::WEIGHT_ROWS);
        if mine.is_empty() {
            return;
        }
        let ys = self.project(s, layer, module, linear, input, input_q8, mine.clone());
        for (i, y) in ys.chunks_exact(mine.len()).enumerate() {
            // SAFETY: these columns of x are this thread's until the next barrier.
            let dst = unsafe { x.slice_mut(i * e + mine.start..i * e + mine.end) };
            for (o, y) in dst.iter_mut().zip(y) {
                *o += y;
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Buffers kept between steps, and each thread's scratch

/// The buffers of [`HostDecoder::logits`], kept between steps (each step then allocates
/// only its result).
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    act: Vec<f32>,
    hidden: Vec<f32>,
    /// The quantized rows of the normed rows, the attention's output, the MLP's activations
    /// and the final normed rows.
    q8: [Q8Rows; 4],
    /// One per thread of the team.
    scratch: Vec<Mutex<Scratch>>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workspace({} rows)", self.x.len())
    }
}

/// One thread's scratch space: its products' buffers and the gate of the MLP.
#[derive(Default)]
struct Scratch {
    work: Work,
    gate: Vec<f32>,
}

/// One thread's buffers for the products of one operation.
#[derive(Default)]
struct Work {
    out: Vec<f32>,
    t: Vec<f32>,
    scores: Vec<f32>,
}

// ----------------------------------------------------------------------------
// Row operations: column copies, RMSNorm and RoPE

/// Copies `ys` (rows of `cols.len()` values, as [`matvec::weight_rows`] writes them) into
/// columns `cols` of the rows of `dst` (rows of `width`).
///
/// # Safety
/// Those columns of `dst` are this thread's until the next barrier.
unsafe fn put_columns(dst: &SharedMut<f32>, width: usize, cols: Range<usize>, ys: &[f32]) {
    for (i, y) in ys.chunks_exact(cols.len()).enumerate() {
        dst.slice_mut(i * width + cols.start..i * width + cols.end)
            .copy_from_slice(y);
    }
}

/// The part of `b` inside `a` (possibly empty).
fn overlap(a: &Range<usize>, b: Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

/// x / sqrt(mean(x^2) + eps) * weight, as [`crate::forward::llama::RmsNorm`] computes it.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let rms = (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / rms * w;
    }
}

/// HF's rotate-half RoPE on one head in place: x * cos + rotate_half(x) * sin.
fn rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] + -b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// ----------------------------------------------------------------------------
// Tests: the host step against the burn forward

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::NdArray;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, TensorData};
    use ft_quant::QuantFormat;

    use super::*;
    use crate::tiny::{tiny_adapter, tiny_config};

    type B = NdArray<f32>;

    /// `model` with every linear whose rows are whole blocks stored as `format`, and the head.
    fn packed(mut model: LlamaForCausalLM<B>, format: QuantFormat) -> LlamaForCausalLM<B> {
        for layer in &mut model.model.layers {
            let (linears, _) = layer.parts_mut();
            for (_, linear) in linears {
                let shape = linear.base.shape();
                let data = host_vec(linear.base.weight(&Default::default()));
                if let Some(p) = PackedWeight::quantize(format, false, &data, shape) {
                    let bias = linear.base.bias.as_ref().map(|b| b.val());
                    linear.base = ft_quant::Linear::packed(p, bias);
                }
            }
        }
        if format.ggml().is_some() || format == QuantFormat::Bf16 {
            model.pack_head(format);
        }
        model
    }

    /// Next-token logits after `seq` from burn's plain forward of the whole sequence.
    fn burn_logits(model: &LlamaForCausalLM<B>, seq: &[u32]) -> Vec<f32> {
        let v: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, seq.len()]), &Default::default());
        let h = model.forward_hidden(ids, None);
        let [_, s, e] = h.dims();
        model.host_logits(h.narrow(1, s - 1, 1).reshape([1, e]))
    }

    /// Largest logit difference from burn's forward (logits of about 0.35 here): the host
    /// cache rounds keys and values to f16 (2^-11 relative), burn's keeps f32, and where
    /// activations are quantized to 8 bits per block a code can round the other way (seen:
    /// 2e-4 for f32 activations, 3e-3 for quantized ones).
    fn f16_kv_tolerance(format: QuantFormat) -> f32 {
        if format.ggml().is_some() {
            1e-2
        } else {
            2e-3
        }
    }

    /// Paged host storage with each sequence in its own blocks.
    struct Pool {
        keys: Vec<Vec<f16>>,
        values: Vec<Vec<f16>>,
        tables: Vec<Vec<usize>>,
        ws: Workspace,
    }

    const BLOCK: usize = 4;

    impl Pool {
        fn new(sequences: usize, blocks_each: usize) -> Self {
            let c = tiny_config();
            let len = sequences * blocks_each * c.num_key_value_heads * BLOCK * c.head_dim;
            Self {
                keys: vec![vec![f16::ZERO; len]; c.num_hidden_layers],
                values: vec![vec![f16::ZERO; len]; c.num_hidden_layers],
                // Interleaved blocks, so that no sequence's blocks are contiguous.
                tables: (0..sequences)
                    .map(|s| (0..blocks_each).map(|b| b * sequences + s).collect())
                    .collect(),
                ws: Workspace::default(),
            }
        }

        /// Runs one step of `segments` (segment i continues sequence `seqs[i]`).
        fn step(
            &mut self,
            decoder: &HostDecoder<B>,
            ids: &[u32],
            segments: &[Segment],
            seqs: &[usize],
            adapters: &[&ServedAdapter<B>],
        ) -> Vec<Vec<f32>> {
            let tables: Vec<&[usize]> = seqs.iter().map(|&s| self.tables[s].as_slice()).collect();
            let kv = HostKv {
                keys: &mut self.keys,
                values: &mut self.values,
                block_size: BLOCK,
                tables: &tables,
            };
            let mut last = 0;
            let wanted: Vec<usize> = segments
                .iter()
                .map(|s| {
                    last += s.len;
                    last - 1
                })
                .collect();
            let logits = decoder.logits(ids, segments, adapters, kv, &wanted, &mut self.ws);
            let vocab = logits.len() / wanted.len();
            logits.chunks(vocab).map(<[f32]>::to_vec).collect()
        }
    }

    #[test]
    fn a_host_step_of_mixed_adapters_equals_each_sequence_alone_through_burn() {
        B::seed(&Default::default(), 21);
        // Qwen2's q/k/v biases too.
        for bias in [false, true] {
            let c = crate::LlamaConfig {
                attention_bias: bias,
                ..tiny_config()
            };
            let model = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
            assert_eq!(
                model.model.layers[0].self_attn.q_proj.base.bias.is_some(),
                bias
            );
            host_step_equals_burn(&model);
        }
    }

    fn host_step_equals_burn(dense: &LlamaForCausalLM<B>) {
        let pefts = [tiny_adapter(3), tiny_adapter(70)];
        let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9, 10], &[100, 3], &[9, 9, 9, 40, 41]];
        let which = [Some(1), None, Some(0)];
        for format in [
            QuantFormat::F32,
            QuantFormat::Bf16,
            QuantFormat::Q8_0,
            QuantFormat::Q4_0,
            QuantFormat::Q4_1,
        ] {
            let model = match format {
                QuantFormat::F32 => dense.clone(),
                _ => packed(dense.clone(), format),
            };
            let decoder = HostDecoder::new(&model).expect("a host model");
            let served: Vec<ServedAdapter<B>> = pefts
                .iter()
                .map(|p| ServedAdapter::new(&model, p, Path::new("a")).unwrap())
                .collect();
            let refs: Vec<&ServedAdapter<B>> = served.iter().collect();
            let alone: Vec<LlamaForCausalLM<B>> = which
                .iter()
                .map(|w| {
                    let mut m = model.clone();
                    if let Some(a) = w {
                        m.attach_adapter(&pefts[*a], Path::new("a")).unwrap();
                    }
                    m
                })
                .collect();

            // All three prompts in one step, then two decode steps in another order.
            let mut pool = Pool::new(3, 4);
            let segments: Vec<Segment> = (0..3)
                .map(|i| Segment {
                    start: 0,
                    len: prompts[i].len(),
                    adapter: which[i],
                })
                .collect();
            let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
            let mut got = pool.step(&decoder, &prompts.concat(), &segments, &[0, 1, 2], &refs);
            for step in 0..3 {
                let order: Vec<usize> = if step == 0 {
                    vec![0, 1, 2]
                } else {
                    vec![2, 0, 1]
                };
                for (row, &i) in order.iter().enumerate() {
                    let want = burn_logits(&alone[i], &seqs[i]);
                    let max = got[row]
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    let tolerance = f16_kv_tolerance(format);
                    assert!(max < tolerance, "{format} step {step} sequence {i}: {max}");
                }
                if step == 2 {
                    break;
                }
                let next: Vec<usize> = if step == 0 {
                    vec![2, 0, 1]
                } else {
                    vec![1, 2, 0]
                };
                let ids: Vec<u32> = next.iter().map(|&i| 17 + i as u32 + step as u32).collect();
                let decode: Vec<Segment> = next
                    .iter()
                    .map(|&i| Segment {
                        start: seqs[i].len(),
                        len: 1,
                        adapter: which[i],
                    })
                    .collect();
                for (&i, &id) in next.iter().zip(&ids) {
                    seqs[i].push(id);
                }
                got = pool.step(&decoder, &ids, &decode, &next, &refs);
                if step == 1 {
                    // Rows came back in `next` order: put them in the order checked above.
                    let order = [2, 0, 1];
                    got = order
                        .iter()
                        .map(|i| got[next.iter().position(|n| n == i).unwrap()].clone())
                        .collect();
                }
            }
        }
    }

    #[test]
    fn four_bit_weights_run_on_the_host_as_through_burn() {
        B::seed(&Default::default(), 13);
        // Rows of whole 64-blocks, as the 4-bit kernels need.
        let c = crate::LlamaConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            ..tiny_config()
        };
        let dense = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        for format in [QuantFormat::Nf4, QuantFormat::Fp4] {
            let model = packed(dense.clone(), format);
            assert_eq!(model.model.layers[0].mlp.down_proj.base.format(), format);
            let decoder = HostDecoder::new(&model).expect("a host model");
            let seq: Vec<u32> = (0..11).map(|i| i * 23 % 250).collect();
            let got = decoder.sequence_logits(&seq);
            let vocab = got.len() / seq.len();
            for end in [3, seq.len()] {
                let want = burn_logits(&model, &seq[..end]);
                let row = &got[(end - 1) * vocab..end * vocab];
                let max = row
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    max < f16_kv_tolerance(format),
                    "{format} after {end} tokens: {max}"
                );
            }
        }
    }

    #[test]
    fn a_sequence_gets_the_same_bits_in_a_batch_and_alone() {
        B::seed(&Default::default(), 5);
        let model = packed(
            LlamaForCausalLM::<B>::init_random(&tiny_config(), &Default::default()),
            QuantFormat::Q8_0,
        );
        let decoder = HostDecoder::new(&model).unwrap();
        let peft = tiny_adapter(9);
        let served = ServedAdapter::new(&model, &peft, Path::new("a")).unwrap();
        let prompts: [&[u32]; 4] = [
            &[1, 2, 3],
            &[4, 5, 6, 7, 8, 9, 10, 11, 12],
            &[13],
            &[14, 15],
        ];
        let seg = |i: usize, start: usize, len: usize| Segment {
            start,
            len,
            adapter: i.is_multiple_of(2).then_some(0),
        };
        let mut batch = Pool::new(4, 4);
        let segments: Vec<Segment> = (0..4).map(|i| seg(i, 0, prompts[i].len())).collect();
        let together = batch.step(
            &decoder,
            &prompts.concat(),
            &segments,
            &[0, 1, 2, 3],
            &[&served],
        );
        let step: Vec<Segment> = (0..4).map(|i| seg(i, prompts[i].len(), 1)).collect();
        let next = batch.step(
            &decoder,
            &[30, 31, 32, 33],
            &step,
            &[0, 1, 2, 3],
            &[&served],
        );
        for i in 0..4 {
            let mut alone = Pool::new(1, 4);
            let first = alone.step(
                &decoder,
                prompts[i],
                &[seg(i, 0, prompts[i].len())],
                &[0],
                &[&served],
            );
            assert_eq!(first[0], together[i], "prompt of sequence {i}");
            let second = alone.step(
                &decoder,
                &[30 + i as u32],
                &[seg(i, prompts[i].len(), 1)],
                &[0],
                &[&served],
            );
            assert_eq!(second[0], next[i], "decode step of sequence {i}");
        }
    }
}
