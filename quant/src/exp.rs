//! exp over slices, eight lanes at a time, for the softmax of attention and the SiLU of the
//! MLP: a libm call per value cost a decode step more than its attention scores did.
//!
//! The vector exp is Cephes' `expf`: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by a degree-6
//! polynomial, 2^n put into the exponent bits; within 2 ulp of the true value over the
//! range where the result is a normal f32. A value's result does not depend on where it
//! sits in the slice (a short tail runs through the same lanes), so a row gets the same bits
//! in a batch and alone.

use crate::matvec::Isa;

/// `gate[i] = silu(gate[i]) * up[i]`, silu(x) = x / (1 + e^-x), over the common length.
pub fn silu_times(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected for every non-portable variant.
        return unsafe { avx2::silu_times(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x[i] = e^(x[i] - shift)`; returns their sum (the softmax's denominator).
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if Isa::active() != Isa::Portable {
        // SAFETY: as above.
        return unsafe { avx2::exp_shifted(x, shift) };
    }
    let mut total = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        total += *v;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight lanes of `f` over `x` (and `y`), the tail through a padded copy.
    #[inline(always)]
    unsafe fn by_eight(x: &mut [f32], y: &[f32], mut f: impl FnMut(__m256, __m256) -> __m256) {
        let n = x.len().min(y.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = f(
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_loadu_ps(y.as_ptr().add(i)),
            );
            _mm256_storeu_ps(x.as_mut_ptr().add(i), v);
            i += 8;
        }
        if i < n {
            let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
            a[..n - i].copy_from_slice(&x[i..n]);
            b[..n - i].copy_from_slice(&y[i..n]);
            let v = f(_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()));
            _mm256_storeu_ps(a.as_mut_ptr(), v);
            x[i..n].copy_from_slice(&a[..n - i]);
        }
    }

    /// See [`super::silu_times`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_times(gate: &mut [f32], up: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        by_eight(gate, up, |g, u| {
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
        });
    }

    /// See [`super::exp_shifted`]; the sum in eight lanes, then across them.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let s = _mm256_set1_ps(shift);
        let mut total = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let v = exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s));
            _mm256_storeu_ps(x.as_mut_ptr().add(i), v);
            total = _mm256_add_ps(total, v);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), total);
        let mut sum: f32 = lanes.iter().sum();
        if i < n {
            // Padding lanes hold the shift: e^0 of them is dropped.
            let mut tail = [shift; 8];
            tail[..n - i].copy_from_slice(&x[i..]);
            let v = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), s));
            _mm256_storeu_ps(tail.as_mut_ptr(), v);
            x[i..].copy_from_slice(&tail[..n - i]);
            sum += tail[..n - i].iter().sum::<f32>();
        }
        sum
    }

    /// e^x in each lane (Cephes' `expf`); inputs below -87.3 give about 1e-38, above 88.4
    /// about 3e38.
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // ln 2 in two parts, the first exact in few bits, so that x - n ln 2 loses nothing.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const P: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_55)),
            _mm256_set1_ps(88.376_26),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let e = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_stays_within_two_ulp_of_f64() {
        // The whole normal range, then a softmax-like range whose sum stays finite.
        let mut x: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.00875).collect();
        let want: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
        exp_shifted(&mut x, 0.0);
        for (g, w) in x.iter().zip(&want) {
            let ulp = (*w as f32).abs() * f32::EPSILON;
            assert!((*g as f64 - w).abs() <= 2.0 * ulp as f64, "{g} vs {w}");
        }
        let mut x: Vec<f32> = (0..1_003).map(|i| i as f32 * -0.02).collect();
        let sum: f64 = x.iter().map(|&v| (v as f64 - 0.5).exp()).sum();
        let total = exp_shifted(&mut x, 0.5);
        assert!((total as f64 - sum).abs() <= 1e-5 * sum, "{total} vs {sum}");
    }

    #[test]
    fn a_value_gets_the_same_bits_wherever_it_sits() {
        let values: Vec<f32> = (0..29).map(|i| (i as f32 - 14.0) * 0.37).collect();
        let up: Vec<f32> = (0..29).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut all = values.clone();
        silu_times(&mut all, &up);
        for i in 0..values.len() {
            let mut alone = [values[i]];
            silu_times(&mut alone, &up[i..]);
            assert_eq!(alone[0].to_bits(), all[i].to_bits(), "silu at {i}");
            let want = values[i] as f64 / (1.0 + (-values[i] as f64).exp()) * up[i] as f64;
            assert!(
                (all[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{i}"
            );
        }
        let mut all = values.clone();
        exp_shifted(&mut all, 1.5);
        for i in 0..values.len() {
            let mut alone = [values[i]];
            exp_shifted(&mut alone, 1.5);
            assert_eq!(alone[0].to_bits(), all[i].to_bits(), "exp at {i}");
        }
    }
}
