//! A recipe's fine-tuning job as the PEFT peer replays it (`ft bench train --vs-peft`): the
//! base in f32 written as an HF folder from ft's own loaded weights (so both engines start
//! from the same numbers, whatever the source's format), the `[lora]` section in PEFT's terms,
//! AdamW's hyperparameters with each step's scheduled learning rate, and the micro-batches of
//! the run's first steps drawn from the same plan, with labels -100 wherever ft trains no token.
//!
//! A quantized base (QLoRA) is replayed on its f32 weights; paged AdamW as plain AdamW. Packed
//! rows have no twin: transformers would let one document attend to another.

use std::path::Path;

use burn::tensor::backend::Backend;
use ft_eval::peers::peft::{PeftBatch, PeftJob, PeftLora, PeftOptimizer};
use ft_model::Pretrained;

use super::setup::load_data;
use crate::data::Batch;
use crate::error::{write_atomic, At, Result, TrainError};
use crate::plan::Plan;
use crate::recipe::LoadedRecipe;
use crate::schedule::lr_at;

/// How much of the run the twin replays, and where.
#[derive(Debug, Clone)]
pub struct Twin<'a> {
    /// Untimed leading steps.
    pub warmup: usize,
    /// Timed steps after them.
    pub steps: usize,
    /// torch's threads.
    pub threads: usize,
    /// The HF folder the f32 base is written to (reused while it holds the same source).
    pub base_dir: &'a Path,
}

/// The PEFT job of `loaded`'s first `twin.warmup + twin.steps` steps, its base written to
/// `twin.base_dir` unless already there.
pub fn peft_job<B: Backend>(
    loaded: &LoadedRecipe,
    twin: &Twin,
    device: &B::Device,
) -> Result<PeftJob> {
    let r = &loaded.recipe;
    if r.distill.is_some() {
        return Err(TrainError::Invalid(
            "[distill]: --vs-peft replays LoRA fine-tuning only".into(),
        ));
    }
    if r.data.packing {
        return Err(TrainError::Invalid(
            "data.packing: --vs-peft needs one document per row (transformers would attend across packed documents)".into(),
        ));
    }
    let pretrained = Pretrained::<B>::from_source(&r.model.source, None, device)
        .at_with(|| format!("model.source {}", r.model.source))?;
    write_base(&pretrained, &r.model.source, twin.base_dir)?;
    let data = load_data(loaded, &pretrained)?;
    let pad = pretrained.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let plan = Plan::new(r, &data.train);
    let mut cursor = plan.cursor(0, 0);
    let n = twin.warmup + twin.steps;
    let steps = (0..n)
        .map(|_| {
            (0..r.train.grad_accum)
                .map(|_| peft_batch(&cursor.next_batch(&data.train, pad)))
                .collect()
        })
        .collect();
    let t = &r.train;
    Ok(PeftJob {
        model: twin.base_dir.to_path_buf(),
        lora: PeftLora {
            r: r.lora.r,
            alpha: r.lora.alpha,
            dropout: r.lora.dropout,
            targets: r.lora.targets.clone(),
            layers: r.lora.layers.clone(),
            rslora: r.lora.rslora,
        },
        optimizer: PeftOptimizer {
            lr: (0..n)
                .map(|i| lr_at(t.scheduler, t.lr, t.warmup_steps, plan.total_steps, i))
                .collect(),
            betas: t.betas,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
        },
        seed: t.seed,
        threads: twin.threads,
        warmup: twin.warmup,
        steps,
    })
}

/// Writes the base as an HF folder in `dir` unless `dir` already holds this source's.
fn write_base<B: Backend>(pretrained: &Pretrained<B>, source: &str, dir: &Path) -> Result<()> {
    let stamp_path = dir.join("ft-source.txt");
    let len = std::fs::metadata(&pretrained.path).map_or(0, |m| m.len());
    let stamp = format!("{source}\n{}\n{len}\n", pretrained.path.display());
    let current = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && dir.join("model.safetensors").is_file();
    if current {
        tracing::info!("f32 base for PEFT: {} (kept)", dir.display());
        return Ok(());
    }
    tracing::info!("writing the f32 base for PEFT to {}", dir.display());
    pretrained.save_hf(dir).at("the f32 base for PEFT")?;
    write_atomic(&stamp_path, stamp.as_bytes())
}

/// A micro-batch of unpacked rows in transformers' terms: ft's target `(p, id)`, the token
/// predicted from flat position `p`, is the label at `p + 1`, which transformers shifts back.
fn peft_batch(b: &Batch) -> PeftBatch {
    let mut labels = vec![-100i64; b.b * b.s];
    for &(p, id) in &b.targets {
        labels[p + 1] = i64::from(id);
    }
    let rows = |r: usize| r * b.s..(r + 1) * b.s;
    PeftBatch {
        input_ids: (0..b.b).map(|r| b.ids[rows(r)].to_vec()).collect(),
        // One document per row: segment 0 is the document, segment 1 the padding.
        attention_mask: b
            .segments
            .iter()
            .map(|seg| seg.iter().map(|&s| u8::from(s == 0)).collect())
            .collect(),
        labels: (0..b.b).map(|r| labels[rows(r)].to_vec()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Tokenized;

    #[test]
    fn prompt_tokens_and_padding_are_masked_out_of_the_labels() {
        // Prompt [5, 6], completion [7, 8]; a shorter row [9, 10] trained on its last token.
        let a = Tokenized {
            ids: vec![5, 6, 7, 8],
            train: vec![false, false, true, true],
        };
        let b = Tokenized {
            ids: vec![9, 10],
            train: vec![false, true],
        };
        let batch = Batch::new(&[vec![&a], vec![&b]], 0);
        let p = peft_batch(&batch);
        assert_eq!(p.input_ids, vec![vec![5, 6, 7, 8], vec![9, 10, 0, 0]]);
        assert_eq!(p.attention_mask, vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
        assert_eq!(
            p.labels,
            vec![vec![-100, -100, 7, 8], vec![-100, 10, -100, -100]]
        );
        let trained = p.labels.iter().flatten().filter(|&&l| l != -100).count();
        assert_eq!(trained, batch.loss_tokens());
        let real: usize = p.attention_mask.iter().flatten().map(|&m| m as usize).sum();
        assert_eq!(real, batch.real_tokens);
    }
}
