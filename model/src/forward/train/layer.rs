//! One pre-norm decoder layer, forward and backward:
//! x2 = x + o(attention(rope(q), rope(k), v)) with q, k, v projections of norm1(x), then
//! out = x2 + down(silu(gate) * up) with gate and up projections of norm2(x2).
//!
//! Forward keeps what backward reads (inputs of every projection, q and k after RoPE, the
//! attention probabilities, the gate and up pre-activations, the norms' scales); backward
//! runs the same chain in reverse, through the frozen weights to the inputs and into the
//! adapters' factors.

use std::ops::Range;

use ft_quant::gemm::{matmul, Frozen, Mat, MatMut};

use super::attention::{self, Heads};
use super::lora::{self, Adapter};
use super::{dropout, norm, rope, swiglu};

/// Indices of the projections, in `adapter::TARGETS` order.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// A layer's frozen weights as the kernels read them.
pub struct Weights<'a> {
    /// q, k, v, o, gate, up, down.
    pub linears: [Frozen<'a>; 7],
    /// Their biases, if any.
    pub biases: [Option<&'a [f32]>; 7],
    /// Before attention.
    pub input_norm: &'a [f32],
    /// Before the MLP.
    pub post_norm: &'a [f32],
}

/// What every layer of a step shares.
pub struct Context<'a> {
    /// Consecutive row ranges, one per document.
    pub docs: &'a [Range<usize>],
    /// Each row's position in its document.
    pub positions: &'a [u32],
    /// RoPE tables.
    pub rope: rope::Tables<'a>,
    /// Attention heads.
    pub heads: Heads,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// The micro-batch's dropout seed; `None` turns dropout off (evaluation).
    pub seed: Option<u64>,
}

/// One layer's adapters (q .. down) and where the layer sits, for dropout keys.
pub struct Adapted<'a> {
    /// Per projection, its adapter if any.
    pub adapters: &'a [Option<Adapter>],
    /// The layer's index.
    pub layer: usize,
}

/// What a layer's forward keeps for its backward.
pub struct Saved {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    lora: [Option<lora::Saved>; 7],
}

/// The layer's output for the rows `x` `[n, e]`, and what backward needs.
pub fn forward(w: &Weights, a: &Adapted, x: Vec<f32>, cx: &Context) -> (Vec<f32>, Saved) {
    let (n, e) = (cx.positions.len(), w.input_norm.len());
    let Heads { h, kv, d } = cx.heads;
    let f = w.linears[GATE].shape()[0];
    let project = |j: usize, input: &[f32], out: &mut [f32], accumulate: bool| {
        w.linears[j].forward(input, out, accumulate);
        if let Some(bias) = w.biases[j] {
            for row in out.chunks_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
        a.adapters[j]
            .as_ref()
            .map(|ad| ad.forward(input, cx.seed.map(|s| dropout::key(s, a.layer, j)), out))
    };
    let mut xn1 = vec![0.0; n * e];
    let rstd1 = norm::forward(&x, w.input_norm, cx.eps, &mut xn1);
    let (mut q, mut k, mut v) = (
        vec![0.0; n * h * d],
        vec![0.0; n * kv * d],
        vec![0.0; n * kv * d],
    );
    let lq = project(Q, &xn1, &mut q, false);
    let lk = project(K, &xn1, &mut k, false);
    let lv = project(V, &xn1, &mut v, false);
    rope::forward(&mut q, cx.positions, cx.rope);
    rope::forward(&mut k, cx.positions, cx.rope);
    let mut attn = vec![0.0; n * h * d];
    let probs = attention::forward(&q, &k, &v, cx.docs, cx.heads, &mut attn);
    let mut x2 = x.clone();
    let lo = project(O, &attn, &mut x2, true);
    let mut xn2 = vec![0.0; n * e];
    let rstd2 = norm::forward(&x2, w.post_norm, cx.eps, &mut xn2);
    let (mut gate, mut up, mut act) = (vec![0.0; n * f], vec![0.0; n * f], vec![0.0; n * f]);
    let lg = project(GATE, &xn2, &mut gate, false);
    let lu = project(UP, &xn2, &mut up, false);
    swiglu::forward(&gate, &up, &mut act);
    let mut out = x2.clone();
    let ld = project(DOWN, &act, &mut out, true);
    let saved = Saved {
        x,
        rstd1,
        xn1,
        q,
        k,
        v,
        probs,
        attn,
        x2,
        rstd2,
        xn2,
        gate,
        up,
        act,
        lora: [lq, lk, lv, lo, lg, lu, ld],
    };
    (out, saved)
}

/// The gradients of a layer's dense weights, where they are trained (a student trained in
/// full).
pub struct Dense {
    /// q, k, v, o, gate, up, down, each `[out, in]`.
    pub linears: [Vec<f32>; 7],
    /// Their biases' gradients, where they have biases.
    pub biases: [Option<Vec<f32>>; 7],
    /// The norm before attention.
    pub input_norm: Vec<f32>,
    /// The norm before the MLP.
    pub post_norm: Vec<f32>,
}

/// What a layer's backward gives.
pub struct Grads {
    /// The input's gradient, where asked for.
    pub dx: Option<Vec<f32>>,
    /// Per projection, its adapter's gradients.
    pub adapters: [Option<lora::Grads>; 7],
    /// The dense weights' gradients, where asked for.
    pub dense: Option<Dense>,
}

/// dW = dy^T x for a projection `[out, in]` whose inputs were `x` `[n, in]`.
fn weight_grad(x: &[f32], dy: &[f32], [n_out, n_in]: [usize; 2]) -> Vec<f32> {
    let n = x.len() / n_in;
    let mut g = vec![0.0; n_out * n_in];
    matmul(
        &mut MatMut::new(&mut g, n_out, n_in),
        Mat::new(dy, n, n_out).t(),
        Mat::new(x, n, n_in),
        false,
    );
    g
}

/// The gradients given the output's `dy`: the adapters' (in projection order), the input's
/// when `need_dx` (the first layer's input is a frozen embedding unless `dense`), and every
/// dense weight's when `dense`.
pub fn backward(
    w: &Weights,
    a: &Adapted,
    s: &Saved,
    dy: Vec<f32>,
    cx: &Context,
    need_dx: bool,
    dense: bool,
) -> Grads {
    let (n, e) = (cx.positions.len(), w.input_norm.len());
    let Heads { h, kv, d } = cx.heads;
    let f = w.linears[GATE].shape()[0];
    let mut linears: [Vec<f32>; 7] = Default::default();
    let mut biases: [Option<Vec<f32>>; 7] = Default::default();
    let mut back = |j: usize, input: &[f32], dy: &[f32], mut dx: Option<&mut [f32]>, accumulate| {
        if dense {
            linears[j] = weight_grad(input, dy, w.linears[j].shape());
            biases[j] = w.biases[j].map(|b| {
                let mut g = vec![0.0; b.len()];
                for row in dy.chunks(b.len()) {
                    g.iter_mut().zip(row).for_each(|(g, d)| *g += d);
                }
                g
            });
        }
        if let Some(dx) = dx.as_deref_mut() {
            w.linears[j].backward(dy, dx, accumulate);
        }
        match (&a.adapters[j], &s.lora[j]) {
            (Some(ad), Some(saved)) => Some(ad.backward(saved, input, dy, dx)),
            _ => None,
        }
    };
    let mut adapters: [Option<lora::Grads>; 7] = Default::default();
    // out = x2 + down(silu(gate) * up)
    let mut dact = vec![0.0; n * f];
    adapters[DOWN] = back(DOWN, &s.act, &dy, Some(&mut dact), false);
    let (mut dgate, mut dup) = (vec![0.0; n * f], vec![0.0; n * f]);
    swiglu::backward(&dact, &s.gate, &s.up, &mut dgate, &mut dup);
    drop(dact);
    let mut dxn2 = vec![0.0; n * e];
    adapters[GATE] = back(GATE, &s.xn2, &dgate, Some(&mut dxn2), false);
    adapters[UP] = back(UP, &s.xn2, &dup, Some(&mut dxn2), true);
    drop((dgate, dup));
    let mut dx2 = dy;
    norm::backward(&dxn2, &s.x2, w.post_norm, &s.rstd2, &mut dx2);
    // x2 = x + o(attention(...))
    let mut dattn = vec![0.0; n * h * d];
    adapters[O] = back(O, &s.attn, &dx2, Some(&mut dattn), false);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0; n * h * d],
        vec![0.0; n * kv * d],
        vec![0.0; n * kv * d],
    );
    attention::backward(
        &s.q, &s.k, &s.v, &s.probs, cx.docs, cx.heads, &dattn, &mut dq, &mut dk, &mut dv,
    );
    rope::backward(&mut dq, cx.positions, cx.rope);
    rope::backward(&mut dk, cx.positions, cx.rope);
    let mut dxn1 = (need_dx || dense).then(|| vec![0.0; n * e]);
    adapters[Q] = back(Q, &s.xn1, &dq, dxn1.as_deref_mut(), false);
    adapters[K] = back(K, &s.xn1, &dk, dxn1.as_deref_mut(), true);
    adapters[V] = back(V, &s.xn1, &dv, dxn1.as_deref_mut(), true);
    let dense = dense.then(|| {
        let mut input_norm = vec![0.0; e];
        let mut post_norm = vec![0.0; e];
        if let Some(dxn1) = &dxn1 {
            norm::weight_backward(dxn1, &s.x, &s.rstd1, &mut input_norm);
        }
        norm::weight_backward(&dxn2, &s.x2, &s.rstd2, &mut post_norm);
        Dense {
            linears,
            biases,
            input_norm,
            post_norm,
        }
    });
    let dx = match dxn1 {
        Some(dxn1) if need_dx => {
            norm::backward(&dxn1, &s.x, w.input_norm, &s.rstd1, &mut dx2);
            Some(dx2)
        }
        _ => None,
    };
    Grads {
        dx,
        adapters,
        dense,
    }
}
