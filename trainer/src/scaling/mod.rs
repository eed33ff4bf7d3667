//! Scaling laws: Chinchilla's parametric law `L(N, D) = E + A / N^alpha + B / D^beta` (Hoffmann
//! et al. 2022, approach 3), fitted to runs ([`fit`]) as Epoch AI's replication fits it
//! (Besiroglu et al. 2024), and the compute-optimal size and data it implies ([`Law::optimum`]).

pub mod fit;
mod lbfgs;

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

    #[test]
    fn epochs_law_gives_about_twenty_tokens_a_parameter() {
        let opt = EPOCH.optimum(5.76e23); // Chinchilla's own budget
        let ratio = opt.tokens / opt.params;
        assert!((15.0..30.0).contains(&ratio), "{ratio}");
    }
}
