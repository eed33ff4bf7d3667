//! Causal self-attention within documents, forward and backward, with grouped key/value heads
//! (query head j reads key/value head j / (h / kv), as HF's `repeat_kv`).
//!
//! Forward, per document and head: P = softmax(Q K^T / sqrt(d)) over the earlier positions,
//! O = P V; P is kept for backward. Backward: dP = dO V^T, dV = P^T dO,
//! dS = P * (dP - rowsum(P * dP)) / sqrt(d), dQ = dS K, dK = dS^T Q; the g query heads of a
//! group add into their key/value head's dK and dV. Documents run in parallel; each product
//! is a `gemm` over strided views of the `[n, heads * d]` rows, so no head is copied out.

use std::ops::Range;

use ft_quant::gemm::{matmul, Mat, MatMut};
use rayon::prelude::*;

/// The attention's head counts.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub h: usize,
    /// Key/value heads.
    pub kv: usize,
    /// Width of one head.
    pub d: usize,
}

/// Attends within each of `docs` (consecutive ranges of rows covering q's rows in order):
/// writes `out` `[n, h * d]` and returns the probabilities, per document `[h, len, len]`.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    docs: &[Range<usize>],
    heads: Heads,
    out: &mut [f32],
) -> Vec<f32> {
    let Heads { h, kv, d } = heads;
    let mut probs = vec![0.0; docs.iter().map(|r| h * r.len() * r.len()).sum()];
    let outs = split(out, docs.iter().map(|r| r.len() * h * d));
    let ps = split(&mut probs, docs.iter().map(|r| h * r.len() * r.len()));
    let scale = 1.0 / (d as f32).sqrt();
    docs.par_iter()
        .zip(outs)
        .zip(ps)
        .for_each(|((doc, out), probs)| {
            let l = doc.len();
            for head in 0..h {
                let group = head / (h / kv);
                let qh = Mat::strided(&q[doc.start * h * d + head * d..], l, d, h * d);
                let kh = Mat::strided(&k[doc.start * kv * d + group * d..], l, d, kv * d);
                let vh = Mat::strided(&v[doc.start * kv * d + group * d..], l, d, kv * d);
                let p = &mut probs[head * l * l..][..l * l];
                matmul(&mut MatMut::new(p, l, l), qh, kh.t(), false);
                causal_softmax(p, l, scale);
                let mut oh = MatMut::strided(&mut out[head * d..], l, d, h * d);
                matmul(&mut oh, Mat::new(p, l, l), vh, false);
            }
        });
    probs
}

/// The gradients of q, k and v (all after RoPE) given the output's `dout`, written over
/// `dq`, `dk` and `dv`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    docs: &[Range<usize>],
    heads: Heads,
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Heads { h, kv, d } = heads;
    dk.fill(0.0);
    dv.fill(0.0);
    let dqs = split(dq, docs.iter().map(|r| r.len() * h * d));
    let dks = split(dk, docs.iter().map(|r| r.len() * kv * d));
    let dvs = split(dv, docs.iter().map(|r| r.len() * kv * d));
    let mut offsets = Vec::with_capacity(docs.len());
    let mut at = 0;
    for doc in docs {
        offsets.push(at);
        at += h * doc.len() * doc.len();
    }
    let scale = 1.0 / (d as f32).sqrt();
    docs.par_iter()
        .zip(offsets)
        .zip(dqs.into_par_iter().zip(dks).zip(dvs))
        .for_each(|((doc, offset), ((dq, dk), dv))| {
            let l = doc.len();
            let mut ds = vec![0.0; l * l];
            for head in 0..h {
                let group = head / (h / kv);
                let qh = Mat::strided(&q[doc.start * h * d + head * d..], l, d, h * d);
                let kh = Mat::strided(&k[doc.start * kv * d + group * d..], l, d, kv * d);
                let vh = Mat::strided(&v[doc.start * kv * d + group * d..], l, d, kv * d);
                let doh = Mat::strided(&dout[doc.start * h * d + head * d..], l, d, h * d);
                let p = &probs[offset + head * l * l..][..l * l];
                matmul(&mut MatMut::new(&mut ds, l, l), doh, vh.t(), false); // dP
                let mut dvh = MatMut::strided(&mut dv[group * d..], l, d, kv * d);
                matmul(&mut dvh, Mat::new(p, l, l).t(), doh, true);
                for (ds, p) in ds.chunks_mut(l).zip(p.chunks(l)) {
                    let dot: f32 = ds.iter().zip(p).map(|(a, b)| a * b).sum();
                    for (g, p) in ds.iter_mut().zip(p) {
                        *g = p * (*g - dot) * scale;
                    }
                }
                let ds = Mat::new(&ds, l, l);
                matmul(
                    &mut MatMut::strided(&mut dq[head * d..], l, d, h * d),
                    ds,
                    kh,
                    false,
                );
                let mut dkh = MatMut::strided(&mut dk[group * d..], l, d, kv * d);
                matmul(&mut dkh, ds.t(), qh, true);
            }
        });
}

/// Scales the `[l, l]` scores, masks the later positions and takes each row's softmax.
fn causal_softmax(p: &mut [f32], l: usize, scale: f32) {
    for (i, row) in p.chunks_mut(l).enumerate() {
        let (seen, later) = row.split_at_mut(i + 1);
        later.fill(0.0);
        let max = seen
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
        let mut sum = 0.0;
        for s in seen.iter_mut() {
            *s = (*s * scale - max).exp();
            sum += *s;
        }
        seen.iter_mut().for_each(|s| *s /= sum);
    }
}

/// `buf` cut into consecutive parts of the given lengths.
fn split(mut buf: &mut [f32], lengths: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut parts = Vec::new();
    for len in lengths {
        let (part, rest) = std::mem::take(&mut buf).split_at_mut(len);
        parts.push(part);
        buf = rest;
    }
    parts
}
