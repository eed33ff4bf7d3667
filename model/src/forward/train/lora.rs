//! A LoRA update, forward and backward: y += s * drop(x) A^T B^T, A `[r, in]`, B `[out, r]`.
//!
//! Forward keeps u = s * drop(x) A^T `[n, r]` and the dropout mask (a bit per element,
//! [`super::dropout`]); backward gives dB = dy^T u, t = s * dy B, dA = t^T drop(x) and the
//! input's share t A through the same mask.

use ft_quant::gemm::{matmul, Mat, MatMut};

use super::dropout::Mask;

/// One adapter's factors, copied from the model for a step.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[r, in]`
    pub a: Vec<f32>,
    /// `[out, r]`
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// Input width.
    pub n_in: usize,
    /// Output width.
    pub n_out: usize,
    /// alpha / r (or / sqrt(r)).
    pub scale: f32,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
}

/// What backward needs of a forward: s * drop(x) A^T `[n, r]`, and the dropout mask.
#[derive(Debug)]
pub struct Saved {
    u: Vec<f32>,
    mask: Option<Mask>,
}

/// The factors' gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `[r, in]`
    pub a: Vec<f32>,
    /// `[out, r]`
    pub b: Vec<f32>,
}

impl Adapter {
    /// Adds the update of the rows `x` `[n, in]` to `y` `[n, out]`; `key` draws the dropout
    /// mask (none: no dropout, as in evaluation).
    pub fn forward(&self, x: &[f32], key: Option<u64>, y: &mut [f32]) -> Saved {
        let n = x.len() / self.n_in;
        let mask = key
            .filter(|_| self.dropout > 0.0)
            .map(|key| Mask::draw(self.dropout, key, x.len()));
        let dropped = dropped(mask.as_ref(), x);
        let xd = dropped.as_deref().unwrap_or(x);
        let mut u = vec![0.0; n * self.r];
        let a = Mat::new(&self.a, self.r, self.n_in);
        matmul(
            &mut MatMut::new(&mut u, n, self.r),
            Mat::new(xd, n, self.n_in),
            a.t(),
            false,
        );
        u.iter_mut().for_each(|v| *v *= self.scale);
        let b = Mat::new(&self.b, self.n_out, self.r);
        matmul(
            &mut MatMut::new(y, n, self.n_out),
            Mat::new(&u, n, self.r),
            b.t(),
            true,
        );
        Saved { u, mask }
    }

    /// The factors' gradients given the output's `dy` `[n, out]`; adds the input's share to
    /// `dx` when given.
    pub fn backward(&self, saved: &Saved, x: &[f32], dy: &[f32], dx: Option<&mut [f32]>) -> Grads {
        let n = x.len() / self.n_in;
        let (r, n_in, n_out) = (self.r, self.n_in, self.n_out);
        let dy = Mat::new(dy, n, n_out);
        let mut b = vec![0.0; n_out * r];
        matmul(
            &mut MatMut::new(&mut b, n_out, r),
            dy.t(),
            Mat::new(&saved.u, n, r),
            false,
        );
        let mut t = vec![0.0; n * r];
        matmul(
            &mut MatMut::new(&mut t, n, r),
            dy,
            Mat::new(&self.b, n_out, r),
            false,
        );
        t.iter_mut().for_each(|v| *v *= self.scale);
        let t = Mat::new(&t, n, r);
        let dropped = dropped(saved.mask.as_ref(), x);
        let xd = dropped.as_deref().unwrap_or(x);
        let mut a = vec![0.0; r * n_in];
        matmul(
            &mut MatMut::new(&mut a, r, n_in),
            t.t(),
            Mat::new(xd, n, n_in),
            false,
        );
        if let Some(dx) = dx {
            let factor = Mat::new(&self.a, r, n_in);
            match (&saved.mask, dropped) {
                (Some(mask), Some(mut buf)) => {
                    let mut through = vec![0.0; n * n_in];
                    matmul(&mut MatMut::new(&mut through, n, n_in), t, factor, false);
                    mask.apply(&through, &mut buf);
                    dx.iter_mut().zip(&buf).for_each(|(d, g)| *d += g);
                }
                _ => matmul(&mut MatMut::new(dx, n, n_in), t, factor, true),
            }
        }
        Grads { a, b }
    }
}

/// drop(x) under `mask`, or `None` without one.
fn dropped(mask: Option<&Mask>, x: &[f32]) -> Option<Vec<f32>> {
    mask.map(|mask| {
        let mut out = vec![0.0; x.len()];
        mask.apply(x, &mut out);
        out
    })
}
