//! Scaling laws: Chinchilla's parametric law `L(N, D) = E + A / N^alpha + B / D^beta` (Hoffmann
//! et al. 2022, approach 3), fitted to runs ([`fit`]) as Epoch AI's replication fits it
//! (Besiroglu et al. 2024); approach 1's frontier and Kaplan's power laws ([`power`]); and the
//! compute-optimal size and data the law implies ([`Law::optimum`]), with inference counted
//! ([`Law::optimum_with_inference`]); the runs themselves, models trained from scratch over a
//! grid ([`sweep`]), with their parameters and FLOPs counted ([`count`]).

pub mod count;
pub mod fit;
mod lbfgs;
pub mod plot;
pub mod power;
pub mod sweep;

use serde::{Deserialize, Serialize};

/// A fitted or published law: loss in nats per token, N parameters, D training tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Law {
    /// The irreducible loss.
    #[serde(rename = "E")]
    pub e: f64,
    /// The size term's scale.
    #[serde(rename = "A")]
    pub a: f64,
    /// The data term's scale.
    #[serde(rename = "B")]
    pub b: f64,
    /// The size term's exponent.
    pub alpha: f64,
    /// The data term's exponent.
    pub beta: f64,
}

/// Hoffmann et al.'s published fit (their approach 3).
pub const CHINCHILLA: Law = Law {
    e: 1.69,
    a: 406.4,
    b: 410.7,
    alpha: 0.34,
    beta: 0.28,
};

/// Epoch AI's refit of the same data (Besiroglu et al. 2024, table 1).
pub const EPOCH: Law = Law {
    e: 1.8172,
    a: 482.01,
    b: 2085.43,
    alpha: 0.3478,
    beta: 0.3658,
};

/// A model size and a token budget, with what they cost and what they predict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Allocation {
    /// Parameters N.
    pub params: f64,
    /// Training tokens D.
    pub tokens: f64,
    /// Training compute, 6 N D FLOPs.
    pub flops: f64,
    /// The law's loss.
    pub loss: f64,
}

impl Law {
    /// The predicted loss of `n` parameters trained on `d` tokens.
    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }

    /// `G = (alpha A / (beta B))^(1 / (alpha + beta))`: at the optimum for compute C,
    /// N = G (C/6)^(beta / (alpha + beta)) and D = (C/6)^(alpha / (alpha + beta)) / G.
    fn g(&self) -> f64 {
        (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta))
    }

    /// The size and data that minimise the loss for `flops` of training compute (C = 6ND).
    pub fn optimum(&self, flops: f64) -> Allocation {
        let s = flops / 6.0;
        let sum = self.alpha + self.beta;
        let params = self.g() * s.powf(self.beta / sum);
        let tokens = s.powf(self.alpha / sum) / self.g();
        self.allocation(params, tokens)
    }

    /// The compute-optimal run of `params` parameters: the tokens for which that size is the
    /// optimum.
    pub fn optimum_for_params(&self, params: f64) -> Allocation {
        let s = (params / self.g()).powf((self.alpha + self.beta) / self.beta);
        self.allocation(params, s / params)
    }

    /// The compute-optimal run on `tokens` tokens: the size for which that budget is optimal.
    pub fn optimum_for_tokens(&self, tokens: f64) -> Allocation {
        let s = (tokens * self.g()).powf((self.alpha + self.beta) / self.alpha);
        self.allocation(s / tokens, tokens)
    }

    /// The run that reaches `loss` at the least training plus inference compute when the
    /// model then serves `inference_tokens` tokens at 2N FLOPs a token (Sardana et al. 2024,
    /// "Beyond Chinchilla-Optimal"): smaller than the compute-optimal model of that loss and
    /// trained on more tokens. `None` when the loss is at or below E, which no run reaches.
    pub fn optimum_with_inference(&self, loss: f64, inference_tokens: f64) -> Option<Allocation> {
        let spare = loss - self.e;
        if !(spare > 0.0 && inference_tokens >= 0.0) {
            return None;
        }
        // The tokens that bring N parameters to `loss`: finite only past N_min, where the
        // size term alone leaves nothing for data.
        let tokens =
            |n: f64| (self.b / (spare - self.a / n.powf(self.alpha))).powf(1.0 / self.beta);
        let total = |u: f64| {
            let n = u.exp();
            let d = tokens(n);
            if d.is_finite() && d > 0.0 {
                6.0 * n * d + 2.0 * n * inference_tokens
            } else {
                f64::INFINITY
            }
        };
        // The optimum lies between N_min, below which no data reaches the loss, and the
        // compute-optimal size of that loss, N^alpha = A (alpha + beta) / (beta spare):
        // serving only adds cost that grows with N. A grid over that bracket, then a
        // golden-section search around its best point.
        let low = (self.a / spare).powf(1.0 / self.alpha).ln();
        let high = (self.a * (self.alpha + self.beta) / (self.beta * spare)).ln() / self.alpha;
        let steps = 3000;
        let at = |i: usize| low + (high - low) * (1e-9 + i as f64 / steps as f64);
        let best = (0..=steps).min_by(|&i, &j| total(at(i)).total_cmp(&total(at(j))))?;
        let (mut a, mut b) = (at(best.saturating_sub(1)), at((best + 1).min(steps)));
        let phi = (5f64.sqrt() - 1.0) / 2.0;
        for _ in 0..100 {
            let (c, d) = (b - phi * (b - a), a + phi * (b - a));
            if total(c) < total(d) {
                b = d;
            } else {
                a = c;
            }
        }
        let n = ((a + b) / 2.0).exp();
        Some(self.allocation(n, tokens(n)))
    }

    fn allocation(&self, params: f64, tokens: f64) -> Allocation {
        Allocation {
            params,
            tokens,
            flops: 6.0 * params * tokens,
            loss: self.loss(params, tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimum against a search over sizes at the same compute, on a fine log grid.
    #[test]
    fn the_closed_form_optimum_is_the_grid_search_minimum() {
        for law in [CHINCHILLA, EPOCH] {
            for flops in [1e18, 5.76e23, 1e25] {
                let best = (0..20_000)
                    .map(|i| 10f64.powf(6.0 + 8.0 * i as f64 / 20_000.0))
                    .map(|n| (n, law.loss(n, flops / (6.0 * n))))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap();
                let opt = law.optimum(flops);
                assert!(
                    (opt.params / best.0 - 1.0).abs() < 2e-3,
                    "{law:?} {flops}: {opt:?} vs {best:?}"
                );
                assert!(opt.loss <= best.1 + 1e-12);
                assert!((opt.flops / flops - 1.0).abs() < 1e-12);
                let by_n = law.optimum_for_params(opt.params);
                let by_d = law.optimum_for_tokens(opt.tokens);
                assert!((by_n.tokens / opt.tokens - 1.0).abs() < 1e-9);
                assert!((by_d.params / opt.params - 1.0).abs() < 1e-9);
            }
        }
    }

    /// With no inference the least-compute run of a loss is the compute-optimal one; with
    /// inference it is smaller and trained longer, at the same loss, and a search over sizes
    /// finds no cheaper one.
    #[test]
    fn serving_tokens_make_the_cheapest_run_of_a_loss_smaller_and_longer() {
        let chin = EPOCH.optimum(5.76e23);
        let alone = EPOCH.optimum_with_inference(chin.loss, 0.0).unwrap();
        assert!(
            (alone.params / chin.params - 1.0).abs() < 1e-4,
            "{alone:?} {chin:?}"
        );
        assert!((alone.tokens / chin.tokens - 1.0).abs() < 1e-4);
        let served = 2e13;
        let lean = EPOCH.optimum_with_inference(chin.loss, served).unwrap();
        assert!(
            lean.params < chin.params && lean.tokens > chin.tokens,
            "{lean:?}"
        );
        assert!((lean.loss - chin.loss).abs() < 1e-9);
        let cost = |a: &Allocation| a.flops + 2.0 * a.params * served;
        for i in 1..2000 {
            let n = lean.params * 10f64.powf(-1.0 + 2.0 * i as f64 / 2000.0);
            let spare = chin.loss - EPOCH.e - EPOCH.a / n.powf(EPOCH.alpha);
            if spare <= 0.0 {
                continue;
            }
            let d = (EPOCH.b / spare).powf(1.0 / EPOCH.beta);
            let other = 6.0 * n * d + 2.0 * n * served;
            assert!(
                other >= cost(&lean) * (1.0 - 1e-9),
                "{n}: {other} < {}",
                cost(&lean)
            );
        }
        assert_eq!(EPOCH.optimum_with_inference(EPOCH.e, 1.0), None);
    }

    #[test]
    fn epochs_law_gives_about_twenty_tokens_a_parameter() {
        let opt = EPOCH.optimum(5.76e23); // Chinchilla's own budget
        let ratio = opt.tokens / opt.params;
        assert!((15.0..30.0).contains(&ratio), "{ratio}");
    }
}
