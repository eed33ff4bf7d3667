//! The scale search against round-to-nearest on the output error it minimises, that error
//! against the outputs themselves, and the clipping search on each group's error.

use super::*;

use crate::seeded::Rng;

/// `samples x cols` inputs where every eighth channel is `big` times larger, as a few of a
/// language model's hidden channels are.
fn inputs(samples: usize, cols: usize, big: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..samples * cols)
        .map(|i| {
            rng.next()
                * if (i % cols).is_multiple_of(8) {
                    big
                } else {
                    1.0
                }
        })
        .collect()
}

fn hessian(x: &[f32], samples: usize, cols: usize) -> Hessian {
    let mut h = Hessian::new(cols);
    h.add(x, samples);
    h
}

fn mean_abs(x: &[f32], samples: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|c| (0..samples).map(|s| x[s * cols + c].abs()).sum::<f32>() / samples as f32)
        .collect()
}

fn h32(h: &Hessian) -> Vec<f32> {
    h.matrix().iter().map(|&v| v as f32).collect()
}

#[test]
fn the_output_error_is_the_squared_change_of_the_outputs() {
    let (rows, cols, samples) = (5, 64, 40);
    let mut rng = Rng(1);
    let w = rng.fill(rows * cols);
    let q = Quantized::rtn(Grid::Q4_0, &w, rows, cols)
        .unwrap()
        .dequantize();
    let x = inputs(samples, cols, 10.0, 2);
    let direct: f64 = (0..samples)
        .flat_map(|s| (0..rows).map(move |r| (s, r)))
        .map(|(s, r)| {
            let dot: f64 = (0..cols)
                .map(|c| ((w[r * cols + c] - q[r * cols + c]) * x[s * cols + c]) as f64)
                .sum();
            dot * dot
        })
        .sum::<f64>()
        * 2.0
        / samples as f64;
    let via_h = output_error(&w, &q, rows, cols, &h32(&hessian(&x, samples, cols)));
    assert!(
        (via_h - direct).abs() < 1e-3 * direct,
        "{via_h} vs {direct}"
    );
}

#[test]
fn alpha_zero_is_round_to_nearest_and_the_search_never_does_worse() {
    let (rows, cols, samples) = (16, 64, 200);
    let x = inputs(samples, cols, 1.0, 3);
    let h = hessian(&x, samples, cols);
    let w = Rng(4).fill(rows * cols);
    assert!(scales_for(&mean_abs(&x, samples, cols), 0.0)
        .iter()
        .all(|&s| s == 1.0));
    for grid in [
        Grid::Q4_0,
        Grid::Q4_1,
        Grid::Nf4,
        Grid::Int { bits: 3, group: 32 },
    ] {
        let found =
            search_scales(&[(&w, rows)], &h, &mean_abs(&x, samples, cols), grid, 20).unwrap();
        let rtn = Quantized::rtn(grid, &w, rows, cols).unwrap().dequantize();
        let rtn_error = output_error(&w, &rtn, rows, cols, &h32(&h));
        assert!((found.rtn_error - rtn_error).abs() <= 1e-9 * rtn_error.max(1.0));
        assert!(found.error <= found.rtn_error, "{grid:?}: {found:?}");
    }
}

#[test]
fn scales_lower_the_error_where_a_few_inputs_are_large() {
    let (rows, cols, samples) = (24, 128, 300);
    let x = inputs(samples, cols, 20.0, 5);
    let h = hessian(&x, samples, cols);
    let (a, b) = (Rng(6).fill(rows * cols), Rng(7).fill(2 * rows * cols));
    let stats = mean_abs(&x, samples, cols);
    for grid in [Grid::Q4_0, Grid::Nf4, Grid::Int { bits: 3, group: 64 }] {
        let found = search_scales(&[(&a, rows), (&b, 2 * rows)], &h, &stats, grid, 20).unwrap();
        assert!(found.alpha > 0.0, "{grid:?}");
        assert!(
            found.error < 0.8 * found.rtn_error,
            "{grid:?}: {} against RTN's {}",
            found.error,
            found.rtn_error
        );
        assert_eq!(found.scales, scales_for(&stats, found.alpha));
    }
}

#[test]
fn scales_are_normalised_around_one() {
    let s = scales_for(&[0.5, 2.0, 8.0, 0.0], 0.5);
    let max = s.iter().fold(f32::MIN, |a, &b| a.max(b));
    let min = s.iter().fold(f32::MAX, |a, &b| a.min(b));
    assert!(((max * min).sqrt() - 1.0).abs() < 1e-5, "{s:?}");
    assert!(s[2] > s[1] && s[1] > s[0] && s[0] > s[3], "{s:?}");
}

/// Each group's own output error after rounding onto `grid`: what clipping minimises.
fn group_errors(w: &[f32], rows: usize, cols: usize, h: &Hessian, grid: Grid) -> Vec<f64> {
    let q = Quantized::rtn(grid, w, rows, cols).unwrap().dequantize();
    group_errors_against(w, &q, rows, cols, h, grid.group())
}

#[test]
fn clipping_lowers_the_groups_errors_and_never_raises_one() {
    let (rows, cols, samples) = (32, 64, 200);
    let x = inputs(samples, cols, 1.0, 8);
    let h = hessian(&x, samples, cols);
    let mut rng = Rng(9);
    // Heavy tails: now and then a weight ten times the rest.
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| rng.next() * if i.is_multiple_of(29) { 10.0 } else { 1.0 })
        .collect();
    for grid in [Grid::Q4_0, Grid::Int { bits: 3, group: 32 }] {
        let mut clipped = w.clone();
        let fraction = clip(&mut clipped, rows, cols, &h, grid).unwrap();
        assert!(fraction > 0.0, "{grid:?}: nothing clipped");
        // The clipped group's error is measured against the original weights.
        let g = grid.group();
        let q = Quantized::rtn(grid, &clipped, rows, cols)
            .unwrap()
            .dequantize();
        let after = group_errors_against(&w, &q, rows, cols, &h, g);
        let before = group_errors(&w, rows, cols, &h, grid);
        for (a, b) in after.iter().zip(&before) {
            assert!(*a <= *b + 1e-9, "{grid:?}: {a} > {b}");
        }
        assert!(after.iter().sum::<f64>() < before.iter().sum::<f64>());
    }
}

/// Each group's output error of `q` against `w`.
fn group_errors_against(
    w: &[f32],
    q: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    g: usize,
) -> Vec<f64> {
    let hm = h.matrix();
    let mut out = Vec::new();
    for r in 0..rows {
        for b in 0..cols / g {
            let at = b * g;
            let d: Vec<f64> = (0..g)
                .map(|i| (w[r * cols + at + i] - q[r * cols + at + i]) as f64)
                .collect();
            out.push(
                (0..g)
                    .map(|i| {
                        d[i] * (0..g)
                            .map(|j| hm[(at + i) * cols + at + j] * d[j])
                            .sum::<f64>()
                    })
                    .sum(),
            );
        }
    }
    out
}

#[test]
fn a_scaled_hessian_is_the_hessian_of_the_scaled_inputs() {
    let (cols, samples) = (8, 30);
    let x = inputs(samples, cols, 3.0, 10);
    let s: Vec<f32> = (0..cols).map(|c| 0.5 + c as f32 * 0.25).collect();
    let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v / s[i % cols]).collect();
    let a = hessian(&x, samples, cols).scaled(&s).matrix();
    let b = hessian(&xs, samples, cols).matrix();
    for (u, v) in a.iter().zip(&b) {
        assert!((u - v).abs() < 1e-4 * v.abs().max(1.0), "{u} vs {v}");
    }
}

#[test]
fn inputs_that_do_not_match_are_an_error() {
    let h = Hessian::new(64);
    let w = vec![0.0; 64];
    assert!(search_scales(&[(&w, 1)], &h, &[1.0; 64], Grid::Q4_0, 20).is_err());
    let h = hessian(&inputs(4, 64, 1.0, 1), 4, 64);
    assert!(search_scales(&[(&w, 1)], &h, &[1.0; 32], Grid::Q4_0, 20).is_err());
    let mut w = vec![0.0; 48];
    assert!(clip(
        &mut w,
        1,
        48,
        &hessian(&inputs(4, 48, 1.0, 1), 4, 48),
        Grid::Q4_0
    )
    .is_err());
}
