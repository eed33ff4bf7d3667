//! The fit's three figures: loss against training compute, the runs with the fitted law's
//! curve for each of a few sizes and its compute-optimal envelope; the fitted loss of each run
//! against its observed loss; and parameters against compute with the law's iso-loss curves
//! and efficient frontier. Held-out runs (never fitted) are drawn apart, so the
//! figures show how well the law predicts them.

use std::path::Path;

use ft_eval::error::EvalError;
use ft_eval::plot::{Chart, Key, Overlay};

use super::fit::{Fit, Point, Runs};

fn key(what: &str, line: &str) -> Key {
    Key {
        model: what.into(),
        storage: String::new(),
        decoding: line.into(),
    }
}

/// The fitted runs and the held-out ones.
fn every_run(runs: &Runs) -> Vec<Point> {
    runs.fitted.iter().chain(&runs.held_out).copied().collect()
}

/// Every run with the legend entry it is drawn under.
fn labelled(runs: &Runs) -> impl Iterator<Item = (&Point, &'static str)> {
    let fitted = runs.fitted.iter().map(|p| (p, "runs fitted"));
    fitted.chain(runs.held_out.iter().map(|p| (p, "runs held out")))
}

/// Loss against log10 of training compute: the runs, the law at each of four sizes spread
/// over the runs' (dashed), and the law's compute-optimal loss (solid).
pub fn loss_against_compute(fit: &Fit, marked: &Runs) -> Overlay {
    let flops = |p: &Point| 6.0 * p.params * p.tokens;
    let runs = every_run(marked);
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
        points: labelled(marked)
            .map(|(p, what)| (flops(p).log10(), p.loss, key(what, "solid")))
            .collect(),
        series,
        headings: ["what", "", ""],
    }
}

/// Each run's loss under the fitted law against its observed loss, with the diagonal.
pub fn fitted_against_observed(fit: &Fit, marked: &Runs) -> Overlay {
    let (lo, hi) = every_run(marked)
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), p| {
            (a.min(p.loss), b.max(p.loss))
        });
    Overlay {
        title: "Fitted against observed loss".into(),
        x_desc: "observed loss".into(),
        y_desc: "fitted loss".into(),
        points: labelled(marked)
            .map(|(p, what)| (p.loss, fit.law.loss(p.params, p.tokens), key(what, "solid")))
            .collect(),
        series: vec![(key("fitted = observed", "solid"), vec![(lo, lo), (hi, hi)])],
        headings: ["what", "", ""],
    }
}

/// Parameters against training compute, both in log10, as Hoffmann et al.'s figure 4 draws
/// them: the runs, the law's iso-loss curves (each size and data that reach one loss) at
/// five losses spread over the runs', and its efficient frontier (the compute-optimal size).
pub fn iso_loss(fit: &Fit, marked: &Runs) -> Overlay {
    let law = fit.law;
    let runs = every_run(marked);
    let flops = |p: &Point| 6.0 * p.params * p.tokens;
    let (c_lo, c_hi) = runs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(flops(p).log10()), b.max(flops(p).log10()))
    });
    let (n_lo, n_hi) = runs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.params.log10()), b.max(p.params.log10()))
    });
    let (l_lo, l_hi) = runs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.loss), b.max(p.loss))
    });
    let mut series = vec![(
        key("law, efficient frontier", "solid"),
        (0..=100)
            .map(|i| {
                let c = c_lo - 0.5 + (c_hi - c_lo + 1.0) * i as f64 / 100.0;
                (c, law.optimum(10f64.powf(c)).params.log10())
            })
            .collect(),
    )];
    for i in 0..5 {
        let loss = l_lo + (l_hi - l_lo) * i as f64 / 4.0;
        // Along the curve N runs over the sizes; D is what brings N to the loss.
        let curve: Vec<(f64, f64)> = (0..=200)
            .filter_map(|j| {
                let n = 10f64.powf(n_lo - 1.0 + (n_hi - n_lo + 2.0) * j as f64 / 200.0);
                let spare = loss - law.e - law.a / n.powf(law.alpha);
                let d = (law.b / spare).powf(1.0 / law.beta);
                (spare > 0.0 && d.is_finite()).then(|| ((6.0 * n * d).log10(), n.log10()))
            })
            .collect();
        series.push((key(&format!("law, loss {loss:.2}"), "per loss"), curve));
    }
    Overlay {
        title: "Iso-loss curves and the efficient frontier".into(),
        x_desc: "log10 training FLOPs (6ND)".into(),
        y_desc: "log10 parameters".into(),
        points: labelled(marked)
            .map(|(p, what)| (flops(p).log10(), p.params.log10(), key(what, "solid")))
            .collect(),
        series,
        headings: ["what", "", ""],
    }
}

/// Writes the three figures into `dir` as `loss-against-compute`, `fitted-against-observed`
/// and `iso-loss`, each as SVG and PNG.
pub fn save(fit: &Fit, runs: &Runs, dir: &Path) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    loss_against_compute(fit, runs).save(&dir.join("loss-against-compute"))?;
    fitted_against_observed(fit, runs).save(&dir.join("fitted-against-observed"))?;
    iso_loss(fit, runs).save(&dir.join("iso-loss"))
}
