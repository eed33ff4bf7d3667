//! The distillation loss of [`crate::losses`] on rows of logits in host memory, its gradient
//! written out, as the host training step's head loss ([`OnlineTeacher`]): the student's
//! logits at the predicting rows come from the step, the teacher's from its own forward over
//! the same tokens, a chunk of rows at a time.
//!
//! For one row with student logits s, teacher logits t, label y and temperature T, with
//! ls = log_softmax(s / T), lt = log_softmax(t / T), ps = exp(ls), pt = exp(lt):
//!
//! loss = alpha * (lse(s) - s[y]) + (1 - alpha) * T^2 * D
//!
//! and ds = alpha * (softmax(s) - onehot(y)) + (1 - alpha) * T * dD/d(s / T), where, for a
//! divergence whose gradient with respect to the student's probabilities is g,
//! dD/d(s / T) = ps * (g - sum(ps * g)):
//! - forward KL(pt || ps): dD/d(s / T) = ps - pt;
//! - reverse KL(ps || pt): g = ls - lt (+1, which cancels);
//! - generalized JSD with lm = log(beta pt + (1 - beta) ps): g = (1 - beta) (ls - lm).

use std::ops::Range;

use ft_model::forward::train::{HeadLoss, TargetLogits};
use rayon::prelude::*;

use crate::losses::{DistillLoss, Divergence};

/// The loss against a teacher run online over the step's tokens.
pub struct OnlineTeacher<'a> {
    /// The teacher's logits at the same predicting rows.
    pub teacher: TargetLogits<'a>,
    /// How the divergence and the labels mix.
    pub loss: DistillLoss,
}

impl HeadLoss for OnlineTeacher<'_> {
    fn rows(
        &self,
        rows: Range<usize>,
        logits: &mut [f32],
        targets: &[u32],
        scale: f32,
    ) -> Vec<f64> {
        let vocab = self.teacher.vocab();
        let mut teacher = vec![0.0; rows.len() * vocab];
        self.teacher.rows(rows, &mut teacher);
        logits
            .par_chunks_mut(vocab)
            .zip(teacher.par_chunks(vocab))
            .zip(targets.par_iter())
            .map(|((s, t), &y)| self.loss.row(s, t, y, scale))
            .collect()
    }
}

/// log_softmax(x / temperature) into `out`.
fn log_softmax(x: &[f32], temperature: f32, out: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) / temperature;
    let sum: f64 = x
        .iter()
        .map(|&v| f64::from((v / temperature - max).exp()))
        .sum();
    let lse = max + sum.ln() as f32;
    out.iter_mut()
        .zip(x)
        .for_each(|(o, &v)| *o = v / temperature - lse);
}

impl DistillLoss {
    /// The loss of one row (student logits `s`, teacher logits `t`, label `y`); `s` is
    /// overwritten by the gradient of `scale` times it.
    pub fn row(&self, s: &mut [f32], t: &[f32], y: u32, scale: f32) -> f64 {
        let (alpha, temperature) = (self.alpha as f32, self.temperature as f32);
        let n = s.len();
        let mut ls = vec![0.0; n];
        let mut loss = 0.0;
        // The label part: alpha * (softmax(s) - onehot), kept in `ce`.
        let ce = (alpha > 0.0).then(|| {
            let mut ce = vec![0.0; n];
            log_softmax(s, 1.0, &mut ce);
            loss += f64::from(alpha) * -f64::from(ce[y as usize]);
            ce.iter_mut().for_each(|v| *v = alpha * v.exp());
            ce[y as usize] -= alpha;
            ce
        });
        if alpha < 1.0 {
            let mut lt = vec![0.0; n];
            log_softmax(s, temperature, &mut ls);
            log_softmax(t, temperature, &mut lt);
            let (d, mut dz) = divergence(self.divergence, &ls, &lt);
            let factor = (1.0 - alpha) * temperature;
            loss += f64::from((1.0 - alpha) * temperature * temperature) * d;
            dz.iter_mut().for_each(|v| *v *= factor);
            ls = dz;
        } else {
            ls.fill(0.0);
        }
        if let Some(ce) = ce {
            ls.iter_mut().zip(&ce).for_each(|(g, c)| *g += c);
        }
        s.iter_mut().zip(&ls).for_each(|(out, g)| *out = scale * g);
        loss
    }
}

/// The divergence between the row distributions `ls` (student) and `lt` (teacher), as log
/// probabilities, and its gradient with respect to the student's tempered logits.
fn divergence(d: Divergence, ls: &[f32], lt: &[f32]) -> (f64, Vec<f32>) {
    let forward = || {
        let kl: f64 = lt
            .iter()
            .zip(ls)
            .map(|(&t, &s)| f64::from(t.exp() * (t - s)))
            .sum();
        let dz = ls
            .iter()
            .zip(lt)
            .map(|(&s, &t)| s.exp() - t.exp())
            .collect();
        (kl, dz)
    };
    // ps * (g - sum(ps * g)), and sum(ps * g) itself.
    let through_softmax = |g: Vec<f32>| {
        let mean: f64 = ls
            .iter()
            .zip(&g)
            .map(|(&s, &g)| f64::from(s.exp() * g))
            .sum();
        let dz = ls
            .iter()
            .zip(&g)
            .map(|(&s, &g)| s.exp() * (g - mean as f32))
            .collect();
        (mean, dz)
    };
    match d {
        Divergence::ForwardKl => forward(),
        Divergence::Jsd { beta } if beta <= 0.0 => forward(),
        Divergence::ReverseKl => through_softmax(ls.iter().zip(lt).map(|(s, t)| s - t).collect()),
        Divergence::Jsd { beta } if beta >= 1.0 => {
            through_softmax(ls.iter().zip(lt).map(|(s, t)| s - t).collect())
        }
        Divergence::Jsd { beta } => {
            let (lb, lb1) = (beta.ln() as f32, (1.0 - beta).ln() as f32);
            let lm: Vec<f32> = ls
                .iter()
                .zip(lt)
                .map(|(&s, &t)| {
                    let (a, b) = (t + lb, s + lb1);
                    let m = a.max(b);
                    m + ((a - m).exp() + (b - m).exp()).ln()
                })
                .collect();
            let d: f64 = ls
                .iter()
                .zip(lt)
                .zip(&lm)
                .map(|((&s, &t), &m)| {
                    beta * f64::from(t.exp() * (t - m))
                        + (1.0 - beta) * f64::from(s.exp() * (s - m))
                })
                .sum();
            let g = ls
                .iter()
                .zip(&lm)
                .map(|(&s, &m)| (1.0 - beta) as f32 * (s - m))
                .collect();
            (d, through_softmax(g).1)
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::losses::TeacherLogits;

    type A = Autodiff<NdArray<f32>>;

    #[test]
    fn loss_and_gradient_equal_burns_autodiff_of_the_tensor_loss() {
        let (rows, vocab) = (3, 37);
        let wave = |i: usize, a: f32, b: f32| (i as f32 * a).sin() * b;
        let student: Vec<f32> = (0..rows * vocab).map(|i| wave(i, 0.37, 3.0)).collect();
        let teacher: Vec<f32> = (0..rows * vocab).map(|i| wave(i, 0.21, 4.0)).collect();
        let labels = [3u32, 36, 0];
        for divergence in [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.3 },
            Divergence::Jsd { beta: 0.0 },
            Divergence::Jsd { beta: 1.0 },
        ] {
            for alpha in [0.0, 0.4, 1.0] {
                let loss = DistillLoss {
                    divergence,
                    temperature: 2.0,
                    alpha,
                };
                let device = Default::default();
                let s = Tensor::<A, 2>::from_data(
                    TensorData::new(student.clone(), [rows, vocab]),
                    &device,
                )
                .require_grad();
                let t = Tensor::<A, 2>::from_data(
                    TensorData::new(teacher.clone(), [rows, vocab]),
                    &device,
                );
                let ids: Vec<i64> = labels.iter().map(|&y| i64::from(y)).collect();
                let y = Tensor::<A, 1, Int>::from_data(TensorData::new(ids, [rows]), &device);
                let want = loss.forward(s.clone(), TeacherLogits::Full(t), y) * 0.5;
                let value: f32 = want.clone().into_scalar();
                let grads = want.backward();
                let want_grad: Vec<f32> = s
                    .grad(&grads)
                    .expect("tracked")
                    .into_data()
                    // f32 or f64, whichever the test process made the device's default.
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32");
                let mut got = 0.0;
                let mut grad = student.clone();
                for ((row, t), &y) in grad
                    .chunks_mut(vocab)
                    .zip(teacher.chunks(vocab))
                    .zip(&labels)
                {
                    got += loss.row(row, t, y, 0.5);
                }
                let got = got * 0.5;
                assert!(
                    (got - f64::from(value)).abs() <= 1e-4 * f64::from(value.abs()).max(1e-3),
                    "{divergence:?} alpha {alpha}: {got} vs {value}"
                );
                let size = want_grad.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = grad
                    .iter()
                    .zip(&want_grad)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-4 * size.max(1e-6),
                    "{divergence:?} alpha {alpha}: gradient off by {diff} of {size}"
                );
            }
        }
    }
}
