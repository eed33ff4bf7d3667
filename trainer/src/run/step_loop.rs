//! The one step loop of every run, whatever it trains toward ([`Objective`]: cross-entropy on
//! the labels, or distillation from a teacher) and whatever it trains ([`Trainables`]: LoRA
//! adapters or every dense weight).
//!
//! Each optimizer step runs `grad_accum` micro-batches; the loss of each is its summed token
//! loss divided by the trained tokens of the whole step, so the accumulated gradient is that
//! of the mean over the step's tokens whatever the padding. Then global-norm clipping
//! (PyTorch's `clip_grad_norm_`), the scheduled learning rate and AdamW. A micro-batch's
//! gradients come from the objective's host step where it has one ([`Objective::host`]),
//! else from burn's autodiff. Dropout draws from (seed, step, micro-batch), and the data order
//! from (seed, epoch), so a run resumed from a checkpoint continues exactly as the
//! uninterrupted run would.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::checkpoint::{self, TrainerState};
use crate::data::{Batch, Tokenized};
use crate::error::{Result, TrainError};
use crate::metrics::Metrics;
use crate::optim::{AdamW, AdamWParams};
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::run::host_step::HostStep;
use crate::run::loss::val_loss;
use crate::run::setup::progress;
use crate::run::trainables::{clip, Trainables};
use crate::schedule::lr_at;

/// What a run trains toward: the loss of a micro-batch, and what a step adds to it.
pub(crate) trait Objective<B: AutodiffBackend + QuantBackend>
where
    B::InnerBackend: QuantBackend,
{
    /// Called as each step begins, before its micro-batches are drawn.
    fn begin_step(&mut self, step: usize);

    /// The `index`th micro-batch of `step`, given the one the plan drew (distillation may
    /// replace it by completions the model samples).
    fn batch(
        &mut self,
        model: &LlamaForCausalLM<B>,
        step: usize,
        index: usize,
        drawn: Batch,
    ) -> Batch;

    /// The summed loss over the batch's trained positions (a scalar tensor).
    fn loss(&self, model: &LlamaForCausalLM<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1>;

    /// Scalars the objective adds to each step's metrics, after the loop's own.
    fn scalars(&self) -> Vec<(&'static str, f64)>;

    /// Bookkeeping after each update, into the state that checkpoints keep.
    fn end_step(&mut self, state: &mut TrainerState);

    /// Writes the trained weights of a checkpoint into `dir`.
    fn save(&mut self, model: &LlamaForCausalLM<B>, dir: &Path) -> Result<()>;

    /// The host step, where the host kernels can run this objective's step: then it computes
    /// the gradients and the validation loss instead of burn's autodiff.
    fn host(&self) -> Option<&HostStep<B::InnerBackend>> {
        None
    }
}

/// The fixed parts of a run that the loop reads.
pub(crate) struct Run<'a, B: AutodiffBackend> {
    /// The effective recipe.
    pub recipe: &'a Recipe,
    /// The output folder (checkpoints go under it).
    pub out: &'a Path,
    /// Where the model lives.
    pub device: &'a B::Device,
    /// The training examples the plan indexes.
    pub train: &'a [Tokenized],
    /// The validation batches.
    pub val_batches: &'a [Batch],
    /// The padding token.
    pub pad: u32,
    /// What the run trains.
    pub trainables: Trainables,
}

/// Runs the plan's steps from `state.step` to the end, updating `model`, `optimizer` and
/// `state`, logging to `metrics` and checkpointing every `train.save_every` steps.
pub(crate) fn run_steps<B, O>(
    run: &Run<B>,
    plan: &Plan,
    model: &mut LlamaForCausalLM<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    state: &mut TrainerState,
    metrics: &mut Metrics,
    objective: &mut O,
) -> Result<()>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
    O: Objective<B>,
{
    let (r, device) = (run.recipe, run.device);
    let total = plan.total_steps;
    let bar = progress(total, state.step);
    let mut cursor = plan.cursor(state.epoch, state.position);
    while state.step < total {
        let step = state.step;
        let _span = tracing::info_span!("train_step", step = step + 1).entered();
        let step_start = Instant::now();
        B::seed(
            device,
            r.train.seed.wrapping_add(1_000_003 * (step as u64 + 1)),
        );
        objective.begin_step(step);
        let micro: Vec<Batch> = (0..r.train.grad_accum)
            .map(|i| {
                let drawn = cursor.next_batch(run.train, run.pad);
                objective.batch(model, step, i, drawn)
            })
            .collect();
        let step_tokens: usize = micro.iter().map(Batch::loss_tokens).sum::<usize>().max(1);
        let scale = 1.0 / step_tokens as f64;
        let mut loss_sum = 0.0;
        let mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>> = BTreeMap::new();
        for (i, batch) in micro
            .iter()
            .enumerate()
            .filter(|(_, b)| b.loss_tokens() > 0)
        {
            if let Some(host) = objective.host() {
                let seed = dropout_seed(r.train.seed, step, i);
                loss_sum += host.gradients(model, batch, scale, seed, &mut grads)? * scale;
            } else {
                let loss = objective.loss(model, batch, device) * scale;
                loss_sum += loss.clone().into_scalar().elem::<f64>();
                let g = loss.backward();
                run.trainables.accumulate(model, &g, &mut grads);
            }
            state.train_tokens += batch.real_tokens;
        }
        let grad_norm = clip(&mut grads, r.train.max_grad_norm);
        let lr = lr_at(
            r.train.scheduler,
            r.train.lr,
            r.train.warmup_steps,
            total,
            step,
        );
        let hp = AdamWParams {
            lr,
            betas: r.train.betas,
            eps: r.train.eps,
            weight_decay: r.train.weight_decay,
        };
        run.trainables.update(model, optimizer, grads, &hp);
        state.step += 1;
        (state.epoch, state.position) = cursor.position();
        state.train_s += step_start.elapsed().as_secs_f64();
        objective.end_step(state);
        let tok_s = state.train_tokens as f64 / state.train_s.max(1e-9);
        state.losses.push(loss_sum);
        let mut scalars = vec![
            ("train/loss", loss_sum),
            ("train/lr", lr),
            ("train/grad_norm", grad_norm),
            ("train/tokens_per_s", tok_s),
            crate::metrics::step_seconds(step_start),
        ];
        scalars.extend(objective.scalars());
        let last = state.step == total;
        if last || (r.train.eval_every > 0 && state.step.is_multiple_of(r.train.eval_every)) {
            state.val_loss = match objective.host() {
                Some(host) => host.val_loss(model, run.val_batches)?,
                None => val_loss(&model.valid(), run.val_batches, device),
            };
            scalars.push(("val/loss", state.val_loss));
            scalars.push(("val/perplexity", state.val_loss.exp()));
        }
        metrics
            .log(state.step, &scalars)
            .map_err(|e| TrainError::io(run.out, e))?;
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
        if r.train.save_every > 0 && state.step.is_multiple_of(r.train.save_every) {
            let write = |dir: &Path| objective.save(model, dir);
            checkpoint::save(run.out, write, optimizer, state)?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The seed of the dropout masks of micro-batch `index` of `step` on the host path.
fn dropout_seed(seed: u64, step: usize, index: usize) -> u64 {
    seed.wrapping_add(1_000_003 * (step as u64 + 1))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index as u64)
}
