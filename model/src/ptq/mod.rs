//! Post-training quantization of the decoder's projections: round-to-nearest, or GPTQ
//! ([`ft_quant::gptq`]) driven by calibration text run through the model layer by layer.
//!
//! GPTQ goes as AutoGPTQ's `true_sequential`: in each decoder layer, q/k/v (which share an
//! input) are quantized first, then o_proj on the attention heads those quantized q/k/v give,
//! then gate/up on the norm of the result, then down_proj on what the quantized gate/up give;
//! the next layer's inputs are the outputs of this one, quantized. So every projection is
//! quantized against the inputs it will see in the quantized model.

pub mod awq;
pub mod calibration;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, TensorData};
use ft_quant::gptq::Hessian;
pub use ft_quant::gptq::{Gptq, Grid, Quantized};
use ft_quant::{Linear, QuantBackend, QuantFormat};

use crate::error::ModelError;
use crate::forward::host::host_vec;
use crate::forward::llama::{Attend, LlamaForCausalLM};

/// How the projections are rounded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Each weight to its group's nearest grid point.
    Rtn,
    /// GPTQ with these settings, on calibration inputs.
    Gptq(Gptq),
}

/// Every decoder projection of `model` (dense f32 weights) quantized onto `grid` by
/// `method`; the model's weights become the quantized ones (dequantized), and the codes come
/// back by parameter name (`model.layers.N.self_attn.q_proj.weight`, ...). `samples` are the
/// calibration windows, all of one length (unused by RTN); `progress` hears each layer done.
pub fn quantize<B: QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    grid: Grid,
    method: Method,
    samples: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, Quantized>, ModelError> {
    let layers = model.model.layers.len();
    let device = model.device();
    let mut out = BTreeMap::new();
    let gptq = match method {
        Method::Gptq(g) => g,
        Method::Rtn => {
            for i in 0..layers {
                for name in NAMES {
                    let linear = projection(model, i, name)?;
                    let (w, rows, cols) = dense(linear, &device)?;
                    let q = Quantized::rtn(grid, &w, rows, cols)
                        .map_err(|e| ModelError::Calibration(format!("layer {i} {name}: {e}")))?;
                    replace(linear, &q, &device);
                    out.insert(format!("model.layers.{i}.{name}.weight"), q);
                }
                progress(i + 1, layers);
            }
            return Ok(out);
        }
    };
    let len = samples.first().map_or(0, Vec::len);
    if len == 0 || samples.iter().any(|s| s.len() != len) {
        return Err(ModelError::Calibration(
            "calibration windows must be non-empty and of one length".into(),
        ));
    }
    let ids: Vec<i64> = samples.iter().flatten().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [samples.len(), len]), &device);
    let attend = Attend::causal(&model.model.rotary_emb, 0, len, &device);
    let mut x = model.embed(ids);
    for i in 0..layers {
        let mut step = |model: &mut LlamaForCausalLM<B>, names: &[&str], input: &Tensor<B, 3>| {
            let [b, s, e] = input.dims();
            let mut h = Hessian::new(e);
            h.add(&host_vec(input.clone().reshape([b * s, e])), b * s);
            for name in names {
                let linear = projection(model, i, name)?;
                let (w, rows, cols) = dense(linear, &device)?;
                let q = gptq
                    .quantize(&w, rows, cols, &h, grid)
                    .map_err(|e| ModelError::Calibration(format!("layer {i} {name}: {e}")))?;
                tracing::debug!(layer = i, name, "quantized");
                replace(linear, &q, &device);
                out.insert(format!("model.layers.{i}.{name}.weight"), q);
            }
            Ok::<(), ModelError>(())
        };
        let normed = model.model.layers[i].input_layernorm.forward(x.clone());
        step(model, &NAMES[..3], &normed)?;
        let layer = &model.model.layers[i];
        let heads = layer.self_attn.heads(normed, &attend, None);
        step(model, &NAMES[3..4], &heads)?;
        let layer = &model.model.layers[i];
        let x2 = x + layer.self_attn.o_proj.forward(heads);
        let normed = layer.post_attention_layernorm.forward(x2.clone());
        step(model, &NAMES[4..6], &normed)?;
        let mlp = &model.model.layers[i].mlp;
        let inner = silu(mlp.gate_proj.forward(normed.clone())) * mlp.up_proj.forward(normed);
        step(model, &NAMES[6..], &inner)?;
        x = x2 + model.model.layers[i].mlp.down_proj.forward(inner);
        progress(i + 1, layers);
    }
    Ok(out)
}

/// Stores each projection quantized onto the NF4 grid packed, as bitsandbytes does (with
/// double quantization of the absmax values when `double_quant`), so the model saves as a
/// QLoRA base ([`crate::formats::bnb_write::save_pretrained`]). Other grids stay as they are.
pub fn pack_nf4<B: QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    quantized: &BTreeMap<String, Quantized>,
    double_quant: bool,
) -> Result<(), ModelError> {
    for i in 0..model.model.layers.len() {
        for name in NAMES {
            let Some(packed) = quantized
                .get(&format!("model.layers.{i}.{name}.weight"))
                .and_then(|q| q.nf4(double_quant))
            else {
                continue;
            };
            let linear = projection(model, i, name)?;
            let bias = linear.bias.take().map(|b| b.val());
            *linear = Linear::packed(packed, bias);
        }
    }
    Ok(())
}

/// The seven projections of a decoder layer, in the order GPTQ quantizes them.
pub const NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Projection `name` of layer `i`.
fn projection<'m, B: QuantBackend>(
    model: &'m mut LlamaForCausalLM<B>,
    i: usize,
    name: &str,
) -> Result<&'m mut Linear<B>, ModelError> {
    let (linears, _) = model.model.layers[i].parts_mut();
    linears
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| &mut l.base)
        .ok_or_else(|| ModelError::Calibration(format!("no projection {name}")))
}

/// A dense weight's values, rows and columns.
fn dense<B: QuantBackend>(
    linear: &Linear<B>,
    device: &B::Device,
) -> Result<(Vec<f32>, usize, usize), ModelError> {
    let [rows, cols] = linear.shape();
    if linear.format() != QuantFormat::F32 {
        return Err(ModelError::Calibration(format!(
            "the weights must be loaded dense (f32) to be quantized again, not {}",
            linear.format()
        )));
    }
    Ok((host_vec(linear.weight(device)), rows, cols))
}

/// Puts the quantized weight (dequantized) in the layer, keeping its bias; frozen, so that on
/// an autodiff backend the calibration forwards through it record nothing.
fn replace<B: QuantBackend>(linear: &mut Linear<B>, q: &Quantized, device: &B::Device) {
    set_weight(linear, q.dequantize(), q.rows, q.cols, device);
}

/// Replaces the projection's weight (`rows x cols`, row-major), keeping its bias; frozen.
fn set_weight<B: QuantBackend>(
    linear: &mut Linear<B>,
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) {
    let bias = linear.bias.take().map(|b| b.val());
    *linear = Linear::dense(to_tensor(w, rows, cols, device), bias).no_grad();
}

/// A row-major `rows x cols` weight as a tensor of the backend's float type.
fn to_tensor<B: QuantBackend>(
    w: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(w, [rows, cols]).convert::<B::FloatElem>(),
        device,
    )
}
