//! Rotary position embedding (HF's rotate-half form) over the heads of every row, forward and
//! backward. Forward rotates each pair (x_i, x_{i+d/2}) by its angle:
//! (a cos - b sin, b cos + a sin); the rotation is orthogonal, so backward rotates the
//! gradient by the opposite angle.

use rayon::prelude::*;

/// The cos and sin tables, `[positions, d]` each.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    /// cos(pos * inv_freq), repeated over both halves.
    pub cos: &'a [f32],
    /// sin(pos * inv_freq), likewise.
    pub sin: &'a [f32],
    /// Width of one head.
    pub d: usize,
}

/// Rotates every head of every row of `x` (`[n, heads * d]`) in place to its row's position.
pub fn forward(x: &mut [f32], positions: &[u32], t: Tables) {
    rotate(x, positions, t, 1.0);
}

/// Rotates the gradient `dx` back, in place: the input gradient of [`forward`].
pub fn backward(dx: &mut [f32], positions: &[u32], t: Tables) {
    rotate(dx, positions, t, -1.0);
}

fn rotate(x: &mut [f32], positions: &[u32], t: Tables, direction: f32) {
    let width = x.len() / positions.len().max(1);
    let half = t.d / 2;
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let cos = &t.cos[pos as usize * t.d..][..t.d];
            let sin = &t.sin[pos as usize * t.d..][..t.d];
            for head in row.chunks_mut(t.d) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    let (s1, s2) = (direction * sin[i], direction * sin[i + half]);
                    head[i] = a * cos[i] - b * s1;
                    head[i + half] = b * cos[i + half] + a * s2;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_undoes_forward() {
        let d = 8;
        let angles: Vec<f32> = (0..3 * d)
            .map(|i| (i % d % (d / 2)) as f32 * 0.3 + (i / d) as f32)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let t = Tables {
            cos: &cos,
            sin: &sin,
            d,
        };
        let x: Vec<f32> = (0..2 * 2 * d).map(|i| (i as f32).sin()).collect();
        let mut y = x.clone();
        forward(&mut y, &[2, 1], t);
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3));
        backward(&mut y, &[2, 1], t);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
