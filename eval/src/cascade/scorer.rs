//! The scorer of a FrugalGPT cascade (Chen, Zaharia and Zou 2023, "FrugalGPT: How to Use
//! Large Language Models While Reducing Cost and Improving Performance", arXiv:2305.05176,
//! section 3): the probability that a stage's answer is right, from its features. The paper
//! scores answers with a small fine-tuned language model; here it is a logistic regression
//! over a few cheap features (at most 16), fitted by Newton's method, so fitting is instant
//! and needs no accelerator. [`out_of_fold`] gives each development example a score from a
//! model fitted without it, so thresholds are not tuned on scores the scorer has seen.

use ft_serve::cascade::scorer::{sigmoid, Logistic};

use crate::tasks::SplitMix64;

/// Newton iterations at most.
const MAX_ITERATIONS: usize = 50;
/// Newton stops once no coefficient moves by this much.
const STEP_TOLERANCE: f64 = 1e-8;
/// A column whose standard deviation is below this is constant: scale 1 and no signal.
const MIN_SCALE: f64 = 1e-12;
/// Constant models clamp the rate of right answers to `[RATE_CLAMP, 1 - RATE_CLAMP]`, so
/// their logit stays finite.
const RATE_CLAMP: f64 = 1e-3;
/// Ridges added to the Hessian's diagonal, in turn, when its Cholesky factorisation fails.
/// The first retry is 1e-6; the larger ones only guard against a Hessian wrecked by rounding.
const JITTERS: [f64; 5] = [0.0, 1e-6, 1e-4, 1e-2, 1.0];

/// Fits `P(right | x) = sigmoid(bias + w . (x - mean) / scale)` to the rows of `x` and the
/// labels `y`, with an L2 penalty `l2 / 2 * |w|^2` on the weights (not the bias).
///
/// Newton's method (iteratively reweighted least squares) runs at most 50 steps and stops
/// once no coefficient moves by 1e-8; each step solves its (d+1)x(d+1) system by Cholesky,
/// with a small ridge when the Hessian is singular (a constant column, `l2 = 0`). A step
/// that would lower the penalized likelihood is halved, so separable data, whose
/// unpenalized optimum lies at infinity, leaves large but finite weights. All-right or
/// all-wrong labels give zero weights and the logit of the clamped rate; no rows give
/// score 0.5. A missing (NaN or infinite) feature counts as the column's mean.
pub fn fit(features: &[String], x: &[Vec<f64>], y: &[bool], l2: f64) -> Logistic {
    debug_assert_eq!(x.len(), y.len(), "one label per row");
    let rows: Vec<usize> = (0..x.len().min(y.len())).collect();
    fit_rows(features, x, y, &rows, l2)
}

/// [`fit`] on the rows `rows` of `x` and `y`, so cross-fitting needs no copies.
fn fit_rows(features: &[String], x: &[Vec<f64>], y: &[bool], rows: &[usize], l2: f64) -> Logistic {
    let d = features.len();
    let n = rows.len();
    let value = |i: usize, j: usize| x[i].get(j).copied().filter(|v| v.is_finite());

    // Standardisation: mean and population standard deviation of the present values.
    let mut mean = vec![0.0; d];
    let mut scale = vec![1.0; d];
    let mut constant = vec![true; d];
    for j in 0..d {
        let present = rows.iter().filter_map(|&i| value(i, j));
        let (sum, count) = present.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
        if count == 0 {
            continue;
        }
        let m = sum / count as f64;
        let var = rows
            .iter()
            .filter_map(|&i| value(i, j))
            .map(|v| (v - m) * (v - m))
            .sum::<f64>()
            / count as f64;
        let sd = var.sqrt();
        if m.is_finite() {
            mean[j] = m;
        }
        if m.is_finite() && sd.is_finite() && sd >= MIN_SCALE {
            scale[j] = sd;
            constant[j] = false;
        }
    }

    let positives = rows.iter().filter(|&&i| y[i]).count();
    let rate = if n == 0 {
        0.5
    } else {
        positives as f64 / n as f64
    };
    let mut model = Logistic {
        features: features.to_vec(),
        mean,
        scale,
        weights: vec![0.0; d],
        bias: logit(rate.clamp(RATE_CLAMP, 1.0 - RATE_CLAMP)),
    };
    if positives == 0 || positives == n {
        return model;
    }

    // The design matrix, one row per item: [1, standardised features].
    let p = d + 1;
    let mut z = vec![0.0; n * p]; // [n, p]
    let mut target = vec![0.0; n]; // [n]
    for (r, &i) in rows.iter().enumerate() {
        z[r * p] = 1.0;
        for j in 0..d {
            if let (false, Some(v)) = (constant[j], value(i, j)) {
                z[r * p + 1 + j] = (v - model.mean[j]) / model.scale[j];
            }
        }
        target[r] = if y[i] { 1.0 } else { 0.0 };
    }

    // The penalized log-likelihood: sum_r [y t - log(1 + e^t)] - l2/2 |w|^2.
    let objective = |beta: &[f64]| -> f64 {
        let mut total = 0.0;
        for r in 0..n {
            let t = dot(&z[r * p..(r + 1) * p], beta);
            total += target[r] * t - softplus(t);
        }
        total - 0.5 * l2 * beta[1..].iter().map(|w| w * w).sum::<f64>()
    };

    let mut beta = vec![0.0; p]; // [bias, w_1..w_d]
    beta[0] = model.bias;
    let mut current = objective(&beta);
    for _ in 0..MAX_ITERATIONS {
        // Gradient and Hessian of the penalized likelihood (the lower triangle of H).
        let mut gradient = vec![0.0; p]; // [p]
        let mut hessian = vec![0.0; p * p]; // [p, p]
        for r in 0..n {
            let zr = &z[r * p..(r + 1) * p];
            let prob = sigmoid(dot(zr, &beta));
            let residual = target[r] - prob;
            let weight = prob * (1.0 - prob);
            for a in 0..p {
                gradient[a] += zr[a] * residual;
                let wa = weight * zr[a];
                for b in 0..=a {
                    hessian[a * p + b] += wa * zr[b];
                }
            }
        }
        for a in 1..p {
            gradient[a] -= l2 * beta[a];
            hessian[a * p + a] += l2;
        }
        let Some(step) = solve_spd(&hessian, &gradient, p) else {
            break;
        };

        // Take the full Newton step unless it lowers the objective; then halve it.
        let mut fraction = 1.0;
        let mut taken = None;
        for _ in 0..40 {
            let candidate: Vec<f64> = beta
                .iter()
                .zip(&step)
                .map(|(b, s)| b + fraction * s)
                .collect();
            let value = objective(&candidate);
            let finite = value.is_finite() && candidate.iter().all(|c| c.is_finite());
            if finite && value >= current - 1e-12 * current.abs().max(1.0) {
                taken = Some((candidate, value));
                break;
            }
            fraction *= 0.5;
        }
        let Some((next, value)) = taken else {
            break;
        };
        let moved = next
            .iter()
            .zip(&beta)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        beta = next;
        current = value;
        if moved < STEP_TOLERANCE {
            break;
        }
    }
    model.bias = beta[0];
    model.weights = beta[1..].to_vec();
    model
}

/// Solves `H x = g` for a symmetric positive (semi)definite `H` given by its lower triangle
/// (`[p, p]`, row-major), by Cholesky; a failed factorisation is retried with a ridge on the
/// diagonal. `None` if even the largest ridge fails or the solution is not finite.
fn solve_spd(h: &[f64], g: &[f64], p: usize) -> Option<Vec<f64>> {
    for jitter in JITTERS {
        let Some(l) = cholesky(h, p, jitter) else {
            continue;
        };
        // Forward substitution L u = g, then back substitution L^T x = u.
        let mut u = vec![0.0; p];
        for i in 0..p {
            let s: f64 = (0..i).map(|k| l[i * p + k] * u[k]).sum();
            u[i] = (g[i] - s) / l[i * p + i];
        }
        let mut x = vec![0.0; p];
        for i in (0..p).rev() {
            let s: f64 = (i + 1..p).map(|k| l[k * p + i] * x[k]).sum();
            x[i] = (u[i] - s) / l[i * p + i];
        }
        if x.iter().all(|v| v.is_finite()) {
            return Some(x);
        }
    }
    None
}

/// The lower-triangular `L` with `L L^T = H + jitter I`, or `None` when a pivot is not
/// positive (relative to the largest diagonal entry), i.e. the matrix is singular to working
/// precision.
fn cholesky(h: &[f64], p: usize, jitter: f64) -> Option<Vec<f64>> {
    let largest = (0..p).map(|i| h[i * p + i].abs()).fold(0.0, f64::max);
    let tolerance = 1e-12 * largest;
    let mut l = vec![0.0; p * p]; // [p, p]
    for i in 0..p {
        for j in 0..=i {
            let mut s = h[i * p + j] + if i == j { jitter } else { 0.0 };
            for k in 0..j {
                s -= l[i * p + k] * l[j * p + k];
            }
            if i == j {
                if s.is_nan() || s <= tolerance || s.is_infinite() {
                    return None;
                }
                l[i * p + i] = s.sqrt();
            } else {
                l[i * p + j] = s / l[j * p + j];
            }
        }
    }
    Some(l)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `log(1 + e^t)`, without overflow for large `|t|`.
fn softplus(t: f64) -> f64 {
    t.max(0.0) + (-t.abs()).exp().ln_1p()
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

/// Out-of-fold scores: each item scored by a model fitted (with [`fit`]) on the
/// other folds, so the cascade search sees scores as noisy as those of unseen test items
/// rather than the optimistic in-sample ones.
///
/// Items are shuffled by a SplitMix64 seeded with `seed` and dealt round-robin into `folds`
/// folds (at least 2); with fewer items than folds every item is its own fold
/// (leave-one-out). With 0 or 1 items there is nothing to hold out from, and the result is the
/// constant model's score (the clamped rate of right answers). One score per item, in item
/// order.
pub fn out_of_fold(
    features: &[String],
    x: &[Vec<f64>],
    y: &[bool],
    folds: usize,
    seed: u64,
    l2: f64,
) -> Vec<f64> {
    debug_assert_eq!(x.len(), y.len(), "one label per row");
    let n = x.len().min(y.len());
    if n <= 1 {
        let model = fit(features, &x[..n], &y[..n], l2);
        return x[..n].iter().map(|row| model.score(row)).collect();
    }

    let k = folds.clamp(2, n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut fold_of = vec![0; n];
    for (position, &i) in order.iter().enumerate() {
        fold_of[i] = position % k;
    }

    let mut out = vec![0.0; n];
    for fold in 0..k {
        let train: Vec<usize> = (0..n).filter(|&i| fold_of[i] != fold).collect();
        let model = fit_rows(features, x, y, &train, l2);
        for i in (0..n).filter(|&i| fold_of[i] == fold) {
            out[i] = model.score(&x[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(rng: &mut SplitMix64) -> f64 {
        // 53 random bits to [0, 1), then to [-1, 1).
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn names() -> Vec<String> {
        vec!["x0".to_string(), "x1".to_string()]
    }

    /// 400 items uniform in [-1, 1]^2, right when x0 + 0.5 x1 > 0, 5% of labels flipped.
    fn noisy() -> (Vec<Vec<f64>>, Vec<bool>) {
        let mut rng = SplitMix64(7);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..400 {
            let (x0, x1) = (uniform(&mut rng), uniform(&mut rng));
            let flip = rng.below(20) == 0;
            x.push(vec![x0, x1]);
            y.push((x0 + 0.5 * x1 > 0.0) != flip);
        }
        (x, y)
    }

    fn accuracy(model: &Logistic, x: &[Vec<f64>], y: &[bool]) -> f64 {
        let right = x
            .iter()
            .zip(y)
            .filter(|(row, &label)| (model.score(row) >= 0.5) == label)
            .count();
        right as f64 / x.len() as f64
    }

    #[test]
    fn fit_separates_noisy_data() {
        let (x, y) = noisy();
        let model = fit(&names(), &x, &y, 1e-3);
        assert!(accuracy(&model, &x, &y) >= 0.9, "{model:?}");
        assert!(
            model.weights[0] > 0.0 && model.weights[1] > 0.0,
            "{model:?}"
        );
        // x0 matters twice as much as x1 (both have about the same spread).
        let ratio = model.weights[0] / model.weights[1];
        assert!((1.3..3.0).contains(&ratio), "{model:?}");
    }

    #[test]
    fn separable_data_stays_finite() {
        let (x, _) = noisy();
        let y: Vec<bool> = x.iter().map(|row| row[0] > 0.0).collect();
        for l2 in [0.0, 1e-3] {
            let model = fit(&names(), &x, &y, l2);
            assert!(model.bias.is_finite(), "{model:?}");
            assert!(model.weights.iter().all(|w| w.is_finite()), "{model:?}");
            assert!(x.iter().all(|row| model.score(row).is_finite()));
            assert!(accuracy(&model, &x, &y) >= 0.99, "l2 {l2}: {model:?}");
        }
    }

    #[test]
    fn one_label_gives_the_clamped_rate() {
        let (x, _) = noisy();
        let all_true = fit(&names(), &x, &vec![true; x.len()], 0.0);
        assert_eq!(all_true.weights, vec![0.0, 0.0]);
        for row in &x {
            let s = all_true.score(row);
            assert!((s - 0.999).abs() < 1e-12, "{s}");
        }
        let all_false = fit(&names(), &x, &vec![false; x.len()], 0.0);
        assert!((all_false.score(&x[0]) - 0.001).abs() < 1e-12);
        let empty = fit(&names(), &[], &[], 0.0);
        assert_eq!(empty.bias, 0.0);
        assert_eq!(empty.score(&[0.3, f64::NAN]), 0.5);
    }

    #[test]
    fn constant_columns_and_missing_values() {
        let (x, y) = noisy();
        // A third, constant column: scale 1, weight 0, and the fit is unchanged.
        let x3: Vec<Vec<f64>> = x.iter().map(|row| vec![row[0], row[1], 0.1]).collect();
        let mut features = names();
        features.push("c".to_string());
        let model = fit(&features, &x3, &y, 0.0);
        assert_eq!(model.scale[2], 1.0);
        assert!(model.weights[2].abs() < 1e-9, "{model:?}");
        assert!(accuracy(&model, &x3, &y) >= 0.9);
        // A missing feature counts as its mean.
        let at_mean = model.score(&[0.5, model.mean[1], 0.1]);
        assert_eq!(model.score(&[0.5, f64::NAN, 0.1]), at_mean);
        assert_eq!(model.score(&[0.5, f64::INFINITY, 0.1]), at_mean);
    }

    #[test]
    fn serde_round_trip_keeps_scores() {
        let (x, y) = noisy();
        let model = fit(&names(), &x, &y, 1e-2);
        let json = serde_json::to_string(&model).expect("serialize");
        let back: Logistic = serde_json::from_str(&json).expect("deserialize");
        for row in &x {
            assert_eq!(model.score(row), back.score(row));
        }
    }

    #[test]
    fn out_of_fold_holds_items_out() {
        let (x, y) = noisy();
        let model = fit(&names(), &x, &y, 1e-3);
        let held_out = out_of_fold(&names(), &x, &y, 5, 11, 1e-3);
        assert_eq!(held_out.len(), x.len());
        let in_sample: Vec<f64> = x.iter().map(|row| model.score(row)).collect();
        let differ = held_out
            .iter()
            .zip(&in_sample)
            .filter(|(a, b)| (*a - *b).abs() > 1e-6)
            .count();
        assert!(differ > x.len() / 2, "{differ} of {} differ", x.len());
        // In item order: each held-out score is close to the item's in-sample score (a
        // shuffled vector would not be), and still classifies well.
        let gap = held_out
            .iter()
            .zip(&in_sample)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / x.len() as f64;
        assert!(gap < 0.05, "{gap}");
        let right = held_out
            .iter()
            .zip(&y)
            .filter(|(s, &label)| (**s >= 0.5) == label)
            .count();
        assert!(right as f64 / x.len() as f64 >= 0.88);
        // The same seed gives the same folds.
        assert_eq!(held_out, out_of_fold(&names(), &x, &y, 5, 11, 1e-3));
    }

    #[test]
    fn out_of_fold_on_few_items() {
        assert!(out_of_fold(&names(), &[], &[], 5, 0, 0.0).is_empty());
        let one = out_of_fold(&names(), &[vec![0.2, 0.3]], &[true], 5, 0, 0.0);
        assert_eq!(one.len(), 1);
        assert!((one[0] - 0.999).abs() < 1e-12);
        // Three items, five folds: leave-one-out. Holding out item 0 leaves two wrong labels.
        let x = vec![vec![0.0, 0.0], vec![1.0, 0.0], vec![2.0, 1.0]];
        let scores = out_of_fold(&names(), &x, &[true, false, false], 5, 3, 0.1);
        assert_eq!(scores.len(), 3);
        assert!((scores[0] - 0.001).abs() < 1e-12, "{scores:?}");
        assert!(scores.iter().all(|s| s.is_finite()));
    }
}
