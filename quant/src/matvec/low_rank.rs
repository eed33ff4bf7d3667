//! [`LowRank`]: a low-rank product x A^T B^T (a LoRA update) added to the products' output,
//! by f32 dot products with A's rows and scaled sums of B^T's rows.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::{portable, Isa};

/// A low-rank product x A^T B^T: A [r, k] and B^T [r, n] row-major (a LoRA update, with its
/// scale in B^T). A's rows meet x as dot products, B^T's rows are added across columns.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// A, `[r, k]`.
    pub a: &'a [f32],
    /// B^T, `[r, n]`.
    pub b_t: &'a [f32],
    /// The rank.
    pub r: usize,
}

impl LowRank<'_> {
    /// Adds (x A^T) B^T for the rows `tokens` of x `[m, k]` and the output columns `cols`
    /// to `out` (`[m, cols.len()]`, as [`weight_rows`](super::weight_rows) writes); `scratch`
    /// is reused space. A row's sums do not depend on the other rows.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        m: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        self.add_on(Isa::active(), x, k, tokens, cols, m, out, scratch)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_on(
        &self,
        isa: Isa,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        m: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        assert!(
            self.a.len() >= self.r * k && out.len() >= cols.len() * m,
            "low rank: A holds r rows of k and out its columns"
        );
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Portable {
            let kernels = (
                // SAFETY: AVX2 and FMA were detected for every non-portable variant.
                |w: &[f32], x: &[f32]| unsafe { avx2::dot_f32(w, x) },
                |u: &mut [f32], s: f32, b: &[f32]| unsafe { avx2::axpy(u, s, b) },
            );
            return self.add_with(x, k, tokens, cols, out, scratch, kernels);
        }
        let kernels = (portable::dot_f32, portable::axpy);
        self.add_with(x, k, tokens, cols, out, scratch, kernels)
    }

    /// t = x_i A^T by dot products, u = t B^T by scaled row sums, added to out's row i.
    #[allow(clippy::too_many_arguments)]
    fn add_with(
        &self,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        (dot, axpy): (
            impl Fn(&[f32], &[f32]) -> f32,
            impl Fn(&mut [f32], f32, &[f32]),
        ),
    ) {
        let r = self.r;
        let n = self.b_t.len() / r.max(1);
        scratch.clear();
        scratch.resize(r + cols.len(), 0.0);
        let (t, u) = scratch.split_at_mut(r);
        for i in tokens {
            let xi = &x[i * k..(i + 1) * k];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = dot(&self.a[j * k..(j + 1) * k], xi);
            }
            u.fill(0.0);
            for (j, &tj) in t.iter().enumerate() {
                axpy(u, tj, &self.b_t[j * n + cols.start..j * n + cols.end]);
            }
            for (o, uc) in out[i * u.len()..(i + 1) * u.len()].iter_mut().zip(&*u) {
                *o += uc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matvec::tests::values;

    #[test]
    fn a_low_rank_update_matches_the_two_products() {
        let (m, k, r, n) = (5, 40, 3, 37);
        let (a, b_t, x) = (values(r * k, 1), values(r * n, 2), values(m * k, 3));
        let lr = LowRank {
            a: &a,
            b_t: &b_t,
            r,
        };
        let cols = 4..30;
        for isa in Isa::available() {
            let mut out = vec![1f32; cols.len() * m];
            lr.add_on(isa, &x, k, 1..4, cols.clone(), m, &mut out, &mut Vec::new());
            for (c, col) in cols.clone().enumerate() {
                for i in 0..m {
                    let want = if (1..4).contains(&i) {
                        1.0 + (0..r)
                            .map(|j| {
                                let t: f64 = (0..k)
                                    .map(|q| x[i * k + q] as f64 * a[j * k + q] as f64)
                                    .sum();
                                t * b_t[j * n + col] as f64
                            })
                            .sum::<f64>()
                    } else {
                        1.0
                    };
                    let got = out[i * cols.len() + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{isa:?} row {i} column {col}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
