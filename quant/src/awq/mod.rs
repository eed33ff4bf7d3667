//! AWQ (Lin, Tang, Tang, Yang, Dang, Gan and Han 2023, "AWQ: Activation-aware Weight
//! Quantization for LLM Compression and Acceleration"): the paper's scale search, on the
//! projections' own outputs. AutoAWQ differs in two ways: by default it divides by a power of
//! the weights' mean too (`duo_scaling`), and it scores a candidate on the whole attention
//! block's or MLP's output rather than the projections'.
//!
//! A few input channels carry most of a layer's activation; their weights matter most.
//! Multiplying input column `j` of a weight by `s_j > 1` before rounding (and dividing the
//! input by `s_j`, folded into the op that makes it) shrinks the relative rounding error of
//! those weights. The scales are `s = mean|x|^alpha`, normalised so that
//! `sqrt(max(s) * min(s)) = 1`, with `alpha` taken from a grid on `[0, 1)` to minimise the
//! output error of the weights that share the inputs, rounded to the nearest point of the
//! format's grid. `alpha = 0` is plain round-to-nearest, so the search never does worse on the
//! calibration inputs.
//!
//! The output error of `W` rounded to `Q` on calibration inputs `X` is
//! `sum_r (w_r - q_r)^T (X^T X) (w_r - q_r)`: GPTQ's [`Hessian`] gives it without keeping
//! the inputs, at one `rows x cols x cols` product per candidate.
//!
//! [`clip`] then shrinks each group's range where that lowers the group's output error.

mod clip;
#[cfg(test)]
mod tests;

pub use clip::clip;

use rayon::prelude::*;

use crate::gemm::{matmul, Mat, MatMut};
use crate::gptq::{Grid, Hessian, Quantized};
use crate::QuantError;

/// Candidates of `alpha` by default: `0, 1/20, ..., 19/20` (AutoAWQ's `n_grid`).
pub const GRID_POINTS: usize = 20;

/// The scales the search chose for a set of weights sharing their inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Scales {
    /// The exponent of `mean|x|` chosen.
    pub alpha: f32,
    /// One scale per input channel: the weights' columns are multiplied by it, the inputs
    /// divided.
    pub scales: Vec<f32>,
    /// Output error with these scales (rounded to the nearest grid point).
    pub error: f64,
    /// Output error of plain round-to-nearest (`alpha = 0`).
    pub rtn_error: f64,
}

/// Searches the scales of the input channels of `weights` (each `rows x cols`, row-major,
/// sharing inputs whose Hessian is `h` and whose mean absolute values are `mean_abs`), trying
/// `points` values of `alpha` evenly spaced on `[0, 1)`, each weight rounded onto `grid`.
pub fn search_scales(
    weights: &[(&[f32], usize)],
    h: &Hessian,
    mean_abs: &[f32],
    grid: Grid,
    points: usize,
) -> Result<Scales, QuantError> {
    let cols = h.cols();
    if mean_abs.len() != cols || h.samples() == 0 {
        return Err(QuantError::Calibration(format!(
            "{} activation means and a Hessian of {} inputs from {} samples for weights of {cols} inputs",
            mean_abs.len(),
            h.cols(),
            h.samples()
        )));
    }
    let hm: Vec<f32> = h.matrix().iter().map(|&v| v as f32).collect();
    let points = points.max(1);
    let candidates = (0..points)
        .into_par_iter()
        .map(|k| {
            let alpha = k as f32 / points as f32;
            let scales = scales_for(mean_abs, alpha);
            let mut error = 0.0;
            for &(w, rows) in weights {
                let q = rounded_scaled(w, rows, cols, &scales, grid)?;
                error += output_error(w, &q, rows, cols, &hm);
            }
            Ok((alpha, scales, error))
        })
        .collect::<Result<Vec<_>, QuantError>>()?;
    let rtn_error = candidates[0].2;
    let (alpha, scales, error) = candidates
        .into_iter()
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .expect("at least one candidate");
    Ok(Scales {
        alpha,
        scales,
        error,
        rtn_error,
    })
}

/// `mean_abs^alpha` (at least 1e-4), divided by the square root of its largest times its
/// smallest value.
pub fn scales_for(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean_abs
        .iter()
        .map(|&m| {
            let v = m.max(0.0).powf(alpha).max(1e-4);
            if v.is_finite() {
                v
            } else {
                1.0
            }
        })
        .collect();
    let max = s.iter().fold(f32::MIN, |a, &b| a.max(b));
    let min = s.iter().fold(f32::MAX, |a, &b| a.min(b));
    let norm = (max * min).sqrt();
    s.into_iter().map(|v| v / norm).collect()
}

/// `w` with its columns multiplied by `scales`, rounded to the nearest grid point, and
/// divided back: the weight the model computes with once the scales are folded.
pub fn rounded_scaled(
    w: &[f32],
    rows: usize,
    cols: usize,
    scales: &[f32],
    grid: Grid,
) -> Result<Vec<f32>, QuantError> {
    let scaled: Vec<f32> = w[..rows * cols]
        .chunks(cols)
        .flat_map(|row| row.iter().zip(scales).map(|(v, s)| v * s))
        .collect();
    let mut q = Quantized::rtn(grid, &scaled, rows, cols)?.dequantize();
    for row in q.chunks_mut(cols) {
        for (v, s) in row.iter_mut().zip(scales) {
            *v /= s;
        }
    }
    Ok(q)
}

/// `sum_r (w_r - q_r)^T H (w_r - q_r)` for `rows x cols` weights and a `cols x cols` `h`.
pub(crate) fn output_error(w: &[f32], q: &[f32], rows: usize, cols: usize, h: &[f32]) -> f64 {
    let d: Vec<f32> = w[..rows * cols].iter().zip(q).map(|(a, b)| a - b).collect();
    let mut dh = vec![0.0f32; rows * cols];
    matmul(
        &mut MatMut::new(&mut dh, rows, cols),
        Mat::new(&d, rows, cols),
        Mat::new(h, cols, cols),
        false,
    );
    d.iter().zip(&dh).map(|(a, b)| (a * b) as f64).sum()
}
