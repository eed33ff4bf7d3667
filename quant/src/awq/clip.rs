//! AWQ's clipping search: each group's weights clamped to a fraction of their largest
//! magnitude before the grid is fitted, where that lowers the group's output error. Outliers
//! stretch a group's grid; clipping them trades their error for finer steps for the rest.

use rayon::prelude::*;

use crate::gptq::{group_of, Grid, Hessian};
use crate::QuantError;

/// Ratios tried: `1, 0.95, ..., 0.55` of the group's largest magnitude (AutoAWQ's
/// `max_shrink = 0.5` on a grid of 20).
const RATIOS: usize = 10;

/// Clamps each group of `w` (`rows x cols`, row-major, inputs with Hessian `h`) to the range
/// `±ratio * max|w|` whose rounding onto `grid` gives the group's inputs the least output
/// error; returns the fraction of groups clipped.
pub fn clip(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    grid: Grid,
) -> Result<f64, QuantError> {
    let g = group_of(grid, cols)?;
    if h.cols() != cols || h.samples() == 0 {
        return Err(QuantError::Calibration(format!(
            "a Hessian of {} inputs from {} samples for a layer of {cols} inputs",
            h.cols(),
            h.samples()
        )));
    }
    let hm = h.matrix();
    // The diagonal blocks of H, one per group: a group's error ignores the other groups'.
    let blocks: Vec<Vec<f64>> = (0..cols / g)
        .map(|b| {
            let at = b * g;
            (0..g)
                .flat_map(|i| hm[(at + i) * cols + at..(at + i) * cols + at + g].to_vec())
                .collect()
        })
        .collect();
    let clipped: usize = w[..rows * cols]
        .par_chunks_mut(cols)
        .map(|row| {
            let mut n = 0;
            for (group, hb) in row.chunks_mut(g).zip(&blocks) {
                let absmax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut best = (group_error(group, 1.0, absmax, hb, grid), 1.0);
                for k in 1..RATIOS {
                    let ratio = 1.0 - k as f32 / (2 * RATIOS) as f32;
                    let e = group_error(group, ratio, absmax, hb, grid);
                    if e < best.0 {
                        best = (e, ratio);
                    }
                }
                if best.1 < 1.0 {
                    let limit = best.1 * absmax;
                    group.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
                    n += 1;
                }
            }
            n
        })
        .sum();
    Ok(clipped as f64 / (rows * cols / g).max(1) as f64)
}

/// The output error `d^T H_g d` of the group `w` clamped to `±ratio * absmax` and rounded,
/// `d` its difference from the unclamped weights.
fn group_error(w: &[f32], ratio: f32, absmax: f32, hb: &[f64], grid: Grid) -> f64 {
    let limit = ratio * absmax;
    let clamped: Vec<f32> = w.iter().map(|v| v.clamp(-limit, limit)).collect();
    let fit = grid.fit(&clamped);
    let d: Vec<f64> = w
        .iter()
        .zip(&clamped)
        .map(|(&v, &c)| (v - grid.decode(fit, grid.encode(fit, c))) as f64)
        .collect();
    let g = d.len();
    (0..g)
        .map(|i| d[i] * (0..g).map(|j| hb[i * g + j] * d[j]).sum::<f64>())
        .sum()
}
