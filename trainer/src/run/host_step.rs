//! A LoRA run's steps on ft's host kernels ([`ft_model::forward::train`]): a padded batch cut
//! to what can change its loss, and the adapters' gradients handed back as burn tensors keyed
//! as the autodiff path keys them, so clipping, AdamW, checkpoints and resume are the same
//! whichever engine ran the step.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use ft_model::forward::train::{Adapters, HostTrainer, Tokens};
use ft_model::{LlamaForCausalLM, QuantBackend};

use super::trainables::accumulate;
use crate::data::Batch;
use crate::error::Result;

/// The host trainer of a run's frozen base.
pub(crate) struct HostStep<B: QuantBackend> {
    trainer: HostTrainer<B>,
    device: B::Device,
}

impl<B: QuantBackend> HostStep<B> {
    /// The host step of `model`'s base, or `None` where its weights are not in host memory.
    pub fn new(model: &LlamaForCausalLM<B>) -> Option<Self> {
        Some(Self {
            trainer: HostTrainer::new(model)?,
            device: model.device(),
        })
    }

    /// Adds the gradients of `scale` times the batch's summed NLL with respect to `model`'s
    /// adapters to `grads` (keys `{module}.lora_A` / `.lora_B`) and returns the summed NLL.
    /// `seed` draws the dropout masks.
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
        let step = self.trainer.step(
            &Adapters::of(&model.valid()),
            &real.tokens(),
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
        Ok(step.loss)
    }

    /// Mean NLL per trained token over `batches` with `model`'s adapters, dropout off (0 when
    /// there are none).
    pub fn val_loss<A>(&self, model: &LlamaForCausalLM<A>, batches: &[Batch]) -> Result<f64>
    where
        A: AutodiffBackend<InnerBackend = B>,
    {
        let adapters = Adapters::of(&model.valid());
        let (mut nll, mut tokens) = (0.0, 0);
        for b in batches.iter().filter(|b| b.loss_tokens() > 0) {
            nll += self.trainer.loss(&adapters, &RealTokens::of(b).tokens())?;
            tokens += b.loss_tokens();
        }
        Ok(if tokens == 0 {
            0.0
        } else {
            nll / tokens as f64
        })
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
