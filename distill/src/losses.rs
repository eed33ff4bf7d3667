//! Distillation losses over next-token distributions (Hinton et al. 2015, "Distilling the
//! Knowledge in a Neural Network", arXiv:1503.02531; Agarwal et al. 2024, "On-Policy
//! Distillation of Language Models", arXiv:2306.13649, as TRL's `GKDTrainer` computes it).
//!
//! For each trained position (rows of `[n, vocab]` logits, already restricted to the tokens the
//! labels mask in), with student S and teacher T softened by temperature t:
//!
//! loss = alpha * CE(S, labels) + (1 - alpha) * t^2 * D(T_t, S_t)
//!
//! where D is forward KL(T || S), reverse KL(S || T), or the generalized Jensen-Shannon
//! divergence beta * KL(T || M) + (1 - beta) * KL(S || M) with M = beta T + (1 - beta) S
//! (beta = 0 is forward KL and beta = 1 reverse KL, as in TRL). The t^2 factor keeps gradient
//! magnitudes comparable across temperatures. Every log-probability comes from a max-shifted
//! log-softmax, so large logits neither overflow nor lose precision.
//!
//! With an offline teacher only its top-k logits per position are known: both distributions
//! are then renormalized over those k tokens (the teacher's softmax over its k logits, the
//! student's probabilities at the same ids divided by their sum), so identical models still
//! give zero divergence. Losses are summed over rows; the caller divides by its token count.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Which divergence between teacher and student.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// KL(teacher || student): mode-covering, the classic distillation loss.
    ForwardKl,
    /// KL(student || teacher): mode-seeking.
    ReverseKl,
    /// Generalized JSD with mixture weight `beta` on the teacher.
    Jsd {
        /// In [0, 1].
        beta: f64,
    },
}

/// How to mix the distillation term with the label cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillLoss {
    /// The divergence.
    pub divergence: Divergence,
    /// Softening temperature (> 0).
    pub temperature: f64,
    /// Weight of the cross-entropy on labels; the divergence gets 1 - alpha.
    pub alpha: f64,
}

/// What the teacher gives for each row.
#[derive(Debug, Clone)]
pub enum TeacherLogits<B: Backend> {
    /// All logits `[n, vocab]` (online teacher).
    Full(Tensor<B, 2>),
    /// The teacher's k largest logits `[n, k]` and their token ids `[n, k]` (offline cache).
    TopK {
        /// `[n, k]`
        logits: Tensor<B, 2>,
        /// `[n, k]`
        ids: Tensor<B, 2, Int>,
    },
}

/// log(exp(a) + exp(b)) element-wise, stable.
fn log_add_exp<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let m = a.clone().max_pair(b.clone());
    m.clone() + ((a - m.clone()).exp() + (b - m).exp()).log()
}

/// sum over rows and columns of p (log p - log q), with p = exp(log_p).
fn kl<B: Backend>(log_p: Tensor<B, 2>, log_q: Tensor<B, 2>) -> Tensor<B, 1> {
    (log_p.clone().exp() * (log_p - log_q)).sum()
}

/// The divergence between two row-wise log-distributions (teacher, student), summed.
pub fn divergence<B: Backend>(
    d: Divergence,
    log_t: Tensor<B, 2>,
    log_s: Tensor<B, 2>,
) -> Tensor<B, 1> {
    match d {
        Divergence::ForwardKl => kl(log_t, log_s),
        Divergence::ReverseKl => kl(log_s, log_t),
        Divergence::Jsd { beta } if beta <= 0.0 => kl(log_t, log_s),
        Divergence::Jsd { beta } if beta >= 1.0 => kl(log_s, log_t),
        Divergence::Jsd { beta } => {
            // log M = log(beta T + (1 - beta) S)
            let log_m = log_add_exp(log_t.clone() + beta.ln(), log_s.clone() + (1.0 - beta).ln());
            kl(log_t, log_m.clone()) * beta + kl(log_s, log_m) * (1.0 - beta)
        }
    }
}

impl DistillLoss {
    /// The summed loss of `n` rows: student logits `[n, vocab]`, the teacher's, and the label
    /// ids `[n]`.
    pub fn forward<B: Backend>(
        &self,
        student: Tensor<B, 2>,
        teacher: TeacherLogits<B>,
        labels: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        let t = self.temperature;
        let ce = if self.alpha > 0.0 {
            let n = labels.dims()[0];
            let log_s = log_softmax(student.clone(), 1);
            let picked = log_s.gather(1, labels.reshape([n, 1]));
            Some(picked.sum().neg() * self.alpha)
        } else {
            None
        };
        let log_s_t = log_softmax(student / t, 1);
        let (log_teacher, log_student) = match teacher {
            TeacherLogits::Full(logits) => (log_softmax(logits / t, 1), log_s_t),
            TeacherLogits::TopK { logits, ids } => {
                // Both renormalized over the teacher's k tokens.
                let log_teacher = log_softmax(logits / t, 1);
                let at_k = log_s_t.gather(1, ids); // [n, k]
                let log_student = at_k.clone() - logsumexp_rows(at_k);
                (log_teacher, log_student)
            }
        };
        let kd =
            divergence(self.divergence, log_teacher, log_student) * ((1.0 - self.alpha) * t * t);
        match ce {
            Some(ce) => ce + kd,
            None => kd,
        }
    }
}

/// Row-wise log-sum-exp, `[n, k]` -> `[n, 1]`.
fn logsumexp_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let m = x.clone().max_dim(1);
    m.clone() + (x - m).exp().sum_dim(1).log()
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{ElementConversion, TensorData};

    use super::*;

    type B = NdArray<f64>;

    fn t2(rows: &[&[f64]]) -> Tensor<B, 2> {
        let cols = rows[0].len();
        let data: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(
            TensorData::new(data, [rows.len(), cols]),
            &Default::default(),
        )
    }

    fn value(t: Tensor<B, 1>) -> f64 {
        t.into_scalar().elem()
    }

    fn labels(ids: &[i64]) -> Tensor<B, 1, Int> {
        Tensor::from_data(
            TensorData::new(ids.to_vec(), [ids.len()]),
            &Default::default(),
        )
    }

    const ALL: [Divergence; 4] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Jsd { beta: 0.1 },
    ];

    #[test]
    fn identical_distributions_diverge_by_zero() {
        let logits = t2(&[&[1.0, 2.0, -1.0, 0.5], &[300.0, -200.0, 299.0, 0.0]]);
        for d in ALL {
            let loss = DistillLoss {
                divergence: d,
                temperature: 2.0,
                alpha: 0.0,
            };
            let v = value(loss.forward(
                logits.clone(),
                TeacherLogits::Full(logits.clone()),
                labels(&[0, 0]),
            ));
            assert!(v.abs() < 1e-12, "{d:?}: {v}");
        }
    }

    #[test]
    fn kl_matches_a_hand_computation_and_scales_by_t_squared() {
        // Teacher p = softmax([0, ln 3]) = [1/4, 3/4]; student q = [1/2, 1/2].
        let teacher = t2(&[&[0.0, 3f64.ln()]]);
        let student = t2(&[&[0.0, 0.0]]);
        let forward = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        let reverse = 0.5 * (2.0f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
        let at = |d, t: f64| {
            let loss = DistillLoss {
                divergence: d,
                temperature: t,
                alpha: 0.0,
            };
            value(loss.forward(
                student.clone() * t,
                TeacherLogits::Full(teacher.clone() * t),
                labels(&[1]),
            ))
        };
        assert!((at(Divergence::ForwardKl, 1.0) - forward).abs() < 1e-12);
        assert!((at(Divergence::ReverseKl, 1.0) - reverse).abs() < 1e-12);
        // Logits scaled by t and softened by t give the same distributions: only t^2 remains.
        assert!((at(Divergence::ForwardKl, 3.0) - 9.0 * forward).abs() < 1e-10);
        // JSD(beta = 0.5): M = [3/8, 5/8].
        let m = [0.375f64, 0.625];
        let jsd = 0.5 * (0.25 * (0.25 / m[0]).ln() + 0.75 * (0.75 / m[1]).ln())
            + 0.5 * (0.5 * (0.5 / m[0]).ln() + 0.5 * (0.5 / m[1]).ln());
        assert!((at(Divergence::Jsd { beta: 0.5 }, 1.0) - jsd).abs() < 1e-12);
        // beta = 0 and 1 are the two KLs.
        assert!((at(Divergence::Jsd { beta: 0.0 }, 1.0) - forward).abs() < 1e-12);
        assert!((at(Divergence::Jsd { beta: 1.0 }, 1.0) - reverse).abs() < 1e-12);
    }

    #[test]
    fn alpha_mixes_in_the_label_cross_entropy() {
        let student = t2(&[&[0.0, 0.0, 0.0, 0.0]]);
        let loss = DistillLoss {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
        };
        let ce = value(loss.forward(
            student.clone(),
            TeacherLogits::Full(t2(&[&[5.0, 0.0, 0.0, 0.0]])),
            labels(&[2]),
        ));
        assert!(
            (ce - 4f64.ln()).abs() < 1e-12,
            "CE of a uniform 4-way guess is ln 4"
        );
    }

    #[test]
    fn top_k_renormalizes_both_sides() {
        // Teacher [2, 1, -50, -50]: its top-2 ids [0, 1]. Student [0, 1, 3, 3].
        let student = t2(&[&[0.0, 1.0, 3.0, 3.0]]);
        let topk = TeacherLogits::TopK {
            logits: t2(&[&[2.0, 1.0]]),
            ids: Tensor::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &Default::default()),
        };
        let loss = DistillLoss {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 0.0,
        };
        let got = value(loss.forward(student, topk, labels(&[0])));
        // p over {0, 1} = softmax([2, 1]); q renormalized over {0, 1} = softmax([0, 1]).
        let p = [
            1.0 / (1.0 + (-1f64).exp()),
            (-1f64).exp() / (1.0 + (-1f64).exp()),
        ];
        let q = [1.0 / (1.0 + 1f64.exp()), 1f64.exp() / (1.0 + 1f64.exp())];
        let expected = p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // k = vocab equals the full loss.
        let full_teacher = t2(&[&[2.0, 1.0, -50.0, -50.0]]);
        let s = t2(&[&[0.0, 1.0, 3.0, 3.0]]);
        let all = TeacherLogits::TopK {
            logits: full_teacher.clone(),
            ids: Tensor::from_data(
                TensorData::new(vec![0i64, 1, 2, 3], [1, 4]),
                &Default::default(),
            ),
        };
        let a = value(loss.forward(s.clone(), all, labels(&[0])));
        let b = value(loss.forward(s, TeacherLogits::Full(full_teacher), labels(&[0])));
        assert!((a - b).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        type A = Autodiff<B>;
        let device = Default::default();
        let s: Vec<f64> = (0..12)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.7)
            .collect();
        let teacher: Vec<f64> = (0..12).map(|i| ((i * 53 % 7) as f64 - 3.0) * 1.3).collect();
        for d in ALL {
            let loss = DistillLoss {
                divergence: d,
                temperature: 1.7,
                alpha: 0.3,
            };
            let f = |x: &[f64]| -> Tensor<A, 1> {
                let st = Tensor::<A, 2>::from_data(TensorData::new(x.to_vec(), [3, 4]), &device)
                    .require_grad();
                let tt =
                    Tensor::<A, 2>::from_data(TensorData::new(teacher.clone(), [3, 4]), &device);
                let l =
                    Tensor::<A, 1, Int>::from_data(TensorData::new(vec![1i64, 3, 0], [3]), &device);
                loss.forward(st, TeacherLogits::Full(tt), l)
            };
            let st = Tensor::<A, 2>::from_data(TensorData::new(s.clone(), [3, 4]), &device)
                .require_grad();
            let tt = Tensor::<A, 2>::from_data(TensorData::new(teacher.clone(), [3, 4]), &device);
            let l = Tensor::<A, 1, Int>::from_data(TensorData::new(vec![1i64, 3, 0], [3]), &device);
            let grads = loss
                .forward(st.clone(), TeacherLogits::Full(tt), l)
                .backward();
            let g: Vec<f64> = st
                .grad(&grads)
                .unwrap()
                .into_data()
                .convert::<f64>()
                .to_vec()
                .unwrap();
            for i in 0..12 {
                let eps = 1e-4;
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += eps;
                down[i] -= eps;
                let fd = (f(&up).into_scalar().elem::<f64>()
                    - f(&down).into_scalar().elem::<f64>())
                    / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-5 + 1e-4 * g[i].abs(),
                    "{d:?} [{i}]: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }
}
