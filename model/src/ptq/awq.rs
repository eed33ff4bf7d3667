//! AWQ over the model: per-input-channel scales searched on calibration activations
//! ([`ft_quant::awq`]) and folded into the op before each projection, so that the model stays
//! the same function in f32 while its weights round with less error; then, optionally, each
//! group's range clipped where that lowers its output error.
//!
//! Four sets of projections share their inputs (AutoAWQ's `get_layers_for_scaling`), each
//! with an op before it to take the division: q/k/v after `input_layernorm` (its weight),
//! o_proj after v_proj (v's rows; only where every query head has its own value head, as
//! AutoAWQ requires: with grouped heads one value row feeds several o_proj inputs), gate/up
//! after `post_attention_layernorm`, and down_proj after up_proj (up's rows: SiLU(gate) * up
//! is linear in up). Layers go in order; each is searched on the inputs the layers before it
//! give, and passes on its outputs before clipping (AutoAWQ takes them from the layer
//! unquantized). Clipping covers v, gate, up and down, and o_proj where its inputs were
//! scaled (AutoAWQ clips o_proj with grouped heads too). The rounding itself is left to
//! [`super::quantize`].

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, TensorData};
pub use ft_quant::awq::GRID_POINTS;
use ft_quant::awq::{clip, search_scales};
use ft_quant::gptq::{Grid, Hessian};
use ft_quant::{Linear, QuantBackend};

use super::{dense, projection, set_weight, to_tensor};
use crate::error::ModelError;
use crate::forward::host::host_vec;
use crate::forward::llama::{Attend, LlamaForCausalLM, RmsNorm};

/// AWQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Awq {
    /// Values of `alpha` tried, evenly spaced on `[0, 1)`.
    pub grid_points: usize,
    /// Search each group's clipping range too (not for q/k, whose errors attention's softmax
    /// magnifies, as AutoAWQ leaves them).
    pub clip: bool,
}

impl Default for Awq {
    fn default() -> Self {
        Self {
            grid_points: ft_quant::awq::GRID_POINTS,
            clip: true,
        }
    }
}

/// A set of projections sharing their inputs, and the op the scales fold into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// q/k/v, scales folded into `input_layernorm`.
    Qkv,
    /// o_proj, scales folded into v_proj's rows.
    Out,
    /// gate/up, scales folded into `post_attention_layernorm`.
    GateUp,
    /// down_proj, scales folded into up_proj's rows.
    Down,
}

impl Part {
    /// The projections scaled (their input columns multiplied).
    fn scaled(self) -> &'static [&'static str] {
        match self {
            Self::Qkv => &super::NAMES[..3],
            Self::Out => &super::NAMES[3..4],
            Self::GateUp => &super::NAMES[4..6],
            Self::Down => &super::NAMES[6..],
        }
    }
}

/// What the search found over the whole model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Sets of projections searched.
    pub searched: usize,
    /// Their output error on the calibration inputs with the chosen scales, summed.
    pub error: f64,
    /// The same with round-to-nearest alone.
    pub rtn_error: f64,
    /// The chosen `alpha`s' mean.
    pub mean_alpha: f64,
    /// The fraction of groups whose range was clipped (0 without clipping).
    pub clipped: f64,
}

/// Searches and folds AWQ's scales into every layer of `model` (dense f32 weights), for
/// rounding onto `grid` afterwards, on the calibration windows `samples` (all of one length);
/// clips the groups' ranges too when `awq.clip`. `progress` hears each layer done.
pub fn apply<B: QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    grid: Grid,
    awq: Awq,
    samples: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<Report, ModelError> {
    let len = samples.first().map_or(0, Vec::len);
    if len == 0 || samples.iter().any(|s| s.len() != len) {
        return Err(ModelError::Calibration(
            "calibration windows must be non-empty and of one length".into(),
        ));
    }
    let device = model.device();
    let ids: Vec<i64> = samples.iter().flatten().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [samples.len(), len]), &device);
    let attend = Attend::causal(&model.model.rotary_emb, 0, len, &device);
    let layers = model.model.layers.len();
    let mut report = Report::default();
    let (mut alphas, mut groups, mut clipped) = (0.0, 0.0, 0.0);
    let mut x = model.embed(ids);
    for i in 0..layers {
        let mut search = |model: &mut LlamaForCausalLM<B>, part: Part, input: &Tensor<B, 3>| {
            let (h, mean_abs) = statistics(input);
            let weights = part
                .scaled()
                .iter()
                .map(|name| dense(projection(model, i, name)?, &device))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<(&[f32], usize)> =
                weights.iter().map(|(w, rows, _)| (&w[..], *rows)).collect();
            let found = search_scales(&refs, &h, &mean_abs, grid, awq.grid_points)
                .map_err(|e| ModelError::Calibration(format!("layer {i} {part:?}: {e}")))?;
            tracing::debug!(
                layer = i,
                ?part,
                alpha = found.alpha,
                ratio = found.error / found.rtn_error,
                "awq scales"
            );
            fold(model, i, part, &found.scales)?;
            report.searched += 1;
            report.error += found.error;
            report.rtn_error += found.rtn_error;
            alphas += found.alpha as f64;
            Ok::<Hessian, ModelError>(h.scaled(&found.scales))
        };
        // Folding leaves the layer the same function, so each set's inputs are computed once,
        // on the layer as it came.
        let layer = &model.model.layers[i];
        let normed = layer.input_layernorm.forward(x.clone());
        let heads = layer.self_attn.heads(normed.clone(), &attend, None);
        let x2 = x + layer.self_attn.o_proj.forward(heads.clone());
        let normed2 = layer.post_attention_layernorm.forward(x2.clone());
        let mlp = &layer.mlp;
        let inner =
            silu(mlp.gate_proj.forward(normed2.clone())) * mlp.up_proj.forward(normed2.clone());
        x = x2 + mlp.down_proj.forward(inner.clone());
        let own_values = layer.self_attn.num_heads == layer.self_attn.num_kv_heads;
        let h_qkv = search(model, Part::Qkv, &normed)?;
        let h_out = if own_values {
            Some(search(model, Part::Out, &heads)?)
        } else {
            None
        };
        let h_gate_up = search(model, Part::GateUp, &normed2)?;
        let h_down = search(model, Part::Down, &inner)?;
        if awq.clip {
            let mut plan = vec![("self_attn.v_proj", &h_qkv)];
            if let Some(h) = &h_out {
                plan.push(("self_attn.o_proj", h));
            }
            plan.extend([
                ("mlp.gate_proj", &h_gate_up),
                ("mlp.up_proj", &h_gate_up),
                ("mlp.down_proj", &h_down),
            ]);
            for (name, h) in plan {
                let linear = projection(model, i, name)?;
                let (mut w, rows, cols) = dense(linear, &device)?;
                let fraction = clip(&mut w, rows, cols, h, grid)
                    .map_err(|e| ModelError::Calibration(format!("layer {i} {name}: {e}")))?;
                let n = (rows * cols / grid.group()) as f64;
                clipped += fraction * n;
                groups += n;
                set_weight(linear, w, rows, cols, &device);
            }
        }
        progress(i + 1, layers);
    }
    report.mean_alpha = alphas / report.searched.max(1) as f64;
    report.clipped = clipped / groups.max(1.0);
    Ok(report)
}

/// Folds `scales` (one per input of `part`'s projections) into layer `i`: the projections'
/// input columns multiplied by them, the op before divided, so that the layer computes the
/// same function.
pub fn fold<B: QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    i: usize,
    part: Part,
    scales: &[f32],
) -> Result<(), ModelError> {
    let device = model.device();
    let attn = &model.model.layers[i].self_attn;
    if part == Part::Out && attn.num_heads != attn.num_kv_heads {
        return Err(ModelError::Calibration(format!(
            "o_proj's inputs cannot be scaled into v_proj with {} query heads on {} value heads",
            attn.num_heads, attn.num_kv_heads
        )));
    }
    // Every size is checked before anything changes, so an error leaves the layer as it was.
    for name in part.scaled() {
        let cols = projection(model, i, name)?.shape()[1];
        if scales.len() != cols {
            return Err(ModelError::Calibration(format!(
                "{} scales for {name}'s {cols} inputs",
                scales.len()
            )));
        }
    }
    let before = match part {
        Part::Out => Some("self_attn.v_proj"),
        Part::Down => Some("mlp.up_proj"),
        Part::Qkv | Part::GateUp => None,
    };
    if let Some(name) = before {
        let rows = projection(model, i, name)?.shape()[0];
        if scales.len() != rows {
            return Err(ModelError::Calibration(format!(
                "{} scales for {name}'s {rows} outputs",
                scales.len()
            )));
        }
    }
    for name in part.scaled() {
        let linear = projection(model, i, name)?;
        let (mut w, rows, cols) = dense(linear, &device)?;
        for row in w.chunks_mut(cols) {
            row.iter_mut().zip(scales).for_each(|(v, s)| *v *= s);
        }
        set_weight(linear, w, rows, cols, &device);
    }
    let layer = &mut model.model.layers[i];
    match part {
        Part::Qkv => divide_norm(&mut layer.input_layernorm, scales, &device),
        Part::GateUp => divide_norm(&mut layer.post_attention_layernorm, scales, &device),
        Part::Out => divide_rows(projection(model, i, "self_attn.v_proj")?, scales, &device)?,
        Part::Down => divide_rows(projection(model, i, "mlp.up_proj")?, scales, &device)?,
    }
    Ok(())
}

/// The inputs' Hessian and each channel's mean absolute value.
fn statistics<B: QuantBackend>(input: &Tensor<B, 3>) -> (Hessian, Vec<f32>) {
    let [b, s, e] = input.dims();
    let x = host_vec(input.clone().reshape([b * s, e]));
    let mut h = Hessian::new(e);
    h.add(&x, b * s);
    let mut mean_abs = vec![0.0f64; e];
    for row in x.chunks(e) {
        for (m, v) in mean_abs.iter_mut().zip(row) {
            *m += v.abs() as f64;
        }
    }
    let n = (b * s).max(1) as f64;
    (h, mean_abs.into_iter().map(|m| (m / n) as f32).collect())
}

/// The norm's weight divided by `scales`.
fn divide_norm<B: QuantBackend>(norm: &mut RmsNorm<B>, scales: &[f32], device: &B::Device) {
    let w: Vec<f32> = host_vec(norm.weight.val())
        .iter()
        .zip(scales)
        .map(|(w, s)| w / s)
        .collect();
    let n = w.len();
    norm.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(w, [n]).convert::<B::FloatElem>(),
        device,
    ))
    .set_require_grad(false);
}

/// The projection's output rows (and bias) divided by `scales`, one per row.
fn divide_rows<B: QuantBackend>(
    linear: &mut Linear<B>,
    scales: &[f32],
    device: &B::Device,
) -> Result<(), ModelError> {
    let (mut w, rows, cols) = dense(linear, device)?;
    if scales.len() != rows {
        return Err(ModelError::Calibration(format!(
            "{} scales for {rows} output rows",
            scales.len()
        )));
    }
    for (row, s) in w.chunks_mut(cols).zip(scales) {
        row.iter_mut().for_each(|v| *v /= s);
    }
    let bias = linear.bias.take().map(|b| {
        let b: Vec<f32> = host_vec(b.val())
            .iter()
            .zip(scales)
            .map(|(v, s)| v / s)
            .collect();
        Tensor::from_data(TensorData::new(b, [rows]).convert::<B::FloatElem>(), device)
    });
    *linear = Linear::dense(to_tensor(w, rows, cols, device), bias).no_grad();
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::tiny::{tiny_config, tiny_model};

    type B = NdArray<f32>;

    fn logits(model: &LlamaForCausalLM<B>, ids: &[u32]) -> Vec<f32> {
        let v: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let t = Tensor::from_data(TensorData::new(v, [1, ids.len()]), &Default::default());
        host_vec(model.forward(t, None))
    }

    fn close(a: &[f32], b: &[f32]) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y}");
        }
    }

    fn scales(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|j| 0.5 + ((j * 7 + seed * 13) % 11) as f32 * 0.15)
            .collect()
    }

    #[test]
    fn folding_scales_leaves_the_f32_logits_unchanged() {
        for kv_heads in [4, 2] {
            let mut c = tiny_config();
            c.num_key_value_heads = kv_heads;
            let mut model = tiny_model::<B>(&c, 3);
            let ids: Vec<u32> = (0..24).map(|t| (t * 37 % 250) as u32).collect();
            let before = logits(&model, &ids);
            let (e, f, hd) = (
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads * c.head_dim,
            );
            for i in 0..c.num_hidden_layers {
                fold(&mut model, i, Part::Qkv, &scales(e, i)).unwrap();
                fold(&mut model, i, Part::GateUp, &scales(e, i + 1)).unwrap();
                fold(&mut model, i, Part::Down, &scales(f, i + 2)).unwrap();
                let out = fold(&mut model, i, Part::Out, &scales(hd, i + 3));
                assert_eq!(out.is_ok(), kv_heads == c.num_attention_heads, "{out:?}");
            }
            let after = logits(&model, &ids);
            close(&after, &before);
            // Scales of the wrong size are refused before anything changes.
            assert!(fold(&mut model, 0, Part::Down, &scales(e, 0)).is_err());
            assert_eq!(logits(&model, &ids), after);
        }
    }

    #[test]
    fn the_search_without_clipping_keeps_the_function_and_beats_rtn() {
        let mut c = tiny_config();
        c.num_key_value_heads = c.num_attention_heads;
        let mut model = tiny_model::<B>(&c, 5);
        let ids: Vec<u32> = (0..24).map(|t| (t * 11 % 250) as u32).collect();
        let before = logits(&model, &ids);
        let samples: Vec<Vec<u32>> = (0..4)
            .map(|s| (0..32).map(|t| ((s * 31 + t * 17) % 250) as u32).collect())
            .collect();
        let awq = Awq {
            clip: false,
            ..Awq::default()
        };
        let report = apply(
            &mut model,
            Grid::Int { bits: 3, group: 16 },
            awq,
            &samples,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(report.searched, 4 * c.num_hidden_layers);
        assert!(report.error <= report.rtn_error, "{report:?}");
        assert_eq!(report.clipped, 0.0);
        close(&logits(&model, &ids), &before);
    }

    #[test]
    fn windows_of_different_lengths_are_refused() {
        let mut model = tiny_model::<B>(&tiny_config(), 1);
        let err = apply(
            &mut model,
            Grid::Q4_0,
            Awq::default(),
            &[vec![1, 2], vec![3]],
            |_, _| {},
        );
        assert!(err.is_err());
    }
}
