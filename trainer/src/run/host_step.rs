//! A run's steps on ft's host kernels ([`ft_model::forward::train`]): a padded batch cut to
//! what can change its loss, and the gradients (of the adapters on a frozen base, or of every
//! dense weight of a student trained in full) handed back as burn tensors keyed as the
//! autodiff path keys them, so clipping, AdamW, checkpoints and resume are the same whichever
//! engine ran the step. A distillation run brings its teacher, whose forward over the same
//! tokens runs on the same kernels and whose logits meet the student's in the loss
//! ([`ft_distill::OnlineTeacher`]).

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use ft_distill::{DistillLoss, OnlineTeacher};
use ft_model::forward::train::{Adapters, CrossEntropy, HeadLoss, HostTrainer, Tokens, Trained};
use ft_model::{LlamaForCausalLM, QuantBackend};

use super::loss::batch_nll;
use super::trainables::accumulate;
use crate::data::Batch;
use crate::error::{Result, TrainError};

/// The host trainer of a run.
pub(crate) struct HostStep<B: QuantBackend> {
    /// The frozen base's weights as the kernels read them (adapters train), or `None`: every
    /// dense weight trains, so the model is read afresh at each step.
    base: Option<HostTrainer<B>>,
    /// The online teacher and the loss against it (distillation).
    teacher: Option<(HostTrainer<B>, DistillLoss)>,
    device: B::Device,
}

impl<B: QuantBackend> HostStep<B> {
    /// The host step of `model`'s adapters on its frozen base, or `None` where its weights are
    /// not in host memory.
    pub fn adapters(model: &LlamaForCausalLM<B>) -> Option<Self> {
        Some(Self {
            base: Some(HostTrainer::new(model)?),
            teacher: None,
            device: model.device(),
        })
    }

    /// The host step of every dense weight of `model`, or `None` where its weights are not in
    /// host memory.
    pub fn everything(model: &LlamaForCausalLM<B>) -> Option<Self> {
        HostTrainer::new(model)?;
        Some(Self {
            base: None,
            teacher: None,
            device: model.device(),
        })
    }

    /// The same step trained toward `teacher`'s logits by `loss` (alpha = 1 needs no teacher
    /// and keeps none), or `None` where the teacher's weights are not in host memory.
    pub fn with_teacher(self, teacher: &LlamaForCausalLM<B>, loss: DistillLoss) -> Option<Self> {
        if loss.alpha >= 1.0 {
            return Some(self);
        }
        Some(Self {
            teacher: Some((HostTrainer::new(teacher)?, loss)),
            ..self
        })
    }

    /// The trainer of `model` as it is now: the base's, or one built on its current weights.
    fn trainer<'a>(
        &'a self,
        model: &LlamaForCausalLM<B>,
        fresh: &'a mut Option<HostTrainer<B>>,
    ) -> Result<&'a HostTrainer<B>> {
        if let Some(base) = &self.base {
            return Ok(base);
        }
        *fresh = HostTrainer::new(model);
        fresh.as_ref().ok_or_else(|| {
            TrainError::Invalid("the host step needs every weight in host memory".into())
        })
    }

    /// Adds the gradients of `scale` times the batch's summed loss with respect to what
    /// `model` trains to `grads` (keys `{module}.lora_A` / `.lora_B`, or the weights' HF
    /// names with vectors as `[1, n]`) and returns the summed loss: the labels' NLL, or the
    /// distillation loss against the teacher. `seed` draws the dropout masks.
    pub fn gradients<A>(
        &self,
        model: &LlamaForCausalLM<A>,
        batch: &Batch,
        scale: f64,
        seed: u64,
        grads: &mut BTreeMap<String, Tensor<B, 2>>,
    ) -> Result<f64>
    where
        A: AutodiffBackend<InnerBackend = B>,
    {
        let real = RealTokens::of(batch);
        let tokens = real.tokens();
        let valid = model.valid();
        let mut fresh = None;
        let trainer = self.trainer(&valid, &mut fresh)?;
        let online;
        let loss: &dyn HeadLoss = match &self.teacher {
            Some((teacher, loss)) => {
                online = OnlineTeacher {
                    teacher: teacher.target_logits(&tokens)?,
                    loss: *loss,
                };
                &online
            }
            None => &CrossEntropy,
        };
        let trained = match self.base {
            Some(_) => Trained::Adapters,
            None => Trained::Everything,
        };
        let step = trainer.step(
            &Adapters::of(&valid),
            &tokens,
            loss,
            trained,
            scale as f32,
            seed,
        )?;
        let shapes: BTreeMap<String, ([usize; 2], [usize; 2])> = model
            .linears()
            .into_iter()
            .filter_map(|(name, l)| {
                let lora = l.lora.as_ref()?;
                Some((name, (lora.lora_a.dims(), lora.lora_b.dims())))
            })
            .collect();
        let device = &self.device;
        for (name, g) in step.grads {
            let Some(&(a_shape, b_shape)) = shapes.get(&name) else {
                continue;
            };
            let tensor = |values: Vec<f32>, shape: [usize; 2]| {
                Tensor::<B, 2>::from_data(TensorData::new(values, shape), device)
            };
            accumulate(grads, format!("{name}.lora_A"), tensor(g.a, a_shape));
            accumulate(grads, format!("{name}.lora_B"), tensor(g.b, b_shape));
        }
        for d in step.dense {
            let t = Tensor::<B, 2>::from_data(TensorData::new(d.values, d.shape), device);
            accumulate(grads, d.name, t);
        }
        Ok(step.loss)
    }

    /// Mean NLL per trained token over `batches` with `model`'s adapters, dropout off (0 when
    /// there are none).
    pub fn val_loss<A>(&self, model: &LlamaForCausalLM<A>, batches: &[Batch]) -> Result<f64>
    where
        A: AutodiffBackend<InnerBackend = B>,
    {
        let valid = model.valid();
        let mut fresh = None;
        let trainer = self.trainer(&valid, &mut fresh)?;
        let adapters = Adapters::of(&valid);
        mean_nll(batches, |b| {
            Ok(trainer.loss(&adapters, &RealTokens::of(b).tokens())?)
        })
    }
}

/// Mean of `nll` per trained token over `batches` (0 when there are none).
fn mean_nll(batches: &[Batch], mut nll: impl FnMut(&Batch) -> Result<f64>) -> Result<f64> {
    let (mut sum, mut tokens) = (0.0, 0);
    for b in batches.iter().filter(|b| b.loss_tokens() > 0) {
        sum += nll(b)?;
        tokens += b.loss_tokens();
    }
    Ok(if tokens == 0 {
        0.0
    } else {
        sum / tokens as f64
    })
}

/// How a run scores a model (adapters as attached, dropout off) for evaluation: on the host
/// kernels where its steps run there and the weights are in host memory, else through burn's
/// forward.
pub(crate) enum Scorer<'a, B: QuantBackend> {
    /// The host forward.
    Host(HostTrainer<B>, Adapters),
    /// burn's forward.
    Burn(&'a LlamaForCausalLM<B>, B::Device),
}

impl<'a, B: QuantBackend> Scorer<'a, B> {
    /// The scorer of `model`; `host`: whether the run's steps run on the host kernels.
    pub fn new(model: &'a LlamaForCausalLM<B>, host: bool) -> Self {
        match HostTrainer::new(model).filter(|_| host) {
            Some(trainer) => Self::Host(trainer, Adapters::of(model)),
            None => Self::Burn(model, model.device()),
        }
    }

    /// The summed NLL of the batch's targets.
    pub fn nll(&self, batch: &Batch) -> Result<f64> {
        match self {
            Self::Host(trainer, adapters) => {
                Ok(trainer.loss(adapters, &RealTokens::of(batch).tokens())?)
            }
            Self::Burn(model, device) => {
                Ok(batch_nll(model, batch, device).into_scalar().elem::<f64>())
            }
        }
    }

    /// Mean NLL per trained token over `batches` (0 when there are none).
    pub fn mean_nll(&self, batches: &[Batch]) -> Result<f64> {
        mean_nll(batches, |b| self.nll(b))
    }
}

/// A padded batch's tokens that can change its loss: padding dropped, each document cut after
/// its last predicting token (later tokens are seen by no target), documents without targets
/// dropped.
#[derive(Debug, Default, PartialEq)]
struct RealTokens {
    ids: Vec<u32>,
    positions: Vec<u32>,
    documents: Vec<Range<usize>>,
    targets: Vec<(usize, u32)>,
}

impl RealTokens {
    fn of(batch: &Batch) -> Self {
        let mut out = Self::default();
        let mut targets = batch.targets.iter().peekable();
        for (r, (segments, positions)) in batch.segments.iter().zip(&batch.positions).enumerate() {
            let mut start = 0;
            while start < segments.len() {
                let end = start
                    + segments[start..]
                        .iter()
                        .take_while(|&&s| s == segments[start])
                        .count();
                let (first, last) = (r * batch.s + start, r * batch.s + end);
                let mut cut = None;
                let at = out.ids.len();
                while let Some(&&(i, t)) = targets.peek().filter(|(i, _)| *i < last) {
                    targets.next();
                    if i >= first {
                        out.targets.push((at + i - first, t));
                        cut = Some(i + 1);
                    }
                }
                if let Some(cut) = cut {
                    out.ids.extend_from_slice(&batch.ids[first..cut]);
                    out.positions
                        .extend_from_slice(&positions[start..start + cut - first]);
                    out.documents.push(at..out.ids.len());
                }
                start = end;
            }
        }
        out
    }

    fn tokens(&self) -> Tokens<'_> {
        Tokens {
            ids: &self.ids,
            positions: &self.positions,
            documents: &self.documents,
            targets: &self.targets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Tokenized;

    #[test]
    fn padding_untrained_documents_and_unseen_tails_are_cut() {
        let trained = |ids: &[u32], from: usize| {
            let mut t = Tokenized::all_trained(ids.to_vec());
            t.train.iter_mut().take(from).for_each(|x| *x = false);
            t
        };
        let (a, b, c) = (
            trained(&[1, 2, 3, 4], 2),
            trained(&[5, 6, 7], 3),
            trained(&[8, 9, 10, 11, 12], 1),
        );
        let batch = Batch::new(&[vec![&a, &b], vec![&c]], 0);
        let real = RealTokens::of(&batch);
        // Row 0: a's targets predict from positions 1 and 2 (a[3] is seen by none); b has no
        // target; row 1: c whole; padding never.
        assert_eq!(real.ids, [1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(real.positions, [0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(real.documents, [0..3, 3..7]);
        assert_eq!(
            real.targets,
            [(1, 3), (2, 4), (3, 9), (4, 10), (5, 11), (6, 12)]
        );
    }
}
