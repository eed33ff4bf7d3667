//! The LM head and the loss at the positions that carry a label, forward and backward:
//! logits = h E^T at those rows only (on the `dates` task 12 of 42 positions), loss =
//! sum(lse - logit[target]), dlogits = scale * (softmax - onehot), dh = dlogits E. Rows go
//! through a chunk at a time, so a long batch's logits never all live at once.

use ft_quant::gemm::Frozen;
use rayon::prelude::*;

/// Rows of logits alive at once.
const ROWS: usize = 128;

/// The summed NLL of `targets` after the rows `hidden` `[n, e]`, and, when `dhidden` is
/// given, the gradient of `scale` times it with respect to `hidden`, written over it.
pub fn forward_backward(
    hidden: &[f32],
    head: Frozen,
    targets: &[u32],
    scale: f32,
    mut dhidden: Option<&mut [f32]>,
) -> f64 {
    let [vocab, e] = head.shape();
    let mut logits = vec![0.0; ROWS.min(targets.len()) * vocab];
    let mut loss = 0.0;
    for (c, (h, targets)) in hidden
        .chunks(ROWS * e)
        .zip(targets.chunks(ROWS))
        .enumerate()
    {
        let logits = &mut logits[..targets.len() * vocab];
        head.forward(h, logits, false);
        let nll: Vec<f64> = logits
            .par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let target = row[t as usize] - max;
                let sum: f32 = row
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - max).exp();
                        *v
                    })
                    .sum();
                let nll = sum.ln() - target;
                let norm = scale / sum;
                row.iter_mut().for_each(|v| *v *= norm);
                row[t as usize] -= scale;
                nll as f64
            })
            .collect();
        // Summed in row order, so the loss does not depend on how the rows were shared.
        loss += nll.iter().sum::<f64>();
        if let Some(dh) = dhidden.as_deref_mut() {
            let dh = &mut dh[c * ROWS * e..][..h.len()];
            head.backward(logits, dh, false);
        }
    }
    loss
}
