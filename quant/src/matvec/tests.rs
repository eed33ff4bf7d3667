//! The products on every instruction set: against a reference computed in f64, and to the
//! bit against each other where the sums are exact.

use super::product::product_on;
use super::{matmul, matmul_bf16, Isa, Q8Rows, TileLayout, Weights, BLOCK};
use crate::ggml::{dequantize, quantize_q4_0, quantize_q4_1, quantize_q8_0, GgmlType};

/// Deterministic values in [-1, 1), for the tests of every file here.
pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn encode(ty: GgmlType, w: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::Q8_0 => quantize_q8_0(w),
        GgmlType::Q4_0 => quantize_q4_0(w),
        _ => quantize_q4_1(w),
    }
    .unwrap()
}

/// x W^T with W dequantized and x rounded through its 8-bit blocks, in f64: what the
/// integer kernels compute exactly, up to f32 summation.
fn reference(ty: GgmlType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f64> {
    let wf = dequantize(ty, w, n * k).unwrap();
    let xq = Q8Rows::new(x);
    let xf: Vec<f64> = xq
        .qs
        .iter()
        .enumerate()
        .map(|(i, &q)| q as f64 * xq.d[i / BLOCK] as f64)
        .collect();
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for r in 0..n {
            y[i * n + r] = (0..k).map(|c| xf[i * k + c] * wf[r * k + c] as f64).sum();
        }
    }
    y
}

#[test]
fn every_kernel_matches_the_reference_on_every_isa() {
    // Odd shapes: one block, row counts that leave partial tasks, batches of 1 to 64.
    for &(n, k, m) in &[
        (1, 32, 1),
        (7, 64, 3),
        (33, 96, 1),
        (300, 576, 2),
        (65, 160, 64),
        (6, 4160, 2),
        (5, 4160, 9),
    ] {
        let w = values(n * k, 1 + n as u64);
        let x = values(m * k, 2 + k as u64);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = encode(ty, &w);
            let want = reference(ty, &bytes, n, k, &x, m);
            for isa in Isa::available() {
                let w = Weights::Blocks {
                    ty,
                    bytes: &bytes,
                    tiles: None,
                };
                let got = product_on(isa, w, n, k, &x, m);
                for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                    let tolerance = 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt();
                    assert!(
                        (*g as f64 - e).abs() <= tolerance,
                        "{ty:?} {isa:?} n={n} k={k} m={m} at {j}: {g} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_gets_the_same_bits_in_a_tile_and_alone() {
    // 13 rows: a tile of eight, one of four, then one alone; each must equal its own
    // m = 1 call.
    let (n, k, m) = (9, 96, 13);
    let w = values(n * k, 5);
    let x = values(m * k, 6);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        let bytes = encode(ty, &w);
        let kept = TileLayout::default();
        for (isa, tiles) in Isa::available()
            .into_iter()
            .flat_map(|isa| [(isa, None), (isa, Some(&kept))])
        {
            let w = Weights::Blocks {
                ty,
                bytes: &bytes,
                tiles,
            };
            let batch = product_on(isa, w, n, k, &x, m);
            for i in 0..m {
                let alone = product_on(isa, w, n, k, &x[i * k..(i + 1) * k], 1);
                assert_eq!(
                    batch[i * n..(i + 1) * n],
                    alone[..],
                    "{ty:?} {isa:?} row {i}"
                );
            }
        }
    }
}

#[test]
fn the_vnni_and_amx_kernels_give_the_avx2_bits() {
    // Exact integer sums in the same order: every variant must agree to the bit, at
    // decode (m = 1), in tiles of four, eight and sixteen, and on tails of weight rows
    // and activation rows.
    let available = Isa::available();
    if !available.contains(&Isa::Avx2) {
        return;
    }
    for &(n, k, m) in &[
        (9, 96, 1),
        (13, 576, 13),
        (70, 1536, 8),
        (3, 4160, 5),
        (37, 576, 16),
        (20, 64, 33),
        (48, 160, 64),
    ] {
        let w = values(n * k, 11 + n as u64);
        let x = values(m * k, 12 + m as u64);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = encode(ty, &w);
            let kept = TileLayout::default();
            let w = |tiles| Weights::Blocks {
                ty,
                bytes: &bytes,
                tiles,
            };
            let want = product_on(Isa::Avx2, w(None), n, k, &x, m);
            for &isa in available.iter().filter(|&&isa| isa > Isa::Avx2) {
                // Rows laid out per call, then from the layout the weight keeps (whose
                // groups start at row 0, not where a thread's rows do).
                for tiles in [None, Some(&kept), Some(&kept)] {
                    assert_eq!(
                        want,
                        product_on(isa, w(tiles), n, k, &x, m),
                        "{ty:?} {isa:?} n={n} k={k} m={m} kept {}",
                        tiles.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn the_float_kernels_match_the_reference_on_every_isa() {
    for &(n, k, m) in &[
        (1, 1, 1),
        (5, 17, 2),
        (40, 200, 3),
        (9, 576, 64),
        (3, 45, 5),
    ] {
        let w: Vec<u16> = values(n * k, 5 + k as u64)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let wf: Vec<f32> = w
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        let x = values(m * k, 6);
        for isa in Isa::available() {
            for (got, format) in [
                (product_on(isa, Weights::Bf16(&w), n, k, &x, m), "bf16"),
                (product_on(isa, Weights::F32(&wf), n, k, &x, m), "f32"),
            ] {
                for i in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| wf[r * k + c] as f64 * x[i * k + c] as f64)
                            .sum();
                        let g = got[i * n + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{format} {isa:?} n={n} k={k} m={m} ({i}, {r}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_four_bit_kernels_match_the_reference_on_every_isa() {
    use crate::bnb4::{self, FourBit};
    for &(n, k, m) in &[(1, 64, 1), (7, 128, 3), (5, 576, 9), (3, 1536, 4)] {
        let w = values(n * k, 11 + n as u64);
        let x = values(m * k, 12 + k as u64);
        for kind in [FourBit::Nf4, FourBit::Fp4] {
            let (codes, absmax) = bnb4::quantize(kind, &w);
            let mut wf = vec![0f32; n * k];
            bnb4::dequantize_into(kind, &codes, &absmax, &mut wf);
            let weights = Weights::FourBit {
                code: kind.code(),
                codes: &codes,
                absmax: &absmax,
            };
            for isa in Isa::available() {
                let got = product_on(isa, weights, n, k, &x, m);
                for i in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| wf[r * k + c] as f64 * x[i * k + c] as f64)
                            .sum();
                        let g = got[i * n + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{kind:?} {isa:?} n={n} k={k} m={m} ({i}, {r}): {g} vs {want}"
                        );
                    }
                    let alone = product_on(isa, weights, n, k, &x[i * k..(i + 1) * k], 1);
                    assert_eq!(
                        alone[..],
                        got[i * n..(i + 1) * n],
                        "{kind:?} {isa:?} row {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn no_rows_give_no_output() {
    let w = quantize_q8_0(&values(64, 7)).unwrap();
    assert!(matmul(GgmlType::Q8_0, &w, 2, 32, &[], 0).is_empty());
    assert!(matmul_bf16(&[0; 64], 2, 32, &[], 0).is_empty());
}

#[test]
fn quantized_activations_stay_close_to_the_f32_product() {
    let (n, k) = (16, 576);
    let w = values(n * k, 3);
    let x = values(k, 4);
    let bytes = encode(GgmlType::Q8_0, &w);
    let wf = dequantize(GgmlType::Q8_0, &bytes, n * k).unwrap();
    let got = matmul(GgmlType::Q8_0, &bytes, n, k, &x, 1);
    // Rounding x to steps of absmax / 127 (absmax <= 1) adds to each term an error
    // uniform in half a step times |w| (rms 1 / sqrt(3)): four standard deviations of k.
    let sigma = (k as f32).sqrt() * (1.0 / 127.0) / 12f32.sqrt() / 3f32.sqrt();
    for r in 0..n {
        let exact: f32 = (0..k).map(|c| x[c] * wf[r * k + c]).sum();
        assert!(
            (got[r] - exact).abs() < 4.0 * sigma,
            "{r}: {} vs {exact}",
            got[r]
        );
    }
}
