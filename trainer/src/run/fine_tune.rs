//! Fine-tuning: a recipe in, a PEFT adapter, metrics and a summary out. The objective is the
//! cross-entropy of the labels ([`CrossEntropy`]), the trainables the LoRA adapters of a
//! frozen base, and the steps are the one step loop's ([`super::step_loop`]).

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use ft_adapters::registry::AddInfo;
use ft_adapters::LoraConfig;
use ft_eval::{exact_match, tasks, ExactMatch};
use ft_model::ptq::{self, calibration, Gptq, Grid, Method};
use ft_model::{LlamaForCausalLM, Pretrained, QuantBackend, QuantFormat, QuantSpec, TextTokenizer};
use serde::{Deserialize, Serialize};

use super::host_step::HostStep;
use super::loss::{batch_nll, val_loss};
use super::setup::{
    base_sha256, check_lora_shape, load_data, peft_config, prepare, quant_spec, register,
};
use super::step_loop::{run_steps, Objective, Run};
use super::trainables::Trainables;
use crate::checkpoint::{self, TrainerState};
use crate::data::{Batch, Tokenized};
use crate::error::{write_atomic, At, Result, TrainError};
use crate::memory::MemoryReport;
use crate::metrics::Metrics;
use crate::optim::{AdamW, StateBytes};
use crate::plan::Plan;
use crate::recipe::{Engine, LoadedRecipe, OptimizerKind, QuantSection, Recipe};

/// What a finished run reports in `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Mean training loss over the last 10% of steps (at least one).
    pub train_loss: f64,
    /// Validation loss after training.
    pub val_loss: f64,
    /// exp(val_loss).
    pub val_perplexity: f64,
    /// Validation loss before training.
    pub val_loss_before: f64,
    /// Exact match on the task's held-out split before training (fraction), if a task.
    pub exact_match_before: Option<f64>,
    /// The same after training.
    pub exact_match_after: Option<f64>,
    /// The storage of the base both exact matches ran on (`nf4+dq`, `f32`, ...): `ft eval`
    /// scores the base as the server stores it (q4 for the default model), so its base row
    /// can differ from `exact_match_before`.
    pub exact_match_base: Option<String>,
    /// Held-out examples scored.
    pub exact_match_examples: usize,
    /// Non-padding tokens per second of training (forward, backward, update).
    pub train_tokens_per_s: f64,
    /// Peak resident set size of the process.
    pub peak_rss_bytes: u64,
    /// Wall time of the whole run.
    pub wall_s: f64,
    /// Seconds of training steps.
    pub train_s: f64,
    /// Median seconds of one optimizer step in this process (`metrics.jsonl` has each step's
    /// `train/step_s`); absent in summaries written before it was recorded.
    #[serde(default)]
    pub step_s_median: Option<f64>,
    /// Seconds spent dequantizing packed base weights during training steps.
    pub dequant_s: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Trainable (LoRA) parameters.
    pub trainable_params: usize,
    /// Bytes of the frozen block linear weights as stored.
    pub base_weight_bytes: usize,
    /// Storage of the base: f32, nf4, ...
    pub base_format: String,
    /// Where the optimizer state lives.
    pub optimizer_state: StateBytes,
    /// Device-resident bytes against host bytes.
    pub memory: MemoryReport,
    /// Examples truncated to max_seq_len.
    pub truncated_examples: usize,
}

/// A finished run: its summary and the model with its trained adapters.
pub struct Trained<B: AutodiffBackend> {
    /// What `summary.json` holds.
    pub summary: Summary,
    /// The base with the trained adapters attached.
    pub model: LlamaForCausalLM<B>,
}

/// Quantizes `model`'s projections to NF4 with GPTQ (the defaults of `ft quant gptq`) on the
/// bundled calibration text, or with `quant.calib = "data"` on the run's training examples
/// end to end, and packs them as the QLoRA base.
fn gptq_base<B: QuantBackend>(
    model: &mut LlamaForCausalLM<B>,
    pretrained: &Pretrained<B>,
    quant: &QuantSection,
    train: &[Tokenized],
) -> Result<()> {
    let fail =
        |e: ft_model::ModelError| TrainError::Invalid(format!("quant.method = \"gptq\": {e}"));
    let context = pretrained.config.max_position_embeddings;
    let len = calibration::LEN.min(context);
    let samples = if quant.calib == "data" {
        let ids: Vec<u32> = train.iter().flat_map(|t| t.ids.iter().copied()).collect();
        calibration::windows_of(&ids, calibration::SAMPLES, len, 0)
    } else {
        let text = calibration::text_of(calibration::BUNDLED, true).map_err(fail)?;
        calibration::windows(
            &pretrained.tokenizer,
            &text,
            calibration::SAMPLES,
            len,
            context,
            0,
        )
    }
    .map_err(fail)?;
    let started = Instant::now();
    let quantized = ptq::quantize(
        model,
        Grid::Nf4,
        Method::Gptq(Gptq::default()),
        &samples,
        |_, _| {},
    )
    .map_err(fail)?;
    ptq::pack_nf4(model, &quantized, quant.double_quant).map_err(fail)?;
    tracing::info!(
        "quantized the base to NF4 with GPTQ on {} calibration text in {:.0} s",
        quant.calib,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the recipe on backend `B` (an autodiff backend).
pub fn train<B>(loaded: &LoadedRecipe, device: &B::Device) -> Result<Trained<B>>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
{
    let started = Instant::now();
    let r = &loaded.recipe;
    let out = r.output.dir.clone();
    let resume = prepare::<B>(r)?;
    let quant = quant_spec(r)?;
    let gptq = r.quant.method == "gptq";
    // GPTQ reads the weights in f32 and packs its own NF4 codes.
    let load_as = if gptq { None } else { quant };
    let pretrained = Pretrained::<B>::from_source(&r.model.source, load_as, device)
        .at_with(|| format!("model.source {}", r.model.source))?;
    let data = load_data(loaded, &pretrained)?;
    write_atomic(&out.join("recipe.toml"), r.to_toml().as_bytes())?;
    let mut model = pretrained.model.clone().no_grad();
    if gptq {
        gptq_base(&mut model, &pretrained, &r.quant, &data.train)?;
    }
    B::seed(device, r.train.seed);
    check_lora_shape(r, &pretrained.config)?;
    let lora = LoraConfig::from(&r.lora);
    let adapted = model.add_lora(&lora, &r.lora.targets, r.lora.layers.as_deref())?;
    if adapted.is_empty() {
        return Err(TrainError::Invalid(
            "lora.targets and lora.layers select no module".into(),
        ));
    }
    let trainable = Trainables::Lora.count(&mut model);
    let base_weight_bytes: usize = model
        .linears()
        .iter()
        .map(|(_, l)| l.base.weight_bytes())
        .sum();
    let base_format = model
        .linears()
        .first()
        .map_or(QuantFormat::F32, |(_, l)| l.base.format());
    let base_storage = QuantSpec {
        format: base_format,
        double_quant: quant.is_some_and(|q| q.double_quant),
    }
    .to_string();

    let mut optimizer = AdamW::<B::InnerBackend>::new(
        r.train.optimizer == OptimizerKind::PagedAdamW,
        r.train.page_min_elements,
    );
    let mut state = TrainerState::default();
    if let Some(dir) = &resume {
        state = checkpoint::load(dir, &mut model, &mut optimizer, device)?;
        tracing::info!("resuming from {} at step {}", dir.display(), state.step);
    }

    let plan = Plan::new(r, &data.train);
    let pad = pretrained.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let mut metrics = Metrics::open(&out, &r.output.loggers, resume.as_ref().map(|_| state.step))
        .map_err(|e| TrainError::io(&out, e))?;

    let val_batches = plan.val_batches(&data.val, pad);
    let host = match r.train.engine {
        Engine::Burn => None,
        Engine::Auto => HostStep::adapters(&model.valid()),
        Engine::Host => Some(HostStep::adapters(&model.valid()).ok_or_else(|| {
            TrainError::usage(
                "train.engine",
                "\"auto\" or \"burn\" where the weights are not in host memory (a GPU device)",
                "\"host\"",
            )
        })?),
    };
    tracing::info!(
        "training steps on {}",
        if host.is_some() {
            "the host kernels"
        } else {
            "burn's autodiff"
        }
    );
    if resume.is_none() {
        state.val_loss_before = match &host {
            Some(host) => host.val_loss(&model, &val_batches)?,
            None => val_loss(&model.valid(), &val_batches, device),
        };
        state.exact_match_before = match (data.task, r.eval.exact_match) {
            (Some(task), true) => {
                let em = score(&model.valid(), &pretrained.tokenizer, task, r)?;
                tracing::info!(
                    "exact match before training ({}, {} base): {:.3}",
                    task.name,
                    base_storage,
                    em.accuracy
                );
                Some(em.accuracy)
            }
            _ => None,
        };
    }

    if resume.is_none() {
        // A fresh run replaces the folder's run: stale checkpoints would otherwise outrank
        // this run's on a later --resume. Only now, once the model and data have loaded, so a
        // run that fails to start destroys nothing.
        if checkpoint::clear(&out)? {
            tracing::info!(
                "removed the checkpoints of an earlier run in {}",
                out.display()
            );
        }
    }
    let dequant_start = ft_model::kernels::dequant_seconds();
    let run = Run {
        recipe: r,
        out: &out,
        device,
        train: &data.train,
        val_batches: &val_batches,
        pad,
        trainables: Trainables::Lora,
    };
    let mut objective = CrossEntropy::<B> {
        recipe: r,
        host,
        whole: None,
    };
    run_steps(
        &run,
        &plan,
        &mut model,
        &mut optimizer,
        &mut state,
        &mut metrics,
        &mut objective,
    )?;
    let dequant_s = ft_model::kernels::dequant_seconds() - dequant_start;

    let adapter = model.to_peft(peft_config(r, &model));
    adapter.write(&out)?;

    let exact_match_after = match (data.task, r.eval.exact_match) {
        (Some(task), true) => {
            let em = score(&model.valid(), &pretrained.tokenizer, task, r)?;
            tracing::info!(
                "exact match after training ({}, {} base): {:.3}",
                task.name,
                base_storage,
                em.accuracy
            );
            Some(em)
        }
        _ => None,
    };
    let tail = (state.losses.len() / 10)
        .max(1)
        .min(state.losses.len().max(1));
    let train_loss = state.losses.iter().rev().take(tail).sum::<f64>() / tail as f64;
    let summary = Summary {
        train_loss,
        val_loss: state.val_loss,
        val_perplexity: state.val_loss.exp(),
        val_loss_before: state.val_loss_before,
        exact_match_before: state.exact_match_before,
        exact_match_base: exact_match_after.as_ref().map(|_| base_storage.clone()),
        exact_match_examples: exact_match_after.as_ref().map_or(0, |e| e.examples),
        exact_match_after: exact_match_after.map(|e| e.accuracy),
        train_tokens_per_s: state.train_tokens as f64 / state.train_s.max(1e-9),
        peak_rss_bytes: ft_eval::rss::peak_rss_bytes(),
        wall_s: started.elapsed().as_secs_f64(),
        train_s: state.train_s,
        step_s_median: metrics.median_step_seconds(),
        dequant_s,
        steps: state.step,
        trainable_params: trainable,
        base_weight_bytes,
        base_format: base_format.to_string(),
        optimizer_state: optimizer.state_bytes(),
        memory: MemoryReport::new(model.weight_bytes(), trainable, optimizer.state_bytes()),
        truncated_examples: data.truncated,
    };
    let json = serde_json::to_string_pretty(&summary)?;
    write_atomic(&out.join("summary.json"), json.as_bytes())?;
    if let Some(dir) = &r.output.registry {
        let info = AddInfo {
            task: r.data.task.clone(),
            base_model: Some(ft_model::source::hub_id(&r.model.source)),
            base_sha256: base_sha256(&pretrained.path),
            recipe: Some(r.to_toml()),
            metrics: Some(serde_json::to_value(&summary)?),
        };
        register(dir, &out, &r.output.adapter_name, info)?;
    }
    Ok(Trained { summary, model })
}

/// Cross-entropy of the labels: the summed next-token NLL of a batch's trained tokens.
pub(crate) struct CrossEntropy<'a, B: AutodiffBackend + QuantBackend>
where
    B::InnerBackend: QuantBackend,
{
    pub recipe: &'a Recipe,
    /// The host step, when the run's steps run there.
    pub host: Option<HostStep<B::InnerBackend>>,
    /// The container of a model trained in full, which a checkpoint writes whole (as
    /// `model/`); `None`: the run trains adapters, which a checkpoint writes as PEFT files.
    pub whole: Option<&'a mut Pretrained<B>>,
}

impl<B> Objective<B> for CrossEntropy<'_, B>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
{
    fn begin_step(&mut self, _: usize) {}

    fn batch(&mut self, _: &LlamaForCausalLM<B>, _: usize, _: usize, drawn: Batch) -> Batch {
        drawn
    }

    fn loss(&self, model: &LlamaForCausalLM<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        batch_nll(model, batch, device)
    }

    fn scalars(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    fn end_step(&mut self, _: &mut TrainerState) {}

    fn save(&mut self, model: &LlamaForCausalLM<B>, dir: &Path) -> Result<()> {
        match &mut self.whole {
            Some(container) => {
                container.model = model.clone();
                Ok(container.save_hf(&dir.join("model"))?)
            }
            None => Ok(model.to_peft(peft_config(self.recipe, model)).write(dir)?),
        }
    }

    fn host(&self) -> Option<&HostStep<B::InnerBackend>> {
        self.host.as_ref()
    }
}

/// Exact match of the task's held-out split (first `eval.limit` examples), as `ft eval` scores
/// the bundled task.
fn score<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &TextTokenizer,
    task: &tasks::Task,
    r: &Recipe,
) -> Result<ExactMatch> {
    exact_match(
        model,
        tokenizer,
        &ft_eval::task::bundled(task),
        r.eval.limit,
        r.eval.max_new_tokens,
        r.eval.batch_size,
    )
    .map_err(TrainError::from)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Param;
    use burn::tensor::backend::Backend;
    use ft_model::tiny::{tiny_config, write_hf_folder};

    use super::*;
    use crate::recipe;

    #[test]
    fn a_tiny_run_overfits_and_leaves_the_base_bit_identical() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        NdArray::<f32>::seed(&device, 1);
        let mut base = LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &device);
        // Embeddings large enough that the (frozen, tied) head can put most mass on one token.
        base.model.embed_tokens = Param::from_tensor(base.model.embed_tokens.val() * 30.0);
        write_hf_folder(&base, &tiny_config(), &dir.path().join("model")).unwrap();
        let lines: Vec<String> = [
            "the cat sat",
            "a dog ran far",
            "birds sing",
            "fish swim deep",
        ]
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
        std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();
        std::fs::write(dir.path().join("val.jsonl"), &lines[0]).unwrap();
        let text = format!(
            "[model]\nsource = {:?}\n[lora]\nr = 8\nalpha = 16\ndropout = 0.0\n[data]\ntrain = \"train.jsonl\"\nval = \"val.jsonl\"\nformat = \"text\"\n[train]\nmax_steps = 150\nmicro_batch_size = 4\nlr = 0.01\nscheduler = \"constant\"\n[output]\ndir = {:?}\n",
            dir.path().join("model"),
            dir.path().join("run")
        );
        let recipe = recipe::parse(&text, &[], "tiny.toml").unwrap();
        let loaded = LoadedRecipe {
            recipe,
            base_dir: dir.path().to_path_buf(),
        };
        let trained = train::<A>(&loaded, &device).unwrap();
        let s = &trained.summary;
        assert!(s.val_loss < 0.3 * s.val_loss_before, "{s:?}");
        assert_eq!(
            s.optimizer_state.params,
            2 * 7 * 2,
            "state for the 28 LoRA matrices only"
        );
        let before = base.named_tensors();
        let after = trained.model.valid().named_tensors();
        assert_eq!(before.len(), after.len());
        for ((n1, t1), (n2, t2)) in before.iter().zip(&after) {
            assert_eq!(n1, n2);
            assert!(t1.data == t2.data, "{n1} changed");
        }
        let adapter = ft_adapters::PeftAdapter::read(&dir.path().join("run")).unwrap();
        assert_eq!(adapter.modules.len(), 14);
    }
}
