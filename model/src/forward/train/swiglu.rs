//! SwiGLU's gate, forward and backward: act = silu(g) * u, silu(g) = g * sigmoid(g);
//! du = dact * silu(g), dg = dact * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))).

use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `act = silu(gate) * up`.
pub fn forward(gate: &[f32], up: &[f32], act: &mut [f32]) {
    act.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(act, (gate, up))| {
            for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
                *a = g / (1.0 + (-g).exp()) * u;
            }
        });
}

/// The gradients of `gate` and `up` given the gradient of `act`, written over `dgate` and `dup`.
pub fn backward(dact: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dact.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((dg, du), da), (gate, up))| {
            for ((((dg, du), &da), &g), &u) in dg.iter_mut().zip(du).zip(da).zip(gate).zip(up) {
                let s = 1.0 / (1.0 + (-g).exp());
                *du = da * g * s;
                *dg = da * u * s * (1.0 + g * (1.0 - s));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let gate = [-2.0f32, -0.3, 0.0, 0.7, 3.0];
        let up = [0.5f32, -1.0, 2.0, 0.1, -0.4];
        let da = [1.0f32, 0.3, -0.7, 2.0, 0.9];
        let (mut dg, mut du) = ([0.0; 5], [0.0; 5]);
        backward(&da, &gate, &up, &mut dg, &mut du);
        let f = |g: f32, u: f32| (g / (1.0 + (-g).exp()) * u) as f64;
        for i in 0..5 {
            let h = 1e-3;
            let fd_g = (f(gate[i] + h, up[i]) - f(gate[i] - h, up[i])) / (2.0 * h as f64);
            let fd_u = (f(gate[i], up[i] + h) - f(gate[i], up[i] - h)) / (2.0 * h as f64);
            assert!((fd_g * da[i] as f64 - dg[i] as f64).abs() < 1e-3, "{i}");
            assert!((fd_u * da[i] as f64 - du[i] as f64).abs() < 1e-3, "{i}");
        }
        let mut act = [0.0; 5];
        forward(&gate, &up, &mut act);
        for i in 0..5 {
            assert!((act[i] as f64 - f(gate[i], up[i])).abs() < 1e-6);
        }
    }
}
