//! The LM head at the positions that carry a label, forward and backward: logits = h E^T at
//! those rows only (on the `dates` task 12 of 42 positions), a loss of each row's logits
//! ([`HeadLoss`]: the labels' cross-entropy, [`CrossEntropy`], or a distillation loss against
//! a teacher's logits at the same rows, [`TargetLogits`]), dh = dlogits E and, when the head
//! is trained, dE = dlogits^T h. Rows go through a chunk at a time, so a long batch's logits
//! never all live at once.

use std::ops::Range;

use ft_quant::gemm::{matmul, Frozen, Mat, MatMut};
use rayon::prelude::*;

/// Rows of logits alive at once.
pub const ROWS: usize = 128;

/// A loss of the logits at the predicting rows: what a step trains toward.
pub trait HeadLoss: Sync {
    /// Overwrites `logits` (`[rows.len(), vocab]`, the rows `rows` of the step's targets, whose
    /// ids are `targets`) with the gradient of `scale` times the summed loss, and returns each
    /// row's loss in order.
    fn rows(&self, rows: Range<usize>, logits: &mut [f32], targets: &[u32], scale: f32)
        -> Vec<f64>;
}

/// The negative log-likelihood of the labels: lse - logit[target], whose gradient is
/// softmax - onehot.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy;

impl HeadLoss for CrossEntropy {
    fn rows(&self, _: Range<usize>, logits: &mut [f32], targets: &[u32], scale: f32) -> Vec<f64> {
        let vocab = logits.len() / targets.len().max(1);
        logits
            .par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let target = row[t as usize] - max;
                // Summed in f64: over a vocabulary of 49152 an f32 running sum drops the many
                // terms below half its last place and comes out about 1e-5 low.
                let sum: f64 = row
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - max).exp();
                        f64::from(*v)
                    })
                    .sum();
                let norm = (f64::from(scale) / sum) as f32;
                row.iter_mut().for_each(|v| *v *= norm);
                row[t as usize] -= scale;
                sum.ln() - f64::from(target)
            })
            .collect()
    }
}

/// The logits of a model at a step's predicting rows, a chunk at a time: a teacher's side of
/// a distillation loss.
pub struct TargetLogits<'a> {
    /// The final norm's output at the predicting rows, `[targets, e]`.
    pub(super) normed: Vec<f32>,
    /// The head.
    pub(super) head: Frozen<'a>,
}

impl TargetLogits<'_> {
    /// The vocabulary.
    pub fn vocab(&self) -> usize {
        self.head.shape()[0]
    }

    /// Writes the logits of the predicting rows `rows` into `out` (`[rows.len(), vocab]`).
    pub fn rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let e = self.head.shape()[1];
        self.head
            .forward(&self.normed[rows.start * e..rows.end * e], out, false);
    }
}

/// The summed loss of `targets` after the rows `hidden` `[n, e]`; when `dhidden` is given,
/// the gradient of `scale` times it with respect to `hidden`, written over it, and when
/// `dhead` is given, the head's gradient added to it (`[vocab, e]`).
pub fn forward_backward(
    hidden: &[f32],
    head: Frozen,
    targets: &[u32],
    loss: &dyn HeadLoss,
    scale: f32,
    mut dhidden: Option<&mut [f32]>,
    mut dhead: Option<&mut [f32]>,
) -> f64 {
    let [vocab, e] = head.shape();
    let mut logits = vec![0.0; ROWS.min(targets.len()) * vocab];
    let mut sum = 0.0;
    for (c, (h, targets)) in hidden
        .chunks(ROWS * e)
        .zip(targets.chunks(ROWS))
        .enumerate()
    {
        let logits = &mut logits[..targets.len() * vocab];
        head.forward(h, logits, false);
        let first = c * ROWS;
        // Summed in row order, so the loss does not depend on how the rows were shared.
        sum += loss
            .rows(first..first + targets.len(), logits, targets, scale)
            .iter()
            .sum::<f64>();
        if let Some(dh) = dhidden.as_deref_mut() {
            let dh = &mut dh[first * e..][..h.len()];
            head.backward(logits, dh, false);
        }
        if let Some(dw) = dhead.as_deref_mut() {
            let n = targets.len();
            matmul(
                &mut MatMut::new(dw, vocab, e),
                Mat::new(logits, n, vocab).t(),
                Mat::new(h, n, e),
                true,
            );
        }
    }
    sum
}
