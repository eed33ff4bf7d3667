//! The dense f64 linear algebra GPTQ needs on a layer's Hessian (a few thousand columns at
//! most): Cholesky factors and the inverse of a symmetric positive definite matrix, all
//! row-major `n x n`.

/// The lower Cholesky factor `L` of `a` (`a = L L^T`), or the first column whose pivot is
/// not positive.
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let row_j = &l[j * n..j * n + j];
        let pivot = a[j * n + j] - row_j.iter().map(|v| v * v).sum::<f64>();
        if pivot.is_nan() || pivot <= 0.0 {
            return Err(j);
        }
        let d = pivot.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            l[i * n + j] = (a[i * n + j] - dot) / d;
        }
    }
    Ok(l)
}

/// `a^-1` from `a`'s lower Cholesky factor `l` (as torch's `cholesky_inverse`).
pub fn cholesky_inverse(l: &[f64], n: usize) -> Vec<f64> {
    // M = L^-1 by forward substitution, a column at a time, kept transposed (`mt[c]` is
    // column c of M) so that every dot product runs along rows.
    let mut mt = vec![0.0; n * n];
    for c in 0..n {
        mt[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * mt[c * n + k]).sum();
            mt[c * n + i] = -s / l[i * n + i];
        }
    }
    // a^-1 = M^T M: entry (i, j) is column i of M dotted with column j.
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| mt[i * n + k] * mt[j * n + k]).sum();
            out[i * n + j] = s;
            out[j * n + i] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_and_the_inverse_multiply_back() {
        let n = 5;
        // A diagonally dominant symmetric matrix.
        let a: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                if i == j {
                    10.0 + i as f64
                } else {
                    1.0 / (1 + i + j) as f64
                }
            })
            .collect();
        let l = cholesky(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let llt: f64 = (0..n).map(|k| l[i * n + k] * l[j * n + k]).sum();
                assert!((llt - a[i * n + j]).abs() < 1e-12);
                assert!(j <= i || l[i * n + j] == 0.0, "lower triangular");
            }
        }
        let inv = cholesky_inverse(&l, n);
        for i in 0..n {
            for j in 0..n {
                let e: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!((e - (i == j) as u8 as f64).abs() < 1e-12);
            }
        }
        let mut singular = a.clone();
        singular[2 * n + 2] = -1.0;
        assert_eq!(cholesky(&singular, n), Err(2));
    }
}
