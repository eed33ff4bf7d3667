//! The Llama-family decoder: Llama, SmolLM2, Mistral and Qwen2 share this one file.
//!
//! Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"
//! (arXiv:2302.13971): pre-norm decoder with RMSNorm (Zhang & Sennrich 2019), rotary position
//! embeddings (Su et al. 2021, arXiv:2104.09864), SwiGLU MLP (Shazeer 2020) and grouped-query
//! attention (Ainslie et al. 2023, arXiv:2305.13245). Follows HF transformers
//! `models/llama/modeling_llama.py`; field names are its checkpoint names, so loading is a walk
//! over `model.layers.{i}.self_attn.q_proj.weight` and friends with no remapping.
//!
//! Shapes: b = batch, s = new tokens, t = cached + new tokens, h = query heads,
//! kv = key/value heads, g = h / kv, d = head_dim, e = hidden_size, f = intermediate_size.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData, TensorPrimitive};
use ft_quant::QuantBackend;

pub use ft_adapters::LoraLinear;
use ft_quant::linear::{project, Packed};
pub use ft_quant::Linear;

use crate::cache::{KvCache, LayerCache};
use crate::config::LlamaConfig;

/// Root-mean-square layer norm: x / sqrt(mean(x^2) + eps) * weight.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// [e]
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square for stability.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - x: `[b, s, e]` -> `[b, s, e]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rms = (x.clone().powi_scalar(2).mean_dim(2) + self.eps).sqrt(); // [b, s, 1]
        x / rms * self.weight.val().unsqueeze::<3>()
    }
}

/// Rotary position embedding tables in the HF "rotate half" layout: dimension i and i + d/2
/// form a pair rotated by angle pos * inv_freq[i]. Constant tensors derived from the config,
/// never trained.
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    /// [max_pos, d]: cos(pos * inv_freq) repeated over both halves.
    pub(crate) cos: Tensor<B, 2>,
    /// [max_pos, d]
    pub(crate) sin: Tensor<B, 2>,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Precomputes the tables for `max_pos` positions (in f64, then rounded to f32).
    pub fn new(config: &LlamaConfig, device: &B::Device) -> Self {
        let inv_freq = config.rope_inv_freq();
        let d = config.head_dim;
        let max_pos = config.max_position_embeddings;
        let mut cos = Vec::with_capacity(max_pos * d);
        let mut sin = Vec::with_capacity(max_pos * d);
        for pos in 0..max_pos {
            for _half in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Self {
            cos: Tensor::from_data(
                TensorData::new(cos, [max_pos, d]).convert::<B::FloatElem>(),
                device,
            ),
            sin: Tensor::from_data(
                TensorData::new(sin, [max_pos, d]).convert::<B::FloatElem>(),
                device,
            ),
        }
    }

    /// The rotation of `s` consecutive positions from `start` (incremental decoding).
    pub fn at(&self, start: usize, s: usize) -> Rotation<B> {
        Rotation {
            cos: self.cos.clone().narrow(0, start, s).unsqueeze::<4>(), // [1, 1, s, d]
            sin: self.sin.clone().narrow(0, start, s).unsqueeze::<4>(),
        }
    }

    /// The rotation of explicit position ids (packed sequences restart at 0 per document).
    ///
    /// # Shapes
    /// - positions: `[b, s]` -> cos, sin `[b, 1, s, d]`
    pub fn at_positions(&self, positions: Tensor<B, 2, Int>) -> Rotation<B> {
        let [b, s] = positions.dims();
        let d = self.cos.dims()[1];
        let flat = positions.reshape([b * s]);
        Rotation {
            cos: self
                .cos
                .clone()
                .select(0, flat.clone())
                .reshape([b, 1, s, d]),
            sin: self.sin.clone().select(0, flat).reshape([b, 1, s, d]),
        }
    }
}

/// cos and sin of the angles of a run of tokens, `[b or 1, 1, s, d]`, shared by all layers.
#[derive(Debug, Clone)]
pub struct Rotation<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rotation<B> {
    /// Rotates queries or keys.
    ///
    /// # Shapes
    /// - x: `[b, heads, s, d]` -> `[b, heads, s, d]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3); // rotate_half(x)
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Which keys each new token may see, with the rotation of the new tokens: built once per
/// forward and shared by every layer.
#[derive(Debug, Clone)]
pub struct Attend<B: Backend> {
    /// RoPE angles of the new tokens.
    pub rotation: Rotation<B>,
    /// `[b or 1, 1, s, t]`, true where attention is blocked; `None` when every key is visible.
    pub mask: Option<Tensor<B, 4, Bool>>,
}

impl<B: Backend> Attend<B> {
    /// Causal attention for `s` new tokens after `start` cached ones.
    pub fn causal(rope: &RotaryEmbedding<B>, start: usize, s: usize, device: &B::Device) -> Self {
        // Position i (cached offset `start`) sees keys 0..=start+i.
        let mask = (s > 1).then(|| {
            Tensor::<B, 2, Bool>::tril_mask([s, start + s], start as i64, device).unsqueeze::<4>()
        });
        Self {
            rotation: rope.at(start, s),
            mask,
        }
    }

    /// Causal attention within documents: `segments` `[b, s]` gives each token's document id,
    /// and a token sees only earlier tokens of its own document; positions restart per document.
    pub fn segmented(
        rope: &RotaryEmbedding<B>,
        segments: &[Vec<u32>],
        positions: &[Vec<u32>],
        device: &B::Device,
    ) -> Self {
        let (b, s) = (segments.len(), segments.first().map_or(0, Vec::len));
        let mut blocked = Vec::with_capacity(b * s * s);
        for seg in segments {
            for i in 0..s {
                blocked.extend((0..s).map(|j| j > i || seg[j] != seg[i]));
            }
        }
        let pos: Vec<i64> = positions.iter().flatten().map(|&p| p as i64).collect();
        Self {
            rotation: rope.at_positions(Tensor::from_data(TensorData::new(pos, [b, s]), device)),
            mask: Some(Tensor::from_data(
                TensorData::new(blocked, [b, 1, s, s]),
                device,
            )),
        }
    }
}

/// Multi-head causal self-attention with grouped key/value heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// [h*d, e]
    pub q_proj: LoraLinear<B>,
    /// [kv*d, e]
    pub k_proj: LoraLinear<B>,
    /// [kv*d, e]
    pub v_proj: LoraLinear<B>,
    /// [e, h*d]
    pub o_proj: LoraLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl<B: QuantBackend> Attention<B> {
    /// Attends from the new tokens to every cached token and to themselves, causally.
    ///
    /// # Shapes
    /// - x: `[b, s, e]` -> `[b, s, e]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        attend: &Attend<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        self.o_proj.forward(self.heads(x, attend, cache))
    }

    /// The attention heads' outputs, concatenated: what `o_proj` projects.
    ///
    /// # Shapes
    /// - x: `[b, s, e]` -> `[b, s, h*d]`
    pub fn heads(
        &self,
        x: Tensor<B, 3>,
        attend: &Attend<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = heads_first(self.q_proj.forward(x.clone()), h, d); // [b, h, s, d]
        let k = heads_first(self.k_proj.forward(x.clone()), kv, d); // [b, kv, s, d]
        let v = heads_first(self.v_proj.forward(x), kv, d); // [b, kv, s, d]
        let q = attend.rotation.apply(q);
        let k = attend.rotation.apply(k);

        let (k, v) = match cache {
            Some(slot) => LayerCache::append(slot, k, v), // [b, kv, t, d]
            None => (k, v),
        };
        grouped_attention(q, k, v, attend.mask.as_ref())
    }
}

/// softmax(q k^T / sqrt(d) + mask) v with grouped key/value heads, the new positions' heads
/// concatenated back into rows.
///
/// # Shapes
/// - q: `[b, h, s, d]`, k and v: `[b, kv, t, d]`, mask: `[b or 1, 1, s, t]` -> `[b, s, h*d]`
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
) -> Tensor<B, 3> {
    let [b, h, s, d] = q.dims();
    let [_, kv, t, _] = k.dims();
    let g = h / kv;
    // Query head j uses key/value head j / g (HF `repeat_kv`), so grouping the g query heads
    // of each kv head into the row dimension lets one matmul serve them without copying k, v.
    let q = q.reshape([b, kv, g * s, d]); // rows: (group member, position)
    let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt(); // [b, kv, g*s, t]
    let scores = match mask {
        Some(mask) => {
            let [mb, _, _, _] = mask.dims();
            let mask = mask
                .clone()
                .unsqueeze_dim::<5>(2) // [mb, 1, 1, s, t]
                .repeat_dim(2, g)
                .reshape([mb, 1, g * s, t]);
            scores.mask_fill(mask, f32::NEG_INFINITY)
        }
        None => scores,
    };
    let probs = softmax(scores, 3);
    let out = probs.matmul(v); // [b, kv, g*s, d]
    if s == 1 {
        out.reshape([b, s, h * d]) // one position: heads are already in order
    } else {
        out.reshape([b, h, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, h * d])
    }
}

/// `[b, s, n * d]` as `[b, n, s, d]`; one position (decoding) needs no transpose, which
/// spares burn's CPU backend a copy per projection.
pub(crate) fn heads_first<B: Backend>(x: Tensor<B, 3>, n: usize, d: usize) -> Tensor<B, 4> {
    let [b, s, _] = x.dims();
    if s == 1 {
        x.reshape([b, n, 1, d])
    } else {
        x.reshape([b, s, n, d]).swap_dims(1, 2)
    }
}

/// SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// [f, e]
    pub gate_proj: LoraLinear<B>,
    /// [f, e]
    pub up_proj: LoraLinear<B>,
    /// [e, f]
    pub down_proj: LoraLinear<B>,
}

impl<B: QuantBackend> Mlp<B> {
    /// # Shapes
    /// - x: `[b, s, e]` -> `[b, s, e]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone())); // [b, s, f]
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)).
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: Attention<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The seven linear layers and the two norms, mutable, with their names within the layer.
    #[allow(clippy::type_complexity)]
    pub fn parts_mut(
        &mut self,
    ) -> (
        [(&'static str, &mut LoraLinear<B>); 7],
        [(&'static str, &mut RmsNorm<B>); 2],
    ) {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        (
            [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ],
            [
                ("input_layernorm", &mut self.input_layernorm),
                (
                    "post_attention_layernorm",
                    &mut self.post_attention_layernorm,
                ),
            ],
        )
    }
}

impl<B: QuantBackend> DecoderLayer<B> {
    /// # Shapes
    /// - x: `[b, s, e]` -> `[b, s, e]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        attend: &Attend<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), attend, cache);
        let x = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + mlp
    }
}

/// Token embedding, decoder stack and final norm (HF `LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// [vocab, e]
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// RoPE tables shared by all layers.
    pub rotary_emb: RotaryEmbedding<B>,
}

/// The causal language model (HF `LlamaForCausalLM`).
#[derive(Module, Debug)]
pub struct LlamaForCausalLM<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// Output head [vocab, e]; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// The output head packed for the CPU decoding kernels (inference weights bf16, q8, q4):
    /// logits are computed from it outside autodiff.
    pub head_blocks: Option<Packed>,
    /// Longest sequence the RoPE tables cover.
    pub max_position_embeddings: usize,
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::with_layers(self.model.layers.len())
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.val().device()
    }
}

impl<B: QuantBackend> LlamaForCausalLM<B> {
    /// Final hidden states of the new tokens `ids`, continuing the sequences in `cache`.
    ///
    /// # Shapes
    /// - ids: `[b, s]` -> `[b, s, e]`
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let s = ids.dims()[1];
        let start = cache.as_ref().map_or(0, |c| c.len());
        let attend = Attend::causal(&self.model.rotary_emb, start, s, &ids.device());
        let mut x = self.embed(ids);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let entry = cache.as_deref_mut().map(|c| c.layer(i));
            x = layer.forward(x, &attend, entry);
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        self.model.norm.forward(x)
    }

    /// Final hidden states of a whole batch under an explicit attention layout (training:
    /// padded or packed sequences), without a cache.
    ///
    /// # Shapes
    /// - ids: `[b, s]` -> `[b, s, e]`
    pub fn forward_attend(&self, ids: Tensor<B, 2, Int>, attend: &Attend<B>) -> Tensor<B, 3> {
        let mut x = self.embed(ids);
        for layer in &self.model.layers {
            x = layer.forward(x, attend, None);
        }
        self.model.norm.forward(x)
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// - ids: `[b, s]` -> `[b, s, e]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let e = self.model.embed_tokens.dims()[1];
        self.model
            .embed_tokens
            .val()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, e])
    }

    /// Next-token logits from hidden states.
    ///
    /// # Shapes
    /// - hidden: `[b, s, e]` -> `[b, s, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, e] = hidden.dims();
        let hidden = hidden.reshape([b * s, e]);
        // Inference only: under autodiff the head's f32 weights (tied to the embeddings, which
        // full training updates) are the ones that count. Every row count uses the packed
        // head, so a row's logits do not depend on its batch.
        let inference = !B::ad_enabled(&hidden.device());
        if let Some(blocks) = self.head_blocks.as_ref().filter(|_| inference) {
            let vocab = blocks.weight.shape[0];
            let logits = B::packed_project(hidden.into_primitive().tensor(), blocks);
            return Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits))
                .reshape([b, s, vocab]);
        }
        let head = match &self.lm_head {
            Some(w) => w.val(),
            None => self.model.embed_tokens.val(),
        };
        let vocab = head.dims()[0];
        project(hidden, head).reshape([b, s, vocab])
    }

    /// Next-token logits of the rows of `hidden` `[n, e]`, copied to the host row after row
    /// (`n * vocab` values). The copy goes through a 2-D tensor, which burn's CPU backend
    /// copies as one block (a 3-D result it copied element by element).
    pub fn host_logits(&self, hidden: Tensor<B, 2>) -> Vec<f32> {
        let [n, e] = hidden.dims();
        self.logits(hidden.reshape([1, n, e]))
            .reshape([n as i32, -1])
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default()
    }

    /// Logits at every position of `ids`.
    ///
    /// # Shapes
    /// - ids: `[b, s]` -> `[b, s, vocab]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(ids, cache))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::Tolerance;

    use super::*;
    use crate::tiny::tiny_config;

    type B = NdArray<f32>;

    fn ids(values: &[u32]) -> Tensor<B, 2, Int> {
        let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(v, [1, values.len()]), &Default::default())
    }

    fn variant(kv_heads: usize, tied: bool, bias: bool) -> (LlamaConfig, LlamaForCausalLM<B>) {
        let mut c = tiny_config();
        c.num_key_value_heads = kv_heads;
        c.tie_word_embeddings = tied;
        c.attention_bias = bias;
        B::seed(&Default::default(), 7);
        let m = LlamaForCausalLM::init_random(&c, &Default::default());
        (c, m)
    }

    #[test]
    fn rms_norm_matches_hand_computation() {
        let device = Default::default();
        let norm = RmsNorm::<B> {
            weight: Param::from_tensor(Tensor::from_floats([1.0, 2.0], &device)),
            eps: 0.0,
        };
        // x = [3, 4]: rms = sqrt((9 + 16) / 2); y = x / rms * w.
        let y = norm.forward(Tensor::from_floats([[[3.0, 4.0]]], &device));
        let rms = (12.5f32).sqrt();
        y.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[3.0 / rms, 8.0 / rms]]]),
            Tolerance::absolute(1e-6),
        );
    }

    #[test]
    fn rope_rotates_pairs_of_the_two_halves() {
        let mut c = tiny_config();
        c.head_dim = 4;
        let rope = RotaryEmbedding::<B>::new(&c, &Default::default());
        // d = 4: pairs (0, 2) with frequency 1 and (1, 3) with frequency theta^(-1/2).
        let x = Tensor::<B, 4>::from_floats([[[[1.0, 0.0, 0.0, 0.0]]]], &Default::default());
        let y: Vec<f32> = rope.at(3, 1).apply(x).into_data().to_vec().unwrap();
        let expected = [3f32.cos(), 0.0, 3f32.sin(), 0.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn kv_cache_decoding_matches_a_full_forward() {
        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 259).collect();
        for (kv_heads, tied, bias) in [(4, true, false), (2, false, false), (1, true, true)] {
            let (c, m) = variant(kv_heads, tied, bias);
            let full = m.forward(ids(&tokens), None);
            let mut cache = KvCache::new(&c);
            // A prefill of 5, a chunk of 3, then one token at a time.
            let mut parts = vec![m.forward(ids(&tokens[..5]), Some(&mut cache))];
            parts.push(m.forward(ids(&tokens[5..8]), Some(&mut cache)));
            for t in &tokens[8..] {
                parts.push(m.forward(ids(&[*t]), Some(&mut cache)));
            }
            assert_eq!(cache.len(), tokens.len());
            let incremental = Tensor::cat(parts, 1);
            incremental
                .into_data()
                .assert_approx_eq::<f32>(&full.into_data(), Tolerance::absolute(1e-4));
        }
    }

    #[test]
    fn grouped_heads_equal_repeated_kv_heads() {
        // A GQA model must equal the MHA model whose k/v heads are the GQA heads repeated.
        let (c, gqa) = variant(2, true, false);
        let mut mha_config = c.clone();
        mha_config.num_key_value_heads = c.num_attention_heads;
        let mut mha = LlamaForCausalLM::<B>::init_random(&mha_config, &Default::default());
        mha.model.embed_tokens = Param::from_tensor(gqa.model.embed_tokens.val());
        let g = c.num_attention_heads / c.num_key_value_heads;
        let repeat = |w: Tensor<B, 2>| {
            let [rows, cols] = w.dims();
            let kv = rows / c.head_dim;
            w.reshape([kv, 1, c.head_dim, cols])
                .repeat_dim(1, g)
                .reshape([kv * g * c.head_dim, cols])
        };
        let device = Default::default();
        let copy = |l: &LoraLinear<B>| LoraLinear::new(Linear::dense(l.base.weight(&device), None));
        let repeated = |l: &LoraLinear<B>| {
            LoraLinear::new(Linear::dense(repeat(l.base.weight(&device)), None))
        };
        for (dst, src) in mha.model.layers.iter_mut().zip(&gqa.model.layers) {
            let (a, m) = (&src.self_attn, &src.mlp);
            dst.self_attn.q_proj = copy(&a.q_proj);
            dst.self_attn.k_proj = repeated(&a.k_proj);
            dst.self_attn.v_proj = repeated(&a.v_proj);
            dst.self_attn.o_proj = copy(&a.o_proj);
            dst.mlp.gate_proj = copy(&m.gate_proj);
            dst.mlp.up_proj = copy(&m.up_proj);
            dst.mlp.down_proj = copy(&m.down_proj);
        }
        let tokens = [1, 2, 3, 250, 7, 9];
        mha.forward(ids(&tokens), None)
            .into_data()
            .assert_approx_eq::<f32>(
                &gqa.forward(ids(&tokens), None).into_data(),
                Tolerance::absolute(1e-5),
            );
    }

    #[test]
    fn packed_documents_equal_separate_forwards() {
        // Two documents in one row, positions restarting at 0, must not see each other.
        let (_, m) = variant(2, true, false);
        let (a, b) = ([5u32, 9, 13, 200], [7u32, 8, 100]);
        let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
        let attend = Attend::segmented(
            &m.model.rotary_emb,
            &[vec![0, 0, 0, 0, 1, 1, 1]],
            &[vec![0, 1, 2, 3, 0, 1, 2]],
            &Default::default(),
        );
        let together = m.logits(m.forward_attend(ids(&packed), &attend));
        let apart = Tensor::cat(vec![m.forward(ids(&a), None), m.forward(ids(&b), None)], 1);
        together
            .into_data()
            .assert_approx_eq::<f32>(&apart.into_data(), Tolerance::absolute(1e-4));
    }
}
