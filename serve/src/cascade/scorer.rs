//! The scorer a served cascade consults after each stage: the probability that the stage's
//! answer is right, a logistic regression over the answer's [`features`](super::features),
//! as `ft cascade fit` wrote it into the cascade file (FrugalGPT, Chen, Zaharia and Zou 2023,
//! section 3, with a logistic regression where the paper fine-tunes a small model).

use serde::{Deserialize, Serialize};

/// A logistic-regression scorer of "is this stage's answer right" from a feature vector.
///
/// Features are standardised with the training split's mean and standard deviation, so the
/// L2 penalty treats every feature alike whatever its units, and the serialized model carries
/// everything needed to score a new item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    /// The features' names, in the order of every feature vector.
    pub features: Vec<String>,
    /// Each feature's mean on the training split.
    pub mean: Vec<f64>,
    /// Each feature's standard deviation on the training split; 1 for a constant feature.
    pub scale: Vec<f64>,
    /// One weight per standardised feature.
    pub weights: Vec<f64>,
    /// The intercept (the logit of an item whose features all sit at their means).
    pub bias: f64,
}

impl Logistic {
    /// The probability that the answer with features `x` is right:
    /// `sigmoid(bias + sum_j w_j (x_j - mean_j) / scale_j)`. A missing (NaN or infinite)
    /// feature counts as its mean, i.e. contributes nothing.
    pub fn score(&self, x: &[f64]) -> f64 {
        debug_assert_eq!(x.len(), self.weights.len(), "one value per feature");
        let mut logit = self.bias;
        for (j, &w) in self.weights.iter().enumerate() {
            let (Some(&v), Some(&mean), Some(&scale)) =
                (x.get(j), self.mean.get(j), self.scale.get(j))
            else {
                continue;
            };
            if v.is_finite() {
                logit += w * (v - mean) / scale;
            }
        }
        sigmoid(logit)
    }
}

/// `1 / (1 + e^-t)`, without overflow for large `|t|`.
pub fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}
