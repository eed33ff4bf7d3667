//! The fit's two figures: loss against training compute, the runs with the fitted law's
//! curve for each of a few sizes and its compute-optimal envelope; and the fitted loss of
//! each run against its observed loss.

use std::path::Path;

use ft_eval::error::EvalError;
use ft_eval::plot::{Chart, Key, Overlay};

use super::fit::{Fit, Point};

fn key(what: &str, line: &str) -> Key {
    Key {
        model: what.into(),
        storage: String::new(),
        decoding: line.into(),
    }
}

/// Loss against log10 of training compute: the runs, the law at each of four sizes spread
/// over the runs' (dashed), and the law's compute-optimal loss (solid).
pub fn loss_against_compute(fit: &Fit, runs: &[Point]) -> Overlay {
    let flops = |p: &Point| 6.0 * p.params * p.tokens;
    let lo = runs.iter().map(flops).fold(f64::INFINITY, f64::min).log10();
    let hi = runs.iter().map(flops).fold(0.0, f64::max).log10();
    let grid: Vec<f64> = (0..=100)
        .map(|i| lo + (hi - lo) * i as f64 / 100.0)
        .collect();
    let law = fit.law;
    let mut series = vec![(
        key("law, compute-optimal", "solid"),
        grid.iter()
            .map(|&c| (c, law.optimum(10f64.powf(c)).loss))
            .collect(),
    )];
    let (n_lo, n_hi) = runs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.params), b.max(p.params))
    });
    for i in 0..4 {
        let n = 10f64.powf(n_lo.log10() + (n_hi / n_lo).log10() * i as f64 / 3.0);
        let curve = grid
            .iter()
            .map(|&c| (c, law.loss(n, 10f64.powf(c) / (6.0 * n))))
            .collect();
        series.push((key(&format!("law, N = {n:.1e}"), "per size"), curve));
    }
    Overlay {
        title: "Loss against training compute".into(),
        x_desc: "log10 training FLOPs (6ND)".into(),
        y_desc: "loss (nats per token)".into(),
        points: runs
            .iter()
            .map(|p| (flops(p).log10(), p.loss, key("runs", "solid")))
            .collect(),
        series,
        headings: ["what", "", ""],
    }
}

/// Each run's loss under the fitted law against its observed loss, with the diagonal.
pub fn fitted_against_observed(fit: &Fit, runs: &[Point]) -> Overlay {
    let (lo, hi) = runs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.loss), b.max(p.loss))
    });
    Overlay {
        title: "Fitted against observed loss".into(),
        x_desc: "observed loss".into(),
        y_desc: "fitted loss".into(),
        points: runs
            .iter()
            .map(|p| {
                (
                    p.loss,
                    fit.law.loss(p.params, p.tokens),
                    key("runs", "solid"),
                )
            })
            .collect(),
        series: vec![(key("fitted = observed", "solid"), vec![(lo, lo), (hi, hi)])],
        headings: ["what", "", ""],
    }
}

/// Writes both figures into `dir` as `loss-against-compute` and `fitted-against-observed`,
/// each as SVG and PNG.
pub fn save(fit: &Fit, runs: &[Point], dir: &Path) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    loss_against_compute(fit, runs).save(&dir.join("loss-against-compute"))?;
    fitted_against_observed(fit, runs).save(&dir.join("fitted-against-observed"))
}
