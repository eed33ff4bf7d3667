//! The host training step: an explicit forward that keeps what backward needs and an explicit
//! backward through the Llama decoder, as llm.c writes GPT-2's, for LoRA adapters on a frozen
//! base (f32, or packed and dequantized a tile at a time inside each product) or for every
//! dense weight of a model trained in full (a distilled student).
//!
//! Through burn's autodiff a step is thousands of tensor operations, each allocating, and the
//! base's input gradients go through generic matmuls. Here a step is a fixed chain of kernels,
//! each with its backward in the same file: RMSNorm ([`norm`]), RoPE ([`rope`]), attention
//! within documents ([`attention`]), SwiGLU ([`swiglu`]), the LoRA update with its dropout
//! ([`lora`], masks from a counter-based generator: [`dropout`]) and the head with a loss of
//! its logits ([`head`]: the labels' cross-entropy, or whatever [`HeadLoss`] a caller brings,
//! such as a distillation loss against a teacher's [`TargetLogits`]); the matrix products are
//! ft-quant's [`ft_quant::gemm`] on every core. Three things are never computed: padding (a
//! batch is its real tokens only), the head at positions without a label, and any gradient of
//! a frozen weight. The burn forward
//! ([`super::llama`]) stays the reference this one is tested against, and the path of
//! backends whose tensors do not live in host memory.

mod attention;
mod dropout;
mod head;
mod layer;
mod lora;
mod norm;
mod rope;
mod swiglu;

use std::ops::Range;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use ft_quant::gemm::{Frozen, RowTiles};
use ft_quant::QuantBackend;
use rayon::prelude::*;

pub use head::{CrossEntropy, HeadLoss, TargetLogits, ROWS as HEAD_ROWS};
pub use lora::Grads as AdapterGrads;

use crate::error::ModelError;
use crate::forward::host::host_vec;
use crate::forward::llama::LlamaForCausalLM;
use attention::Heads;

/// A micro-batch as the host step reads it: its real tokens only, documents one after
/// another.
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a> {
    /// Token ids.
    pub ids: &'a [u32],
    /// Each token's position within its document.
    pub positions: &'a [u32],
    /// Consecutive ranges of `ids`, one per document, covering it in order; a token attends
    /// to the earlier tokens of its own document only.
    pub documents: &'a [Range<usize>],
    /// `(index of the predicting token, target id)` for every trained token.
    pub targets: &'a [(usize, u32)],
}

/// What a step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// The adapters; the base is frozen.
    Adapters,
    /// Every dense weight (embeddings, norms, projections and their biases, head).
    Everything,
}

/// The gradient of one dense weight.
#[derive(Debug)]
pub struct DenseGrad {
    /// Its HF name (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Row-major values.
    pub values: Vec<f32>,
    /// `[rows, cols]`; vectors (norms, biases) are `[1, n]`.
    pub shape: [usize; 2],
}

/// The loss of a micro-batch and the gradients of what it trains.
#[derive(Debug)]
pub struct StepGrads {
    /// The summed loss over the targets.
    pub loss: f64,
    /// Per adapted module (`model.layers.0.self_attn.q_proj`, ...), the gradients of the
    /// scaled loss.
    pub grads: Vec<(String, AdapterGrads)>,
    /// With [`Trained::Everything`], every dense weight's gradient of the scaled loss.
    pub dense: Vec<DenseGrad>,
}

/// A frozen weight as the host step holds it.
enum Weight<B: QuantBackend> {
    /// An f32 tensor in host memory, read in place.
    Dense(FloatTensor<B>, [usize; 2]),
    /// A packed weight with its decoded constants.
    Packed(RowTiles),
}

impl<B: QuantBackend> Weight<B> {
    fn of(linear: &ft_quant::Linear<B>) -> Option<Self> {
        match (&linear.packed, &linear.weight) {
            (Some(p), _) => RowTiles::new(p.weight.clone()).map(Self::Packed),
            (None, Some(w)) => Self::dense(w.val()),
            (None, None) => None,
        }
    }

    fn dense(t: Tensor<B, 2>) -> Option<Self> {
        let shape = t.dims();
        Some(Self::Dense(in_host(t)?, shape))
    }

    fn frozen(&self) -> Frozen<'_> {
        match self {
            Self::Dense(t, shape) => Frozen::F32 {
                values: B::host_f32(t).expect("checked when the trainer was built"),
                shape: *shape,
            },
            Self::Packed(tiles) => Frozen::Packed(tiles),
        }
    }
}

/// One decoder layer's frozen parts.
struct Layer<B: QuantBackend> {
    linears: [Weight<B>; 7],
    biases: [Option<Vec<f32>>; 7],
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
}

impl<B: QuantBackend> Layer<B> {
    fn weights(&self) -> layer::Weights<'_> {
        layer::Weights {
            linears: [0, 1, 2, 3, 4, 5, 6].map(|j| self.linears[j].frozen()),
            biases: [0, 1, 2, 3, 4, 5, 6].map(|j| self.biases[j].as_deref()),
            input_norm: &self.input_norm,
            post_norm: &self.post_norm,
        }
    }
}

/// The adapters of a model, copied out for one step: per layer, per projection.
#[derive(Debug, Clone)]
pub struct Adapters(Vec<Option<lora::Adapter>>);

impl Adapters {
    /// The adapters attached to `model`, read in place where the backend keeps them in host
    /// memory (the training model's inner backend), else copied through burn.
    pub fn of<B: QuantBackend>(model: &LlamaForCausalLM<B>) -> Self {
        let values = |t: Tensor<B, 2>| {
            let t = t.into_primitive().tensor();
            match B::host_f32(&t) {
                Some(v) => v.to_vec(),
                None => host_vec(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t))),
            }
        };
        Self(
            model
                .linears()
                .into_iter()
                .map(|(_, l)| {
                    let lora = l.lora.as_ref()?;
                    let [n_out, n_in] = l.base.shape();
                    let [r, _] = lora.lora_a.dims();
                    Some(lora::Adapter {
                        a: values(lora.lora_a.val()),
                        b: values(lora.lora_b.val()),
                        r,
                        n_in,
                        n_out,
                        scale: lora.scale as f32,
                        dropout: lora.dropout.prob as f32,
                    })
                })
                .collect(),
        )
    }
}

impl Adapters {
    /// No adapter on any of `modules` projections.
    fn none(modules: usize) -> Self {
        Self(vec![None; modules])
    }

    /// Layer `i`'s adapters.
    fn layer(&self, i: usize) -> layer::Adapted<'_> {
        layer::Adapted {
            adapters: &self.0[i * 7..(i + 1) * 7],
            layer: i,
        }
    }
}

impl DenseGrad {
    /// A vector's gradient, shaped `[1, n]`.
    fn vector(name: String, values: Vec<f32>) -> Self {
        let n = values.len();
        Self {
            name,
            values,
            shape: [1, n],
        }
    }
}

/// `t` where the kernels read it in place: itself where its backend keeps it in host memory
/// as row-major f32, else a row-major f32 copy where the backend is a host one (strides an
/// update left, or f64 where the device's default float type is f64), `None` on a backend
/// whose tensors live elsewhere.
fn in_host<B: QuantBackend>(t: Tensor<B, 2>) -> Option<FloatTensor<B>> {
    let device = t.device();
    let p = t.clone().into_primitive().tensor();
    if B::host_f32(&p).is_some() {
        return Some(p);
    }
    let f32s = |data: TensorData| {
        Tensor::<B, 2>::from_data(data.convert::<f32>(), (&device, DType::F32))
            .into_primitive()
            .tensor()
    };
    B::host_f32(&f32s(TensorData::new(vec![0f32], [1, 1])))?;
    let copy = f32s(t.into_data());
    B::host_f32(&copy)?;
    Some(copy)
}

/// The rows of `x` (`e` wide) at the targets' predicting positions.
fn gather(x: &[f32], targets: &[(usize, u32)], e: usize) -> Vec<f32> {
    let mut out = vec![0.0; targets.len() * e];
    for (row, &(i, _)) in out.chunks_mut(e).zip(targets) {
        row.copy_from_slice(&x[i * e..][..e]);
    }
    out
}

/// A model's frozen weights arranged for the host training step: built once per run, beside
/// the model, when every weight is in host memory.
pub struct HostTrainer<B: QuantBackend> {
    /// `[vocab, e]`, read in place.
    embed: FloatTensor<B>,
    /// The head, `[vocab, e]` (the embeddings when tied).
    head: Weight<B>,
    /// Whether the head is the embeddings.
    tied: bool,
    /// RoPE tables `[max_pos, d]`, read in place.
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    max_pos: usize,
    layers: Vec<Layer<B>>,
    norm: Vec<f32>,
    eps: f32,
    heads: Heads,
    e: usize,
    vocab: usize,
    /// The HF name of every projection, 7 per layer.
    names: Vec<String>,
}

impl<B: QuantBackend> std::fmt::Debug for HostTrainer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostTrainer({} layers, {:?})",
            self.layers.len(),
            self.heads
        )
    }
}

impl<B: QuantBackend> HostTrainer<B> {
    /// The trainer of `model`'s adapters, or `None` where a tensor is not in host memory or a
    /// packed weight's rows do not start on block boundaries (then burn's autodiff trains).
    pub fn new(model: &LlamaForCausalLM<B>) -> Option<Self> {
        let embed = model.model.embed_tokens.val();
        let [vocab, e] = embed.dims();
        let embed = in_host(embed)?;
        let head = Weight::dense(
            model
                .lm_head
                .as_ref()
                .unwrap_or(&model.model.embed_tokens)
                .val(),
        )?;
        let tied = model.lm_head.is_none();
        let rope = &model.model.rotary_emb;
        let [max_pos, d] = rope.cos.dims();
        let cos = in_host(rope.cos.clone())?;
        let sin = in_host(rope.sin.clone())?;
        let mut names = Vec::new();
        let linears = model.linears();
        let mut layers = Vec::new();
        for (layer, chunk) in model.model.layers.iter().zip(linears.chunks(7)) {
            let weights = chunk
                .iter()
                .map(|(_, l)| Weight::of(&l.base))
                .collect::<Option<Vec<_>>>()?;
            names.extend(chunk.iter().map(|(n, _)| n.clone()));
            let biases: Vec<Option<Vec<f32>>> = chunk
                .iter()
                .map(|(_, l)| l.base.bias.as_ref().map(|b| host_vec(b.val())))
                .collect();
            layers.push(Layer {
                linears: weights.try_into().ok()?,
                biases: biases.try_into().ok()?,
                input_norm: host_vec(layer.input_layernorm.weight.val()),
                post_norm: host_vec(layer.post_attention_layernorm.weight.val()),
            });
        }
        let attn = &model.model.layers.first()?.self_attn;
        Some(Self {
            embed,
            head,
            tied,
            cos,
            sin,
            max_pos,
            heads: Heads {
                h: attn.num_heads,
                kv: attn.num_kv_heads,
                d,
            },
            layers,
            norm: host_vec(model.model.norm.weight.val()),
            eps: model.model.norm.eps as f32,
            e,
            vocab,
            names,
        })
    }

    /// Runs forward and backward over `tokens`: the summed `loss` of the targets and the
    /// gradients of `scale` times it with respect to what is `trained`. `seed` draws the
    /// adapters' dropout masks.
    pub fn step(
        &self,
        adapters: &Adapters,
        tokens: &Tokens,
        loss: &dyn HeadLoss,
        trained: Trained,
        scale: f32,
        seed: u64,
    ) -> Result<StepGrads, ModelError> {
        self.check(adapters, tokens)?;
        let (e, vocab) = (self.e, self.vocab);
        let everything = trained == Trained::Everything;
        let cx = self.context(tokens, Some(seed));
        let (x, mut saved) = self.forward(adapters, tokens, &cx, true);

        // The final norm, the head and the loss at the predicting rows only.
        let hidden = gather(&x, tokens.targets, e);
        drop(x);
        let nt = tokens.targets.len();
        let mut normed = vec![0.0; nt * e];
        let rstd = norm::forward(&hidden, &self.norm, self.eps, &mut normed);
        let ids: Vec<u32> = tokens.targets.iter().map(|&(_, t)| t).collect();
        let mut dnormed = vec![0.0; nt * e];
        let mut dhead = everything.then(|| vec![0.0; vocab * e]);
        let head = self.head.frozen();
        let total = head::forward_backward(
            &normed,
            head,
            &ids,
            loss,
            scale,
            Some(&mut dnormed),
            dhead.as_deref_mut(),
        );
        let mut dense = Vec::new();
        if everything {
            let mut dnorm = vec![0.0; e];
            norm::weight_backward(&dnormed, &hidden, &rstd, &mut dnorm);
            dense.push(DenseGrad::vector("model.norm.weight".into(), dnorm));
        }
        let mut dhidden = vec![0.0; nt * e];
        norm::backward(&dnormed, &hidden, &self.norm, &rstd, &mut dhidden);
        let mut dx = vec![0.0; tokens.ids.len() * e];
        for (row, &(i, _)) in dhidden.chunks(e).zip(tokens.targets) {
            dx[i * e..][..e]
                .iter_mut()
                .zip(row)
                .for_each(|(d, g)| *d += g);
        }

        let mut grads = Vec::new();
        for (i, l) in self.layers.iter().enumerate().rev() {
            let s = saved.pop().expect("one saved state per layer");
            let adapted = adapters.layer(i);
            let g = layer::backward(
                &l.weights(),
                &adapted,
                &s,
                dx,
                &cx,
                i > 0 || everything,
                everything,
            );
            let names = &self.names[i * 7..(i + 1) * 7];
            for (name, a) in names.iter().zip(g.adapters) {
                if let Some(a) = a {
                    grads.push((name.clone(), a));
                }
            }
            if let Some(d) = g.dense {
                for ((name, w), (b, linear)) in names
                    .iter()
                    .zip(d.linears)
                    .zip(d.biases.into_iter().zip(&l.linears))
                {
                    let shape = linear.frozen().shape();
                    dense.push(DenseGrad {
                        name: format!("{name}.weight"),
                        values: w,
                        shape,
                    });
                    if let Some(b) = b {
                        dense.push(DenseGrad::vector(format!("{name}.bias"), b));
                    }
                }
                let prefix = format!("model.layers.{i}.");
                dense.push(DenseGrad::vector(
                    format!("{prefix}input_layernorm.weight"),
                    d.input_norm,
                ));
                dense.push(DenseGrad::vector(
                    format!("{prefix}post_attention_layernorm.weight"),
                    d.post_norm,
                ));
            }
            dx = g.dx.unwrap_or_default();
        }
        if let Some(dhead) = dhead {
            // The embeddings' rows gather the input gradients of their tokens; a tied head adds
            // its own gradient to the same matrix.
            let (mut dembed, head) = if self.tied {
                (dhead, None)
            } else {
                (vec![0.0; vocab * e], Some(dhead))
            };
            for (row, &id) in dx.chunks(e).zip(tokens.ids) {
                dembed[id as usize * e..][..e]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(d, g)| *d += g);
            }
            dense.push(DenseGrad {
                name: "model.embed_tokens.weight".into(),
                values: dembed,
                shape: [vocab, e],
            });
            if let Some(values) = head {
                dense.push(DenseGrad {
                    name: "lm_head.weight".into(),
                    values,
                    shape: [vocab, e],
                });
            }
        }
        Ok(StepGrads {
            loss: total,
            grads,
            dense,
        })
    }

    /// The model's logits at the predicting rows of `tokens`, adapters and dropout off: a
    /// frozen teacher's side of a distillation loss. The forward keeps nothing for a backward
    /// and only the final norm's output at those rows outlives it.
    pub fn target_logits(&self, tokens: &Tokens) -> Result<TargetLogits<'_>, ModelError> {
        let none = Adapters::none(self.names.len());
        self.check(&none, tokens)?;
        let cx = self.context(tokens, None);
        let (x, _) = self.forward(&none, tokens, &cx, false);
        let hidden = gather(&x, tokens.targets, self.e);
        let mut normed = vec![0.0; hidden.len()];
        norm::forward(&hidden, &self.norm, self.eps, &mut normed);
        Ok(TargetLogits {
            normed,
            head: self.head.frozen(),
        })
    }

    /// The summed NLL of the targets of `tokens`, dropout off (validation): the forward
    /// alone, keeping nothing for a backward.
    pub fn loss(&self, adapters: &Adapters, tokens: &Tokens) -> Result<f64, ModelError> {
        self.check(adapters, tokens)?;
        let cx = self.context(tokens, None);
        let (x, _) = self.forward(adapters, tokens, &cx, false);
        let hidden = gather(&x, tokens.targets, self.e);
        let mut normed = vec![0.0; hidden.len()];
        norm::forward(&hidden, &self.norm, self.eps, &mut normed);
        let ids: Vec<u32> = tokens.targets.iter().map(|&(_, t)| t).collect();
        Ok(head::forward_backward(
            &normed,
            self.head.frozen(),
            &ids,
            &CrossEntropy,
            1.0,
            None,
            None,
        ))
    }

    /// What every layer of a step over `tokens` shares.
    fn context<'a>(&'a self, tokens: &Tokens<'a>, seed: Option<u64>) -> layer::Context<'a> {
        layer::Context {
            docs: tokens.documents,
            positions: tokens.positions,
            rope: rope::Tables {
                cos: B::host_f32(&self.cos).expect("checked when the trainer was built"),
                sin: B::host_f32(&self.sin).expect("checked when the trainer was built"),
                d: self.heads.d,
            },
            heads: self.heads,
            eps: self.eps,
            seed,
        }
    }

    /// The last layer's output for every token, and each layer's saved state when `keep`.
    fn forward(
        &self,
        adapters: &Adapters,
        tokens: &Tokens,
        cx: &layer::Context,
        keep: bool,
    ) -> (Vec<f32>, Vec<layer::Saved>) {
        let e = self.e;
        let embed = B::host_f32(&self.embed).expect("checked when the trainer was built");
        let mut x = vec![0.0; tokens.ids.len() * e];
        x.par_chunks_mut(e)
            .zip(tokens.ids.par_iter())
            .for_each(|(row, &id)| row.copy_from_slice(&embed[id as usize * e..][..e]));
        let mut saved = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for (i, l) in self.layers.iter().enumerate() {
            let (out, s) = layer::forward(&l.weights(), &adapters.layer(i), x, cx);
            if keep {
                saved.push(s);
            }
            x = out;
        }
        (x, saved)
    }

    /// Checks `tokens` and `adapters` against the model, so that no kernel indexes out of
    /// bounds.
    fn check(&self, adapters: &Adapters, tokens: &Tokens) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Config(format!("training batch: {what}")));
        let n = tokens.ids.len();
        if adapters.0.len() != self.names.len() {
            return bad(format!(
                "{} adapter slots for {} projections",
                adapters.0.len(),
                self.names.len()
            ));
        }
        if tokens.positions.len() != n {
            return bad(format!(
                "{} positions for {n} tokens",
                tokens.positions.len()
            ));
        }
        if let Some(id) = tokens.ids.iter().find(|&&t| t as usize >= self.vocab) {
            return bad(format!(
                "token id {id} outside the vocabulary of {}",
                self.vocab
            ));
        }
        if let Some(p) = tokens
            .positions
            .iter()
            .find(|&&p| p as usize >= self.max_pos)
        {
            return bad(format!(
                "position {p} beyond the model's {} positions",
                self.max_pos
            ));
        }
        let mut at = 0;
        for doc in tokens.documents {
            if doc.start != at || doc.end <= doc.start {
                return bad(format!("document {doc:?} does not follow row {at}"));
            }
            at = doc.end;
        }
        if at != n {
            return bad(format!("documents cover {at} of {n} tokens"));
        }
        if let Some(t) = tokens
            .targets
            .iter()
            .find(|&&(i, t)| i >= n || t as usize >= self.vocab)
        {
            return bad(format!("target {t:?} outside the batch or vocabulary"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
