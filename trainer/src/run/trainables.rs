//! What a run trains: the LoRA adapters of a frozen base, or every dense weight of a model (a
//! distilled student). Each counts its parameters, gathers their gradients after a backward
//! pass, and takes one AdamW step over them, grouped by decoder layer so that paged moments
//! come into memory one layer at a time.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use ft_model::params::ParamMut;
use ft_model::{LlamaForCausalLM, QuantBackend};

use rayon::prelude::*;

use crate::optim::{AdamW, AdamWParams, ParamGrad};

/// The parameters a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainables {
    /// The LoRA adapters attached to a frozen base.
    Lora,
    /// Every dense weight (embeddings, norms, projections, head).
    Full,
}

impl Trainables {
    /// How many parameters are trained.
    pub fn count<B: Backend>(self, model: &mut LlamaForCausalLM<B>) -> usize {
        match self {
            Self::Full => model
                .params_mut()
                .iter()
                .map(|(_, p)| match p {
                    ParamMut::Matrix(p) => p.shape().num_elements(),
                    ParamMut::Vector(p) => p.shape().num_elements(),
                })
                .sum(),
            Self::Lora => model
                .linears()
                .iter()
                .filter_map(|(_, l)| l.lora.as_ref())
                .map(|l| l.num_params())
                .sum(),
        }
    }

    /// Adds the trained parameters' gradients in `g` to `grads`.
    pub fn accumulate<B: AutodiffBackend>(
        self,
        model: &mut LlamaForCausalLM<B>,
        g: &B::Gradients,
        grads: &mut BTreeMap<String, Tensor<B::InnerBackend, 2>>,
    ) {
        match self {
            Self::Lora => accumulate_lora_grads(model, g, grads),
            Self::Full => accumulate_param_grads(model, g, grads),
        }
    }

    /// One AdamW step over the trained parameters with `grads`.
    pub fn update<B: AutodiffBackend + QuantBackend>(
        self,
        model: &mut LlamaForCausalLM<B>,
        optimizer: &mut AdamW<B::InnerBackend>,
        grads: BTreeMap<String, Tensor<B::InnerBackend, 2>>,
        hp: &AdamWParams,
    ) where
        B::InnerBackend: QuantBackend,
    {
        match self {
            Self::Lora => update_lora(model, optimizer, grads, hp),
            Self::Full => update_full(model, optimizer, grads, hp),
        }
    }
}

/// Adds the adapters' gradients in `g` to `grads`, keyed `{module}.lora_A` / `.lora_B`.
fn accumulate_lora_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    g: &B::Gradients,
    grads: &mut BTreeMap<String, Tensor<B::InnerBackend, 2>>,
) {
    for (name, l) in model.linears() {
        let Some(lora) = &l.lora else { continue };
        for (half, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            if let Some(grad) = p.val().grad(g) {
                accumulate(grads, format!("{name}.{half}"), grad);
            }
        }
    }
}

/// Adds the gradient of every dense weight in `g` to `grads` (vectors as `[1, n]`).
pub(crate) fn accumulate_param_grads<B: AutodiffBackend>(
    model: &mut LlamaForCausalLM<B>,
    g: &B::Gradients,
    grads: &mut BTreeMap<String, Tensor<B::InnerBackend, 2>>,
) {
    for (name, p) in model.params_mut() {
        let grad = match p {
            ParamMut::Matrix(p) => p.val().grad(g),
            ParamMut::Vector(p) => p.val().grad(g).map(|t| {
                let n = t.dims()[0];
                t.reshape([1, n])
            }),
        };
        if let Some(grad) = grad {
            accumulate(grads, name, grad);
        }
    }
}

/// Adds `grad` to the running sum under `key`.
pub(crate) fn accumulate<B: Backend>(
    grads: &mut BTreeMap<String, Tensor<B, 2>>,
    key: String,
    grad: Tensor<B, 2>,
) {
    let sum = match grads.remove(&key) {
        Some(acc) => acc + grad,
        None => grad,
    };
    grads.insert(key, sum);
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before clipping.
pub fn clip<B: QuantBackend>(grads: &mut BTreeMap<String, Tensor<B, 2>>, max_norm: f64) -> f64 {
    let norm = grads.values().map(squared_norm).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = g.clone() * coef;
        }
    }
    norm
}

/// The sum of squares of `g`'s elements, read in place where the backend keeps it in host
/// memory (no squared copy of a full model's gradients).
fn squared_norm<B: QuantBackend>(g: &Tensor<B, 2>) -> f64 {
    let t = g.clone().into_primitive().tensor();
    match B::host_f32(&t) {
        Some(values) => values
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect::<Vec<_>>()
            .iter()
            .sum(),
        None => g.clone().powi_scalar(2).sum().into_scalar().elem::<f64>(),
    }
}

/// One AdamW step over the adapters, grouped by decoder layer.
fn update_lora<B: AutodiffBackend + QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>>,
    hp: &AdamWParams,
) where
    B::InnerBackend: QuantBackend,
{
    let mut groups: BTreeMap<usize, Vec<ParamGrad<B::InnerBackend>>> = BTreeMap::new();
    for (name, l) in model.linears() {
        let Some(lora) = &l.lora else { continue };
        let layer = name
            .split('.')
            .nth(2)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        for (half, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            let key = format!("{name}.{half}");
            if let Some(grad) = grads.remove(&key) {
                groups.entry(layer).or_default().push(ParamGrad {
                    name: key,
                    value: p.val().inner(),
                    grad,
                    decay: true,
                });
            }
        }
    }
    let mut new: BTreeMap<String, Tensor<B::InnerBackend, 2>> = optimizer
        .step(groups.into_values().collect(), hp)
        .into_iter()
        .collect();
    for (name, lora) in model.loras_mut() {
        if let Some(a) = new.remove(&format!("{name}.lora_A")) {
            lora.lora_a = Param::from_tensor(Tensor::from_inner(a));
        }
        if let Some(b) = new.remove(&format!("{name}.lora_B")) {
            lora.lora_b = Param::from_tensor(Tensor::from_inner(b));
        }
    }
}

/// One AdamW step over every dense weight, grouped by decoder layer (embeddings, final norm
/// and head form one more group); norms are not decayed.
fn update_full<B: AutodiffBackend>(
    model: &mut LlamaForCausalLM<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>>,
    hp: &AdamWParams,
) where
    B::InnerBackend: QuantBackend,
{
    let mut groups: BTreeMap<usize, Vec<ParamGrad<B::InnerBackend>>> = BTreeMap::new();
    for (name, p) in model.params_mut() {
        let Some(grad) = grads.remove(&name) else {
            continue;
        };
        let (value, decay) = match p {
            ParamMut::Matrix(p) => (p.val().inner(), true),
            ParamMut::Vector(p) => {
                let v = p.val().inner();
                let n = v.dims()[0];
                (v.reshape([1, n]), false)
            }
        };
        let group = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(0, |i| i + 1);
        groups.entry(group).or_default().push(ParamGrad {
            name,
            value,
            grad,
            decay,
        });
    }
    let mut new: BTreeMap<String, Tensor<B::InnerBackend, 2>> = optimizer
        .step(groups.into_values().collect(), hp)
        .into_iter()
        .collect();
    for (name, p) in model.params_mut() {
        let Some(v) = new.remove(&name) else {
            continue;
        };
        match p {
            ParamMut::Matrix(p) => *p = Param::from_tensor(Tensor::from_inner(v)),
            ParamMut::Vector(p) => {
                let n = v.dims()[1];
                *p = Param::from_tensor(Tensor::from_inner(v.reshape([n])));
            }
        }
    }
}
