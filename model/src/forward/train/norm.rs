//! RMSNorm over rows, forward and backward: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps).
//! Backward gives the input's gradient dx = r * (dy * w - x * r^2 * mean(dy * w * x)) and,
//! where the weight is trained, its gradient dw = sum over rows of dy * x * r.

use rayon::prelude::*;

/// Normalizes the rows of `x` (each `w.len()` wide) into `out`; returns each row's `r`.
pub fn forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Vec<f32> {
    let e = w.len();
    let mut rstd = vec![0.0; x.len() / e];
    out.par_chunks_mut(e)
        .zip(x.par_chunks(e))
        .zip(rstd.par_iter_mut())
        .for_each(|((out, x), r)| {
            let mean = x.iter().map(|v| v * v).sum::<f32>() / e as f32;
            *r = 1.0 / (mean + eps).sqrt();
            for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
                *o = v * *r * w;
            }
        });
    rstd
}

/// Adds the input gradient of the rows whose output gradient is `dy` to `dx`.
pub fn backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let e = w.len();
    dx.par_chunks_mut(e)
        .zip(dy.par_chunks(e).zip(x.par_chunks(e)))
        .zip(rstd.par_iter())
        .for_each(|((dx, (dy, x)), &r)| {
            let dot = dy
                .iter()
                .zip(w)
                .zip(x)
                .map(|((g, w), v)| g * w * v)
                .sum::<f32>()
                / e as f32;
            let c = r * r * dot;
            for (((d, g), w), v) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *d += r * (g * w - v * c);
            }
        });
}

/// Adds the weight's gradient over the rows whose output gradient is `dy` to `dw`.
pub fn weight_backward(dy: &[f32], x: &[f32], rstd: &[f32], dw: &mut [f32]) {
    let e = dw.len();
    for ((dy, x), &r) in dy.chunks(e).zip(x.chunks(e)).zip(rstd) {
        for ((d, g), v) in dw.iter_mut().zip(dy).zip(x) {
            *d += g * v * r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (e, eps) = (6, 1e-5);
        let x: Vec<f32> = (0..2 * e).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..e).map(|i| 0.5 + i as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..2 * e).map(|i| (i as f32 * 1.3).cos()).collect();
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            forward(x, &w, eps, &mut y);
            y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut y = vec![0.0; x.len()];
        let rstd = forward(&x, &w, eps, &mut y);
        let mut dx = vec![0.0; x.len()];
        backward(&dy, &x, &w, &rstd, &mut dx);
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let fd = (loss(&up) - loss(&down)) / 2e-3;
            assert!((fd - dx[i] as f64).abs() < 1e-3, "{i}: {fd} vs {}", dx[i]);
        }
        let mut dw = vec![0.0; e];
        weight_backward(&dy, &x, &rstd, &mut dw);
        let loss_w = |w: &[f32]| {
            let mut y = vec![0.0; x.len()];
            forward(&x, w, eps, &mut y);
            y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        for j in 0..e {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[j] += 1e-3;
            down[j] -= 1e-3;
            let fd = (loss_w(&up) - loss_w(&down)) / 2e-3;
            assert!((fd - dw[j] as f64).abs() < 1e-3, "w{j}: {fd} vs {}", dw[j]);
        }
    }
}
