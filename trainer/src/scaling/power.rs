//! Power laws fitted by least squares in log space, the two older ways of reading runs:
//! Hoffmann et al.'s approach 1, the runs on the efficient frontier (the lowest loss yet for
//! their compute) giving `N_opt(C)` and `D_opt(C)`; and Kaplan et al.'s (2020)
//! `L(N) = (N_c / N)^alpha_N` and `L(D) = (D_c / D)^alpha_D`, each over the lowest loss of
//! every size (every token budget), the runs least limited by the other.

use serde::Serialize;

use super::fit::Point;

/// `y = coefficient * x^exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerLaw {
    /// The value at x = 1.
    pub coefficient: f64,
    /// The exponent.
    pub exponent: f64,
}

impl PowerLaw {
    /// The law's value at `x`.
    pub fn at(&self, x: f64) -> f64 {
        self.coefficient * x.powf(self.exponent)
    }
}

/// Least squares of `ln y` on `ln x`; `None` with fewer than two distinct x.
fn log_linear(points: &[(f64, f64)]) -> Option<PowerLaw> {
    let n = points.len() as f64;
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.ln(), y.ln())).collect();
    let mx = logs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = logs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if points.len() < 2 || sxx <= 1e-12 {
        return None;
    }
    let exponent = sxy / sxx;
    Some(PowerLaw {
        coefficient: (my - exponent * mx).exp(),
        exponent,
    })
}

/// Approach 1: the compute-optimal size and data as power laws of compute (C = 6ND).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Frontier {
    /// Runs on the frontier.
    pub runs: usize,
    /// `N_opt(C)`.
    pub params: PowerLaw,
    /// `D_opt(C)`.
    pub tokens: PowerLaw,
}

/// The efficient frontier of `runs` (each run whose loss is below that of every run of less
/// compute) and the power laws through it; `None` when fewer than two runs are on it.
pub fn frontier(runs: &[Point]) -> Option<Frontier> {
    let mut by_compute: Vec<&Point> = runs.iter().collect();
    by_compute.sort_by(|a, b| (a.params * a.tokens).total_cmp(&(b.params * b.tokens)));
    let mut best = f64::INFINITY;
    let mut on: Vec<&Point> = Vec::new();
    for p in by_compute {
        if p.loss < best {
            best = p.loss;
            on.push(p);
        }
    }
    // One size (or one budget) along the frontier is no law of compute.
    let distinct = |key: fn(&&Point) -> f64| on.iter().any(|p| key(p) != key(&on[0]));
    if !(distinct(|p| p.params) && distinct(|p| p.tokens)) {
        return None;
    }
    let flops = |p: &Point| 6.0 * p.params * p.tokens;
    let params: Vec<(f64, f64)> = on.iter().map(|p| (flops(p), p.params)).collect();
    let tokens: Vec<(f64, f64)> = on.iter().map(|p| (flops(p), p.tokens)).collect();
    Some(Frontier {
        runs: on.len(),
        params: log_linear(&params)?,
        tokens: log_linear(&tokens)?,
    })
}

/// One of Kaplan's laws, `L(x) = (scale / x)^exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kaplan {
    /// N_c or D_c.
    pub scale: f64,
    /// alpha_N or alpha_D.
    pub exponent: f64,
    /// The sizes (budgets) it was fitted over.
    pub groups: usize,
}

/// Kaplan's `L(N)` and `L(D)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KaplanLaws {
    /// Loss against parameters, over the best run of each size.
    pub params: Kaplan,
    /// Loss against tokens, over the best run of each token budget.
    pub tokens: Kaplan,
}

/// Kaplan's laws over the lowest loss in each twentieth of a decade of size and of tokens;
/// `None` when either has fewer than two groups.
pub fn kaplan(runs: &[Point]) -> Option<KaplanLaws> {
    Some(KaplanLaws {
        params: kaplan_law(runs, |p| p.params)?,
        tokens: kaplan_law(runs, |p| p.tokens)?,
    })
}

/// One of Kaplan's laws, of the variable `key` reads, over the lowest loss in each
/// twentieth of a decade of it; `None` with fewer than two groups, or when the loss does not
/// fall as the variable grows (no law of that form).
fn kaplan_law(runs: &[Point], key: fn(&Point) -> f64) -> Option<Kaplan> {
    let mut lowest: std::collections::BTreeMap<i64, (f64, f64)> = Default::default();
    for p in runs {
        let bin = (key(p).log10() * 20.0).round() as i64;
        let entry = lowest.entry(bin).or_insert((key(p), p.loss));
        if p.loss < entry.1 {
            *entry = (key(p), p.loss);
        }
    }
    let points: Vec<(f64, f64)> = lowest.into_values().collect();
    // ln L = alpha ln X_c - alpha ln X.
    let fit = log_linear(&points)?;
    let exponent = -fit.exponent;
    if exponent.is_nan() || exponent <= 0.0 {
        return None;
    }
    Some(Kaplan {
        scale: fit.coefficient.powf(1.0 / exponent),
        exponent,
        groups: points.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaling::EPOCH;

    /// A dense grid of runs from Epoch's law: the frontier follows the law's own optimum,
    /// whose exponents are beta / (alpha + beta) and alpha / (alpha + beta) (0.513, 0.487).
    #[test]
    fn the_frontier_of_runs_from_a_law_follows_its_optimum() {
        let mut runs = Vec::new();
        for i in 0..60 {
            let n = 10f64.powf(7.0 + 3.0 * i as f64 / 60.0);
            for j in 0..60 {
                let d = n * 10f64.powf(3.0 * j as f64 / 60.0);
                // Compute where the optimum lies well inside the grid of sizes and ratios.
                if (1e18..1e21).contains(&(6.0 * n * d)) {
                    runs.push(Point {
                        params: n,
                        tokens: d,
                        loss: EPOCH.loss(n, d),
                    });
                }
            }
        }
        let f = frontier(&runs).unwrap();
        let sum = EPOCH.alpha + EPOCH.beta;
        assert!((f.params.exponent - EPOCH.beta / sum).abs() < 0.03, "{f:?}");
        assert!(
            (f.tokens.exponent - EPOCH.alpha / sum).abs() < 0.03,
            "{f:?}"
        );
        assert!((f.params.exponent + f.tokens.exponent - 1.0).abs() < 1e-9);
        let c = 1e20;
        let opt = EPOCH.optimum(c);
        assert!(
            (f.params.at(c) / opt.params).ln().abs() < 0.3,
            "{f:?} {opt:?}"
        );
    }

    /// Runs of Kaplan's own form give its constants back (each size's best run the one of
    /// most data); a lone size is no law.
    #[test]
    fn kaplans_law_comes_back_from_runs_of_its_form() {
        let (nc, an) = (8.8e13, 0.076);
        let mut runs = Vec::new();
        for i in 0..8 {
            let n = 10f64.powf(6.0 + i as f64 * 0.5);
            for (d, worse) in [(1e12, 1.0), (1e9, 1.2)] {
                runs.push(Point {
                    params: n,
                    tokens: d,
                    loss: (nc / n).powf(an) * worse,
                });
            }
        }
        let k = kaplan_law(&runs, |p| p.params).unwrap();
        assert_eq!(k.groups, 8);
        assert!((k.exponent - an).abs() < 1e-6, "{k:?}");
        assert!((k.scale / nc - 1.0).abs() < 1e-4, "{k:?}");
        assert!(kaplan_law(&runs[..2], |p| p.params).is_none());
        // Loss rising with size: no law of Kaplan's form; one size: no frontier.
        let rising: Vec<Point> = runs
            .iter()
            .map(|p| Point {
                loss: 1.0 / p.loss,
                ..*p
            })
            .collect();
        assert!(kaplan_law(&rising, |p| p.params).is_none());
        let one_size: Vec<Point> = runs.iter().filter(|p| p.params == 1e6).copied().collect();
        assert!(frontier(&one_size).is_none());
    }
}
