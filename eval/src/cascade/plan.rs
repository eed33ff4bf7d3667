//! A cascade fitted to a development split and measured on the held-out one, as FrugalGPT
//! does: each stage's scorer is a logistic regression of "this answer is right" on its
//! features; the stages kept and their thresholds are those of highest development accuracy
//! within the budget, searched on scores each example got from a scorer fitted without it
//! (cross-fitting, so thresholds are not tuned on scores the scorer has seen); and the
//! accuracy-against-cost curve is that search at every budget, measured on held-out examples.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cascade::collect::StageOutcomes;
use crate::cascade::config::{Cascade, Fit};
use ft_serve::cascade::features::NAMES;

use crate::cascade::scorer::{self, out_of_fold};
use crate::cascade::search::{search, simulate, Plan, Table};
use crate::error::{write_atomic, EvalError};
use crate::plot::{Chart, Key, Overlay};

/// Folds of the cross-fitting.
pub const FOLDS: usize = 5;
/// The seed of the folds' shuffle.
pub const SEED: u64 = 0xF6A1;
/// L2 penalty on the scorers' weights (standardized features).
pub const L2: f64 = 1e-2;
/// Threshold candidates per stage: quantiles of the scores still in play.
pub const GRID: usize = 40;

/// A stage's features as rows (unknown as NaN, which the scorer reads as the mean) and
/// whether each answer was right.
fn examples(stage: &StageOutcomes) -> (Vec<Vec<f64>>, Vec<bool>) {
    stage
        .outcomes
        .iter()
        .map(|o| {
            (
                o.features.iter().map(|f| f.unwrap_or(f64::NAN)).collect(),
                o.right,
            )
        })
        .unzip()
}

fn names() -> Vec<String> {
    NAMES.iter().map(|n| n.to_string()).collect()
}

/// The search table of `stages` with `scores[stage][example]`.
fn table(stages: &[StageOutcomes], scores: &[Vec<f64>]) -> Table {
    let n = stages.iter().map(|s| s.outcomes.len()).min().unwrap_or(0);
    Table {
        right: (0..n)
            .map(|i| stages.iter().map(|s| s.outcomes[i].right).collect())
            .collect(),
        cost: (0..n)
            .map(|i| stages.iter().map(|s| s.outcomes[i].cost).collect())
            .collect(),
        score: (0..n)
            .map(|i| scores.iter().map(|s| s[i]).collect())
            .collect(),
    }
}

/// Each stage's cross-fitted scores on the development split.
fn dev_scores(dev: &[StageOutcomes]) -> Vec<Vec<f64>> {
    dev.iter()
        .map(|s| {
            let (x, y) = examples(s);
            out_of_fold(&names(), &x, &y, FOLDS, SEED, L2)
        })
        .collect()
}

/// `cascade` fitted on `dev` (its stages' outcomes on `task`'s development split with the
/// base `model`, in stage order) for a mean cost per request of at most `budget` USD.
pub fn fit(
    cascade: &Cascade,
    model: &str,
    task: &str,
    dev: &[StageOutcomes],
    budget: f64,
) -> Result<Cascade, EvalError> {
    let scores = dev_scores(dev);
    let plan = search(&table(dev, &scores), budget, GRID).ok_or_else(|| {
        let cheapest = dev
            .iter()
            .map(StageOutcomes::mean_cost)
            .fold(f64::INFINITY, f64::min);
        EvalError::Budget {
            budget_per_k: budget * 1e3,
            cheapest_per_k: cheapest * 1e3,
        }
    })?;
    let mut fitted = cascade.clone();
    for (i, (stage, outcomes)) in fitted.stages.iter_mut().zip(dev).enumerate() {
        let (x, y) = examples(outcomes);
        stage.scorer = Some(scorer::fit(&names(), &x, &y, L2));
        stage.threshold = plan
            .chain
            .iter()
            .position(|&c| c == i)
            .and_then(|l| plan.thresholds.get(l).copied());
    }
    fitted.fit = Some(Fit {
        model: model.to_string(),
        task: task.to_string(),
        dev_examples: dev.first().map_or(0, |s| s.outcomes.len()),
        budget_per_k: budget * 1e3,
        chain: plan
            .chain
            .iter()
            .map(|&i| cascade.stages[i].name.clone())
            .collect(),
        dev_accuracy: plan.accuracy,
        dev_cost_per_k: plan.cost * 1e3,
    });
    Ok(fitted)
}

/// One budget's cascade: what the search chose on the development split and what it did on
/// the held-out one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// The budget, USD per 1,000 requests.
    pub budget_per_k: f64,
    /// The stages kept.
    pub chain: Vec<String>,
    /// Their thresholds (all but the last).
    pub thresholds: Vec<f64>,
    /// Development accuracy.
    pub dev_accuracy: f64,
    /// Development cost, USD per 1,000 requests.
    pub dev_cost_per_k: f64,
    /// Held-out accuracy.
    pub accuracy: f64,
    /// Held-out cost, USD per 1,000 requests.
    pub cost_per_k: f64,
    /// Held-out examples each kept stage answered.
    pub answered_by: Vec<usize>,
}

/// A single stage on the held-out split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Single {
    /// The stage.
    pub stage: String,
    /// Held-out accuracy.
    pub accuracy: f64,
    /// Held-out cost, USD per 1,000 requests.
    pub cost_per_k: f64,
}

/// The accuracy-against-cost curve of a fitted cascade on a task's held-out split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    /// The task.
    pub task: String,
    /// Held-out examples.
    pub examples: usize,
    /// Each stage alone.
    pub singles: Vec<Single>,
    /// The search at each budget.
    pub points: Vec<Point>,
    /// The cascade as fitted (its file's chain and thresholds).
    pub fitted: Point,
}

/// Budgets from the cheapest stage's development cost to every stage's together, 12 steps
/// apart by equal ratios, and each stage's own cost: USD per request.
pub fn budgets(dev: &[StageOutcomes]) -> Vec<f64> {
    let costs: Vec<f64> = dev.iter().map(StageOutcomes::mean_cost).collect();
    let lo = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi: f64 = costs.iter().sum();
    let mut out: Vec<f64> = costs.clone();
    if lo > 0.0 && hi > lo {
        out.extend((0..=12).map(|k| lo * (hi / lo).powf(k as f64 / 12.0)));
    }
    out.sort_by(f64::total_cmp);
    out.dedup_by(|a, b| (*a - *b).abs() <= 1e-12 * b.abs().max(1e-300));
    out
}

/// `fitted` (its stages' scorers; `fit`, what its fit chose) measured on `test` at each of
/// `budgets` (USD per request), each budget's chain and thresholds searched on `dev`.
pub fn curve(
    fitted: &Cascade,
    fit: &Fit,
    dev: &[StageOutcomes],
    test: &[StageOutcomes],
    budgets: &[f64],
) -> Curve {
    let dev_table = table(dev, &dev_scores(dev));
    let test_scores: Vec<Vec<f64>> = fitted
        .stages
        .iter()
        .zip(test)
        .map(|(stage, outcomes)| {
            let (x, _) = examples(outcomes);
            x.iter()
                .map(|row| stage.scorer.as_ref().map_or(1.0, |s| s.score(row)))
                .collect()
        })
        .collect();
    let test_table = table(test, &test_scores);
    let point = |plan: &Plan, budget: f64| {
        let on_test = simulate(&plan.chain, &plan.thresholds, &test_table);
        Point {
            budget_per_k: budget * 1e3,
            chain: plan
                .chain
                .iter()
                .map(|&i| fitted.stages[i].name.clone())
                .collect(),
            thresholds: plan.thresholds.clone(),
            dev_accuracy: plan.accuracy,
            dev_cost_per_k: plan.cost * 1e3,
            accuracy: on_test.accuracy,
            cost_per_k: on_test.cost * 1e3,
            answered_by: on_test.answered_by,
        }
    };
    let points = budgets
        .iter()
        .filter_map(|&b| Some(point(&search(&dev_table, b, GRID)?, b)))
        .collect();
    let chain: Vec<usize> = fit
        .chain
        .iter()
        .filter_map(|name| fitted.stages.iter().position(|s| &s.name == name))
        .collect();
    let thresholds: Vec<f64> = chain[..chain.len().saturating_sub(1)]
        .iter()
        .map(|&i| fitted.stages[i].threshold.unwrap_or(f64::INFINITY))
        .collect();
    let fitted_plan = Plan {
        chain,
        thresholds,
        accuracy: fit.dev_accuracy,
        cost: fit.dev_cost_per_k / 1e3,
    };
    Curve {
        task: fit.task.clone(),
        examples: test.first().map_or(0, |s| s.outcomes.len()),
        singles: test
            .iter()
            .map(|s| Single {
                stage: s.stage.clone(),
                accuracy: s.accuracy(),
                cost_per_k: s.mean_cost() * 1e3,
            })
            .collect(),
        points,
        fitted: point(&fitted_plan, fit.budget_per_k / 1e3),
    }
}

impl Curve {
    /// The most accurate single stage (ties to the cheaper).
    pub fn best_single(&self) -> Option<&Single> {
        self.singles.iter().min_by(|a, b| {
            b.accuracy
                .total_cmp(&a.accuracy)
                .then(a.cost_per_k.total_cmp(&b.cost_per_k))
        })
    }

    /// The cheapest budget's point within `tolerance` of the best single stage's accuracy.
    pub fn cheapest_match(&self, tolerance: f64) -> Option<&Point> {
        let best = self.best_single()?;
        self.points
            .iter()
            .filter(|p| p.accuracy >= best.accuracy - tolerance)
            .min_by(|a, b| a.cost_per_k.total_cmp(&b.cost_per_k))
    }

    /// The curve as Markdown: each stage alone, the fitted cascade, every budget, and the
    /// cheapest cascade within a point of the best stage.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# Cascade on {} ({} held-out examples)\n\n| stage alone | accuracy | USD / 1k requests |\n|---|---|---|\n",
            self.task, self.examples
        );
        for s in &self.singles {
            let _ = writeln!(
                md,
                "| {} | {:.3} | {:.4} |",
                s.stage, s.accuracy, s.cost_per_k
            );
        }
        md += "\n| budget USD / 1k | stages | thresholds | dev accuracy | dev USD / 1k | accuracy | USD / 1k | answered by |\n|---|---|---|---|---|---|---|---|\n";
        for (label, p) in self
            .points
            .iter()
            .map(|p| (format!("{:.4}", p.budget_per_k), p))
            .chain(std::iter::once((
                format!("{:.4} (fitted)", self.fitted.budget_per_k),
                &self.fitted,
            )))
        {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {:.3} | {:.4} | {:.3} | {:.4} | {} |",
                p.chain.join(" > "),
                p.thresholds
                    .iter()
                    .map(|t| format!("{t:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                p.dev_accuracy,
                p.dev_cost_per_k,
                p.accuracy,
                p.cost_per_k,
                p.answered_by
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" / "),
            );
        }
        if let (Some(best), Some(m)) = (self.best_single(), self.cheapest_match(0.01)) {
            let _ = writeln!(
                md,
                "\nBest single stage: {} at {:.3} for {:.4} USD / 1k requests. The cheapest cascade within 1 point of it: {} at {:.3} for {:.4} USD / 1k ({:.0}% of its cost).",
                best.stage,
                best.accuracy,
                best.cost_per_k,
                m.chain.join(" > "),
                m.accuracy,
                m.cost_per_k,
                100.0 * m.cost_per_k / best.cost_per_k.max(1e-300)
            );
        }
        md
    }

    /// Accuracy against cost: each stage alone as a point, the cascade at every budget as a
    /// line, the fitted cascade as a point.
    pub fn plot(&self) -> Overlay {
        let key = |what: &str| Key {
            model: what.to_string(),
            ..Key::default()
        };
        let mut line: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|p| (p.cost_per_k, p.accuracy))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        Overlay {
            title: format!("{}: held-out accuracy against cost", self.task),
            x_desc: "USD per 1,000 requests".into(),
            y_desc: "accuracy".into(),
            points: self
                .singles
                .iter()
                .map(|s| (s.cost_per_k, s.accuracy, key(&s.stage)))
                .chain(std::iter::once((
                    self.fitted.cost_per_k,
                    self.fitted.accuracy,
                    key("cascade as fitted"),
                )))
                .collect(),
            series: vec![(key("cascade, every budget"), line)],
            headings: ["what", "", ""],
        }
    }

    /// Writes `curve.md`, `curve.json` and the plot (`curve.svg`, `curve.png`) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let md = dir.join("curve.md");
        write_atomic(&md, self.markdown().as_bytes())?;
        let json = dir.join("curve.json");
        write_atomic(&json, serde_json::to_string_pretty(self)?.as_bytes())?;
        let plot = dir.join("curve");
        self.plot().save(&plot)?;
        Ok(vec![
            md,
            json,
            plot.with_extension("svg"),
            plot.with_extension("png"),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::collect::Outcome;
    use crate::cascade::config::{Stage, StageDecoding};
    use crate::measure::Decoding;

    /// A cheap stage right on every other example, its first feature (mean log-probability)
    /// high exactly where it is right, and a stage ten times dearer that is always right.
    fn outcomes(n: usize) -> Vec<StageOutcomes> {
        let cheap = (0..n)
            .map(|i| {
                let right = i % 2 == 0;
                let confidence = if right { -0.1 } else { -2.0 } - 0.01 * (i % 7) as f64;
                Outcome {
                    answer: String::new(),
                    right,
                    features: std::iter::once(Some(confidence))
                        .chain((1..NAMES.len()).map(|_| Some(1.0)))
                        .collect(),
                    cost: 1e-6,
                    error: None,
                }
            })
            .collect();
        let dear = (0..n)
            .map(|_| Outcome {
                answer: String::new(),
                right: true,
                features: vec![None; NAMES.len()],
                cost: 1e-5,
                error: None,
            })
            .collect();
        vec![
            StageOutcomes {
                stage: "cheap".into(),
                outcomes: cheap,
            },
            StageOutcomes {
                stage: "dear".into(),
                outcomes: dear,
            },
        ]
    }

    fn stage(name: &str) -> Stage {
        Stage {
            name: name.into(),
            adapter: None,
            quant: None,
            url: None,
            model: None,
            api_key_env: None,
            decoding: StageDecoding::One(Decoding::Greedy),
            shots: 0,
            price: None,
            threshold: None,
            scorer: None,
        }
    }

    #[test]
    fn a_learned_scorer_sends_only_the_doubtful_examples_on() {
        let cascade = Cascade {
            stages: vec![stage("cheap"), stage("dear")],
            fit: None,
        };
        let dev = outcomes(60);
        // Half the dear stage's cost: only a cascade that asks it about half the examples fits.
        let fitted = fit(&cascade, "m", "t", &dev, 6e-6).unwrap();
        let f = fitted.fit.as_ref().unwrap();
        assert_eq!(f.chain, ["cheap", "dear"]);
        assert_eq!(f.dev_accuracy, 1.0);
        assert!(f.dev_cost_per_k <= 6e-3 + 1e-12, "{}", f.dev_cost_per_k);
        assert!(fitted.stages[0].threshold.is_some() && fitted.stages[1].threshold.is_none());

        let test = outcomes(40);
        let c = curve(&fitted, f, &dev, &test, &budgets(&dev));
        assert_eq!(c.singles.len(), 2);
        assert_eq!(c.fitted.accuracy, 1.0);
        assert_eq!(c.fitted.answered_by, [20, 20]);
        let best = c.best_single().unwrap();
        assert_eq!(best.stage, "dear");
        let m = c.cheapest_match(0.01).unwrap();
        assert!(
            m.cost_per_k <= 0.6 * best.cost_per_k,
            "{m:?} against {best:?}"
        );
        assert!(c
            .markdown()
            .contains("The cheapest cascade within 1 point of it: cheap > dear"));
        // Every budget from the cheapest stage alone to both together is drawn.
        assert_eq!(c.points.len(), budgets(&dev).len());
        assert!(
            fit(&cascade, "m", "t", &dev, 1e-7).is_err(),
            "below the cheap stage"
        );
    }
}
