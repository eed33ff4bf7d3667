//! GPTQ against a direct f64 implementation of the paper's algorithm (the inverse Hessian
//! by Gauss-Jordan, each column's error spread by `H_F^-1`'s row and `H_F^-1` updated by
//! Gaussian elimination, no Cholesky and no blocks), against RTN on a diagonal Hessian (the
//! OBQ identity), and on the output error it exists to lower.

use super::*;

use crate::seeded::Rng;

/// `samples` inputs of `cols` correlated features: random mixtures of a few shared sources,
/// some features much larger than others, one never active.
fn correlated(samples: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let sources = 6;
    let mix = rng.fill(sources * cols);
    let mut x = vec![0.0f32; samples * cols];
    for s in 0..samples {
        let z = rng.fill(sources);
        for c in 0..cols {
            let scale = if c % 7 == 0 { 4.0 } else { 1.0 };
            let v: f32 = (0..sources).map(|k| z[k] * mix[k * cols + c]).sum();
            x[s * cols + c] = if c == 3 {
                0.0
            } else {
                scale * v + 0.1 * rng.next()
            };
        }
    }
    x
}

fn hessian(x: &[f32], samples: usize, cols: usize) -> Hessian {
    let mut h = Hessian::new(cols);
    h.add(&x[..samples / 2 * cols], samples / 2);
    h.add(&x[samples / 2 * cols..], samples - samples / 2);
    h
}

/// The paper's algorithm as written, in f64, on the same Hessian.
fn reference(w: &[f32], rows: usize, cols: usize, h: &Hessian, grid: Grid, gptq: &Gptq) -> Vec<u8> {
    let n = cols;
    let g = grid.group();
    let mut h = h.matrix();
    let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            for r in 0..rows {
                w[r * n + i] = 0.0;
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    let groups = n / g;
    let mut fits = vec![GroupFit::default(); rows * groups];
    if gptq.act_order {
        order.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
        for r in 0..rows {
            for gi in 0..groups {
                let group: Vec<f32> = w[r * n + gi * g..][..g].iter().map(|&v| v as f32).collect();
                fits[r * groups + gi] = grid.fit(&group);
            }
        }
    }
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        h[i * n + i] += gptq.damp * mean;
    }
    // H^-1 by Gauss-Jordan elimination.
    let mut a = h.clone();
    let mut inv: Vec<f64> = (0..n * n).map(|k| (k / n == k % n) as u8 as f64).collect();
    for p in 0..n {
        let d = a[p * n + p];
        for j in 0..n {
            a[p * n + j] /= d;
            inv[p * n + j] /= d;
        }
        for i in (0..n).filter(|&i| i != p) {
            let f = a[i * n + p];
            for j in 0..n {
                a[i * n + j] -= f * a[p * n + j];
                inv[i * n + j] -= f * inv[p * n + j];
            }
        }
    }
    let mut codes = vec![0u8; rows * n];
    let mut done = vec![false; n];
    for (step, &q) in order.iter().enumerate() {
        if !gptq.act_order && q % g == 0 {
            for r in 0..rows {
                let group: Vec<f32> = w[r * n + q..][..g].iter().map(|&v| v as f32).collect();
                fits[r * groups + q / g] = grid.fit(&group);
            }
        }
        let d = inv[q * n + q];
        for r in 0..rows {
            let fit = fits[r * groups + q / g];
            let code = grid.encode(fit, w[r * n + q] as f32);
            codes[r * n + q] = code;
            let e = (w[r * n + q] - grid.decode(fit, code) as f64) / d;
            for &j in &order[step + 1..] {
                w[r * n + j] -= e * inv[q * n + j];
            }
        }
        // Remove q from the inverse Hessian of the columns left.
        done[q] = true;
        let col: Vec<f64> = (0..n).map(|i| inv[i * n + q]).collect();
        let row: Vec<f64> = (0..n).map(|j| inv[q * n + j]).collect();
        for i in (0..n).filter(|&i| !done[i]) {
            for j in (0..n).filter(|&j| !done[j]) {
                inv[i * n + j] -= col[i] * row[j] / d;
            }
        }
    }
    codes
}

/// `|| W X^T - Q X^T ||^2` over the samples.
fn output_error(w: &[f32], q: &[f32], rows: usize, cols: usize, x: &[f32], samples: usize) -> f64 {
    let mut total = 0.0;
    for s in 0..samples {
        for r in 0..rows {
            let d: f64 = (0..cols)
                .map(|c| (w[r * cols + c] - q[r * cols + c]) as f64 * x[s * cols + c] as f64)
                .sum();
            total += d * d;
        }
    }
    total
}

#[test]
fn codes_equal_the_papers_algorithm_in_f64() {
    let (rows, cols, samples) = (6, 128, 300);
    let x = correlated(samples, cols, 1);
    let h = hessian(&x, samples, cols);
    let w = Rng(2).fill(rows * cols);
    for grid in [
        Grid::Int { bits: 3, group: 32 },
        Grid::Q4_0,
        Grid::Nf4,
        Grid::Int {
            bits: 2,
            group: 128,
        },
    ] {
        for act_order in [false, true] {
            // Blocks of 48 hold no whole number of groups of 32: blocks become groups.
            for block in [128, 32, 48] {
                let gptq = Gptq {
                    block,
                    act_order,
                    ..Gptq::default()
                };
                let got = gptq.quantize(&w, rows, cols, &h, grid).unwrap();
                let want = reference(&w, rows, cols, &h, grid, &gptq);
                let differ = got.codes.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{grid:?}, act order {act_order}, block {block}");
            }
        }
    }
}

#[test]
fn a_diagonal_hessian_makes_gptq_round_to_nearest() {
    let (rows, cols) = (5, 64);
    let mut rng = Rng(3);
    let w = rng.fill(rows * cols);
    // One input active per sample: X^T X is diagonal, with unequal entries.
    let mut x = vec![0.0f32; cols * cols];
    for c in 0..cols {
        x[c * cols + c] = 1.0 + c as f32 / 10.0;
    }
    let mut h = Hessian::new(cols);
    h.add(&x, cols);
    for grid in [
        Grid::Q4_0,
        Grid::Q4_1,
        Grid::Q8_0,
        Grid::Nf4,
        Grid::Int { bits: 3, group: 16 },
    ] {
        for act_order in [false, true] {
            let gptq = Gptq {
                act_order,
                ..Gptq::default()
            };
            let got = gptq.quantize(&w, rows, cols, &h, grid).unwrap();
            assert_eq!(
                got,
                Quantized::rtn(grid, &w, rows, cols).unwrap(),
                "{grid:?}"
            );
        }
    }
}

#[test]
fn the_output_error_is_never_above_round_to_nearests() {
    let (rows, cols, samples) = (8, 256, 400);
    for seed in 0..4 {
        let x = correlated(samples, cols, 10 + seed);
        let h = hessian(&x, samples, cols);
        let w = Rng(20 + seed).fill(rows * cols);
        for grid in [
            Grid::Q4_0,
            Grid::Q4_1,
            Grid::Nf4,
            Grid::Int { bits: 3, group: 64 },
            Grid::Int { bits: 2, group: 64 },
        ] {
            let rtn = output_error(
                &w,
                &Quantized::rtn(grid, &w, rows, cols).unwrap().dequantize(),
                rows,
                cols,
                &x,
                samples,
            );
            for act_order in [false, true] {
                let gptq = Gptq {
                    act_order,
                    ..Gptq::default()
                };
                let q = gptq
                    .quantize(&w, rows, cols, &h, grid)
                    .unwrap()
                    .dequantize();
                let err = output_error(&w, &q, rows, cols, &x, samples);
                assert!(
                    err <= rtn,
                    "{grid:?} seed {seed} act order {act_order}: {err} against RTN's {rtn}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_and_calibration_are_errors() {
    let w = vec![0.5f32; 2 * 48];
    let h = Hessian::new(48);
    assert!(matches!(
        Gptq::default().quantize(&w, 2, 48, &h, Grid::Q4_0),
        Err(QuantError::Group {
            group: 32,
            inputs: 48
        })
    ));
    let err = Gptq::default()
        .quantize(&w, 2, 48, &h, Grid::Int { bits: 4, group: 16 })
        .unwrap_err();
    assert!(err.to_string().contains("0 samples"), "{err}");
    assert!(Quantized::rtn(Grid::Nf4, &w, 2, 48).is_err());
}

#[test]
fn ggml_blocks_decode_to_the_quantized_weights() {
    let (rows, cols, samples) = (4, 64, 100);
    let x = correlated(samples, cols, 5);
    let h = hessian(&x, samples, cols);
    let w = Rng(6).fill(rows * cols);
    for grid in [Grid::Q4_0, Grid::Q4_1, Grid::Q8_0] {
        let q = Gptq::default().quantize(&w, rows, cols, &h, grid).unwrap();
        let (ty, bytes) = q.ggml_blocks().unwrap();
        assert_eq!(
            crate::ggml::dequantize(ty, &bytes, rows * cols).unwrap(),
            q.dequantize(),
            "{grid:?}"
        );
    }
    let nf4 = Quantized::rtn(Grid::Nf4, &w, rows, cols).unwrap();
    assert!(nf4.ggml_blocks().is_none());
}

#[test]
fn nf4_packs_as_bitsandbytes_and_decodes_to_the_quantized_weights() {
    let (rows, cols, samples) = (3, 128, 100);
    let x = correlated(samples, cols, 7);
    let h = hessian(&x, samples, cols);
    let w = Rng(8).fill(rows * cols);
    let q = Gptq::default()
        .quantize(&w, rows, cols, &h, Grid::Nf4)
        .unwrap();
    assert_eq!(q.nf4(false).unwrap().dequantize(), q.dequantize());
    // Double quantization stores the absmax values in 8 bits: close, not equal.
    let dq = q.nf4(true).unwrap().dequantize();
    let worst = dq
        .iter()
        .zip(q.dequantize())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.02, "{worst}");
    assert!(Quantized::rtn(Grid::Q4_0, &w, rows, cols)
        .unwrap()
        .nf4(false)
        .is_none());
}
