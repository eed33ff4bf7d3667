//! The training loop: a recipe in, a PEFT adapter, metrics and a summary out.
//!
//! Each optimizer step runs `grad_accum` micro-batches; the loss of each is its summed token
//! NLL divided by the trained tokens of the whole step, so the accumulated gradient is that of
//! the mean over the step's tokens whatever the padding. Then global-norm clipping (PyTorch's
//! `clip_grad_norm_`), the scheduled learning rate and AdamW. Dropout draws from the backend
//! RNG seeded with (seed, step), and the data order from (seed, epoch), so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use ft_adapters::peft::PeftConfig;
use ft_adapters::registry::AddInfo;
use ft_adapters::{LoraConfig, Registry};
use ft_model::llama::Attend;
use ft_model::{LlamaForCausalLM, Pretrained, QuantBackend, TextTokenizer};
use ft_model::{QuantFormat, QuantSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use ft_eval::{exact_match, tasks, ExactMatch};

use crate::checkpoint::{self, TrainerState};
use crate::data::{self, Batch, Encoder, Record, Tokenized};
use crate::error::{write_atomic, At, Result, TrainError};
use crate::memory::MemoryReport;
use crate::metrics::Metrics;
use crate::optim::{AdamW, AdamWParams, ParamGrad, StateBytes};
use crate::plan::{shuffle, Plan};
use crate::recipe::{LoadedRecipe, OptimizerKind, Recipe};
use crate::schedule::lr_at;

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

/// The data of a run, tokenized.
pub(crate) struct Dataset {
    /// Training examples.
    pub train: Vec<Tokenized>,
    /// Validation examples.
    pub val: Vec<Tokenized>,
    /// Examples cut at `data.max_seq_len`.
    pub truncated: usize,
    /// The bundled task, if the data is one.
    pub task: Option<&'static tasks::Task>,
}

/// A finished run: its summary and the model with its trained adapters.
pub struct Trained<B: AutodiffBackend> {
    /// What `summary.json` holds.
    pub summary: Summary,
    /// The base with the trained adapters attached.
    pub model: LlamaForCausalLM<B>,
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
    std::fs::create_dir_all(&out)
        .map_err(|e| TrainError::io(&out, e))
        .at("output.dir")?;
    let resume = match &r.train.resume {
        Some(dir) => Some(checkpoint::find(dir)?),
        None => None,
    };

    apply_compute_dtype::<B>(r)?;
    let quant = quant_spec(r)?;
    let pretrained = Pretrained::<B>::from_source(&r.model.source, quant, device)
        .at_with(|| format!("model.source {}", r.model.source))?;
    let data = load_data(loaded, &pretrained)?;
    write_atomic(&out.join("recipe.toml"), r.to_toml().as_bytes())?;
    let mut model = pretrained.model.clone().no_grad();
    B::seed(device, r.train.seed);
    let lora = LoraConfig::from(&r.lora);
    let adapted = model.add_lora(&lora, &r.lora.targets, r.lora.layers.as_deref())?;
    if adapted.is_empty() {
        return Err(TrainError::Invalid(
            "lora.targets and lora.layers select no module".into(),
        ));
    }
    let trainable: usize = model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .map(|l| l.num_params())
        .sum();
    let base_weight_bytes: usize = model
        .linears()
        .iter()
        .map(|(_, l)| l.base.weight_bytes())
        .sum();
    let base_format = model
        .linears()
        .first()
        .map_or(QuantFormat::F32, |(_, l)| l.base.format());

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
    let total = plan.total_steps;
    let pad = pretrained.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let mut metrics = Metrics::open(&out, &r.output.loggers, resume.as_ref().map(|_| state.step))
        .map_err(|e| TrainError::io(&out, e))?;

    let val_batches = plan.val_batches(&data.val, pad);
    if resume.is_none() {
        state.val_loss_before = val_loss(&model.valid(), &val_batches, device);
        state.exact_match_before = match (data.task, r.eval.exact_match) {
            (Some(task), true) => {
                let em = score(&model.valid(), &pretrained.tokenizer, task, r)?;
                tracing::info!(
                    "exact match before training ({}): {:.3}",
                    task.name,
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
    let bar = progress(total, state.step);
    let (mut train_s, mut train_tokens) = (state.train_s, state.train_tokens);
    let dequant_start = ft_model::kernels::dequant_seconds();
    let mut cursor = plan.cursor(state.epoch, state.position);
    while state.step < total {
        let _span = tracing::info_span!("train_step", step = state.step + 1).entered();
        let step_start = Instant::now();
        B::seed(
            device,
            r.train
                .seed
                .wrapping_add(1_000_003 * (state.step as u64 + 1)),
        );
        let micro: Vec<Batch> = (0..r.train.grad_accum)
            .map(|_| cursor.next_batch(&data.train, pad))
            .collect();
        let step_tokens: usize = micro.iter().map(Batch::loss_tokens).sum::<usize>().max(1);
        let mut loss_sum = 0.0;
        let mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>> = BTreeMap::new();
        for batch in &micro {
            if batch.loss_tokens() == 0 {
                continue;
            }
            let loss = batch_nll(&model, batch, device) / step_tokens as f64;
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let g = loss.backward();
            accumulate_lora_grads(&model, &g, &mut grads);
            train_tokens += batch.real_tokens;
        }
        let grad_norm = clip(&mut grads, r.train.max_grad_norm);
        let lr = lr_at(
            r.train.scheduler,
            r.train.lr,
            r.train.warmup_steps,
            total,
            state.step,
        );
        update(&mut model, &mut optimizer, grads, lr, r);
        state.step += 1;
        (state.epoch, state.position) = cursor.position();
        train_s += step_start.elapsed().as_secs_f64();
        let tok_s = train_tokens as f64 / train_s.max(1e-9);
        let mut scalars = vec![
            ("train/loss", loss_sum),
            ("train/lr", lr),
            ("train/grad_norm", grad_norm),
            ("train/tokens_per_s", tok_s),
        ];
        state.losses.push(loss_sum);
        let last = state.step == total;
        if last || (r.train.eval_every > 0 && state.step % r.train.eval_every == 0) {
            let v = val_loss(&model.valid(), &val_batches, device);
            state.val_loss = v;
            scalars.push(("val/loss", v));
            scalars.push(("val/perplexity", v.exp()));
        }
        metrics
            .log(state.step, &scalars)
            .map_err(|e| TrainError::io(&out, e))?;
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
        state.train_s = train_s;
        state.train_tokens = train_tokens;
        if r.train.save_every > 0 && state.step % r.train.save_every == 0 {
            let peft = peft_config(r, &model);
            let write = |dir: &Path| Ok(model.to_peft(peft).write(dir)?);
            checkpoint::save(&out, write, &optimizer, &state)?;
        }
    }
    bar.finish_and_clear();
    let dequant_s = ft_model::kernels::dequant_seconds() - dequant_start;

    let adapter = model.to_peft(peft_config(r, &model));
    adapter.write(&out)?;

    let exact_match_after = match (data.task, r.eval.exact_match) {
        (Some(task), true) => {
            let em = score(&model.valid(), &pretrained.tokenizer, task, r)?;
            tracing::info!(
                "exact match after training ({}): {:.3}",
                task.name,
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
        exact_match_examples: exact_match_after.as_ref().map_or(0, |e| e.examples),
        exact_match_after: exact_match_after.map(|e| e.accuracy),
        train_tokens_per_s: train_tokens as f64 / train_s.max(1e-9),
        peak_rss_bytes: ft_eval::rss::peak_rss_bytes(),
        wall_s: started.elapsed().as_secs_f64(),
        train_s,
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

/// Adds the adapter in `out` to the registry `dir` as `name` (the recipe's `output.registry`).
pub(crate) fn register(dir: &Path, out: &Path, name: &str, info: AddInfo) -> Result<()> {
    let record = Registry::open(dir)
        .and_then(|mut reg| reg.add(out, name, info))
        .at_with(|| format!("output.registry {}", dir.display()))?;
    tracing::info!("registered {} in {}", record.id(), dir.display());
    Ok(())
}

/// sha256 of the base model when it is one file (a GGUF); `None` for folders.
pub(crate) fn base_sha256(path: &Path) -> Option<String> {
    path.is_file()
        .then(|| ft_model::source::sha256_file(path).ok())
        .flatten()
}

/// Sets the dtype of the packed-weight matmuls from `quant.compute_dtype`; bf16 on a backend
/// without it is a usage error.
pub(crate) fn apply_compute_dtype<B: QuantBackend>(r: &Recipe) -> Result<()> {
    let bf16 = r.quant.compute_dtype == "bf16";
    if bf16 && !B::bf16_compute_supported() {
        return Err(TrainError::usage(
            "quant.compute_dtype",
            "f32 on the CPU backend (bf16 needs --device cuda)",
            "\"bf16\"",
        ));
    }
    ft_model::kernels::set_bf16_compute(bf16);
    Ok(())
}

/// The quantization a recipe asks for (`None`: f32 as loaded).
pub(crate) fn quant_spec(r: &Recipe) -> Result<Option<QuantSpec>> {
    if matches!(r.quant.base.as_str(), "none" | "f32") {
        return Ok(None);
    }
    let format: QuantFormat = r
        .quant
        .base
        .parse()
        .map_err(|e| TrainError::Invalid(format!("quant.base: {e}")))?;
    Ok(Some(QuantSpec {
        format,
        double_quant: r.quant.double_quant,
    }))
}

/// The PEFT config of the adapters the recipe attached, read from the layers
/// ([`LlamaForCausalLM::peft_config`]).
pub(crate) fn peft_config<B: Backend>(r: &Recipe, model: &LlamaForCausalLM<B>) -> PeftConfig {
    let base = ft_model::source::hub_id(&r.model.source);
    model.peft_config(&LoraConfig::from(&r.lora), Some(base))
}

/// Next-token logits `[n, vocab]` at the batch's n trained positions, in target order: only
/// those positions reach the LM head.
pub fn target_logits<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 2> {
    let ids: Vec<i64> = batch.ids.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.b, batch.s]), device);
    let attend = Attend::segmented(
        &model.model.rotary_emb,
        &batch.segments,
        &batch.positions,
        device,
    );
    let hidden = model.forward_attend(ids, &attend); // [b, s, e]
    let e = hidden.dims()[2];
    let n = batch.targets.len();
    let rows: Vec<i64> = batch.targets.iter().map(|&(i, _)| i as i64).collect();
    let hidden = hidden
        .reshape([batch.b * batch.s, e])
        .select(0, Tensor::from_data(TensorData::new(rows, [n]), device)); // [n, e]
    let logits = model.logits(hidden.unsqueeze::<3>()); // [1, n, vocab]
    let vocab = logits.dims()[2];
    logits.reshape([n, vocab])
}

/// The batch's target ids `[n]`, in target order.
pub fn target_ids<B: burn::tensor::backend::Backend>(
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let targets: Vec<i64> = batch.targets.iter().map(|&(_, t)| t as i64).collect();
    Tensor::from_data(TensorData::new(targets, [batch.targets.len()]), device)
}

/// Summed NLL of `labels` `[n]` under `logits` `[n, vocab]` (a scalar tensor).
pub fn nll<B: burn::tensor::backend::Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = labels.dims()[0];
    log_softmax(logits, 1)
        .gather(1, labels.reshape([n, 1]))
        .sum()
        .neg()
}

/// Summed next-token NLL over the batch's trained tokens (a scalar tensor).
pub fn batch_nll<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    nll(
        target_logits(model, batch, device),
        target_ids(batch, device),
    )
}

/// Mean NLL per trained token over `batches` (0 when there are none).
pub(crate) fn val_loss<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batches: &[Batch],
    device: &B::Device,
) -> f64 {
    let (mut nll, mut tokens) = (0.0, 0);
    for b in batches.iter().filter(|b| b.loss_tokens() > 0) {
        nll += batch_nll(model, b, device).into_scalar().elem::<f64>();
        tokens += b.loss_tokens();
    }
    if tokens == 0 {
        0.0
    } else {
        nll / tokens as f64
    }
}

/// Adds the adapters' gradients in `g` to `grads`, keyed `{module}.lora_A` / `.lora_B`.
pub(crate) fn accumulate_lora_grads<B: AutodiffBackend>(
    model: &LlamaForCausalLM<B>,
    g: &B::Gradients,
    grads: &mut BTreeMap<String, Tensor<B::InnerBackend, 2>>,
) {
    for (name, l) in model.linears() {
        let Some(lora) = &l.lora else { continue };
        for (half, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            if let Some(grad) = p.val().grad(g) {
                accumulate(grads, format!("{name}.{half}"), grad);
            }
        }
    }
}

/// Adds `grad` to the running sum under `key`.
pub(crate) fn accumulate<B: burn::tensor::backend::Backend>(
    grads: &mut BTreeMap<String, Tensor<B, 2>>,
    key: String,
    grad: Tensor<B, 2>,
) {
    let sum = match grads.remove(&key) {
        Some(acc) => acc + grad,
        None => grad,
    };
    grads.insert(key, sum);
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before clipping.
pub(crate) fn clip<B: burn::tensor::backend::Backend>(
    grads: &mut BTreeMap<String, Tensor<B, 2>>,
    max_norm: f64,
) -> f64 {
    let norm = grads
        .values()
        .map(|g| g.clone().powi_scalar(2).sum().into_scalar().elem::<f64>())
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = g.clone() * coef;
        }
    }
    norm
}

/// One AdamW step over the adapters, grouped by decoder layer.
pub(crate) fn update<B>(
    model: &mut LlamaForCausalLM<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    mut grads: BTreeMap<String, Tensor<B::InnerBackend, 2>>,
    lr: f64,
    r: &Recipe,
) where
    B: AutodiffBackend + QuantBackend,
{
    let mut groups: BTreeMap<usize, Vec<ParamGrad<B::InnerBackend>>> = BTreeMap::new();
    for (name, l) in model.linears() {
        let Some(lora) = &l.lora else { continue };
        let layer = name
            .split('.')
            .nth(2)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        for (half, p) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            let key = format!("{name}.{half}");
            if let Some(grad) = grads.remove(&key) {
                groups.entry(layer).or_default().push(ParamGrad {
                    name: key,
                    value: p.val().inner(),
                    grad,
                    decay: true,
                });
            }
        }
    }
    let hp = AdamWParams {
        lr,
        betas: r.train.betas,
        eps: r.train.eps,
        weight_decay: r.train.weight_decay,
    };
    let mut new: BTreeMap<String, Tensor<B::InnerBackend, 2>> = optimizer
        .step(groups.into_values().collect(), &hp)
        .into_iter()
        .collect();
    for (name, lora) in model.loras_mut() {
        if let Some(a) = new.remove(&format!("{name}.lora_A")) {
            lora.lora_a = Param::from_tensor(Tensor::from_inner(a));
        }
        if let Some(b) = new.remove(&format!("{name}.lora_B")) {
            lora.lora_b = Param::from_tensor(Tensor::from_inner(b));
        }
    }
}

/// Exact match of the task's held-out split (first `eval.limit` examples).
fn score<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &TextTokenizer,
    task: &tasks::Task,
    r: &Recipe,
) -> Result<ExactMatch> {
    let mut examples = task.test_examples();
    if let Some(limit) = r.eval.limit {
        examples.truncate(limit);
    }
    exact_match(
        model,
        tokenizer,
        &examples,
        r.eval.max_new_tokens,
        r.eval.batch_size,
    )
    .map_err(TrainError::from)
}

/// Reads and tokenizes the recipe's data: a bundled task, one file, or a mixture of files
/// (each with its own layout and validation split).
pub(crate) fn load_data<B: burn::tensor::backend::Backend>(
    loaded: &LoadedRecipe,
    pretrained: &Pretrained<B>,
) -> Result<Dataset> {
    let d = &loaded.recipe.data;
    let mut task = None;
    // (train records, validation records if a file gives them, the key named in errors)
    let mut sources: Vec<(Vec<Record>, Option<Vec<Record>>, String)> = Vec::new();
    if let Some(name) = &d.task {
        let t = tasks::find(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "data.task: unknown task {name:?}; bundled tasks: {}",
                tasks::names()
            ))
        })?;
        let records = data::parse_jsonl(t.train, data::Format::Completion, name)?;
        sources.push((records, None, "data.task".into()));
        task = Some(t);
    } else if let Some(train) = &d.train {
        let records = data::read_jsonl(&loaded.resolve(train), d.format).at("data.train")?;
        let val = match &d.val {
            Some(v) => Some(data::read_jsonl(&loaded.resolve(v), d.format).at("data.val")?),
            None => None,
        };
        sources.push((records, val, "data.train".into()));
    }
    for (i, m) in d.mix.iter().enumerate() {
        let key = format!("data.mix[{i}]");
        let records = data::read_jsonl(&loaded.resolve(&m.train), m.format)
            .at_with(|| format!("{key}.train"))?;
        let val = match &m.val {
            Some(v) => Some(
                data::read_jsonl(&loaded.resolve(v), m.format).at_with(|| format!("{key}.val"))?,
            ),
            None => None,
        };
        sources.push((records, val, key));
    }
    let encoder = Encoder {
        tokenizer: &pretrained.tokenizer,
        template: pretrained.chat_template.as_ref(),
        eos: pretrained.tokenizer.eos_ids.first().copied(),
        train_on_prompt: d.train_on_prompt,
        max_seq_len: d.max_seq_len.min(pretrained.config.max_position_embeddings),
    };
    let mut truncated = 0;
    let mut encode = |rs: &[Record]| -> Result<Vec<Tokenized>> {
        rs.iter()
            .map(|rec| {
                let (t, cut) = encoder.encode(rec)?;
                truncated += cut as usize;
                Ok(t)
            })
            .collect()
    };
    let mut train = Vec::new();
    let mut vals: Vec<Vec<Tokenized>> = Vec::new();
    for (records, val_records, key) in sources {
        let all = encode(&records).at(&key)?;
        if all.is_empty() {
            return Err(TrainError::Invalid(format!("{key}: no training examples")));
        }
        let mut val = Vec::new();
        match val_records {
            Some(v) => {
                train.extend(all);
                val.extend(encode(&v).at(&key)?);
            }
            None => {
                // A seeded share of the training examples is held out.
                let n_val =
                    ((all.len() as f64 * d.val_fraction).round() as usize).min(all.len() - 1);
                let mut order: Vec<usize> = (0..all.len()).collect();
                shuffle(&mut order, loaded.recipe.train.seed ^ 0x7A1);
                let held: std::collections::HashSet<usize> =
                    order[..n_val].iter().copied().collect();
                for (i, t) in all.into_iter().enumerate() {
                    if held.contains(&i) {
                        val.push(t);
                    } else {
                        train.push(t);
                    }
                }
            }
        }
        vals.push(val);
    }
    // The sources' validation examples take turns, so that `data.val_limit` samples them all.
    let longest = vals.iter().map(Vec::len).max().unwrap_or(0);
    let mut iters: Vec<_> = vals.into_iter().map(Vec::into_iter).collect();
    let mut val = Vec::new();
    for _ in 0..longest {
        for it in iters.iter_mut() {
            val.extend(it.next());
        }
    }
    if truncated > 0 {
        tracing::info!(
            "{truncated} examples were truncated to data.max_seq_len = {}",
            d.max_seq_len
        );
    }
    Ok(Dataset {
        train,
        val,
        truncated,
        task,
    })
}

/// The step progress bar.
pub(crate) fn progress(total: usize, at: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("step {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    bar
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::backend::Backend;
    use burn::tensor::Distribution;
    use ft_model::tiny::{tiny_config, write_hf_folder};
    use ft_model::Linear;

    use super::*;
    use crate::recipe;

    fn tokens(ids: &[u32]) -> Tokenized {
        Tokenized::all_trained(ids.to_vec())
    }

    /// A tiny model with rank-4 adapters on every target, B randomized so that every LoRA
    /// parameter has a gradient.
    fn adapted<B: AutodiffBackend + QuantBackend>(device: &B::Device) -> LlamaForCausalLM<B> {
        B::seed(device, 5);
        let model = LlamaForCausalLM::<B>::init_random(&tiny_config(), device).no_grad();
        with_adapters(model, device)
    }

    /// `model` with rank-4 adapters on every target, B drawn at random.
    fn with_adapters<B: AutodiffBackend + QuantBackend>(
        mut model: LlamaForCausalLM<B>,
        device: &B::Device,
    ) -> LlamaForCausalLM<B> {
        let targets = ft_model::adapter::TARGETS.map(String::from);
        model
            .add_lora(&LoraConfig::new(4, 8.0), &targets, None)
            .unwrap();
        for (_, lora) in model.loras_mut() {
            let shape = lora.lora_b.dims();
            lora.lora_b = Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.1),
                device,
            ));
        }
        model
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        type A = Autodiff<NdArray<f64>>;
        let device = Default::default();
        let model = adapted::<A>(&device);
        let batch = Batch::new(
            &[
                vec![&tokens(&[5, 70, 200, 9, 33, 100])],
                vec![&tokens(&[8, 1, 2])],
            ],
            0,
        );
        let loss = batch_nll(&model, &batch, &device);
        let grads = loss.backward();
        // L(p + t u) for one LoRA matrix p moved along direction u.
        let loss_along = |name: &str, half: usize, u: &[f64], t: f64| {
            let mut m = model.clone();
            for (n, lora) in m.loras_mut() {
                if n == name {
                    let p = if half == 0 {
                        &mut lora.lora_a
                    } else {
                        &mut lora.lora_b
                    };
                    let v: Vec<f64> = p.val().into_data().convert::<f64>().to_vec().unwrap();
                    let v: Vec<f64> = v.iter().zip(u).map(|(x, d)| x + t * d).collect();
                    *p = Param::from_tensor(Tensor::from_data(
                        TensorData::new(v, p.dims()),
                        &device,
                    ));
                }
            }
            batch_nll(&m, &batch, &device).into_scalar().elem::<f64>()
        };
        // Directional derivatives, along the gradient and along a fixed pseudo-random unit
        // direction, by central differences: burn's CPU kernels compute some activations (exp)
        // in f32 even on an f64 backend, so single-element differences drown in that rounding;
        // a whole-matrix direction keeps the signal far above it.
        let mut checked = 0;
        for (name, l) in model.linears() {
            let lora = l.lora.as_ref().unwrap();
            for (half, p) in [&lora.lora_a, &lora.lora_b].into_iter().enumerate() {
                let g: Vec<f64> = p
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .convert::<f64>()
                    .to_vec()
                    .unwrap();
                let unit = |v: Vec<f64>| {
                    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                    v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
                };
                let random: Vec<f64> = (0..g.len())
                    .map(|i| ((i * 7919 + 13) % 101) as f64 - 50.0)
                    .collect();
                for u in [unit(g.clone()), unit(random)] {
                    let central = |h: f64| {
                        (loss_along(&name, half, &u, h) - loss_along(&name, half, &u, -h))
                            / (2.0 * h)
                    };
                    // Richardson extrapolation cancels the O(h^2) error of the quotient.
                    let fd = (4.0 * central(0.025) - central(0.05)) / 3.0;
                    let an: f64 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
                    assert!(
                        (fd - an).abs() <= 3e-4 + 1e-2 * an.abs(),
                        "{name} {half}: fd {fd} vs {an}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 7 * 2 * 2);
    }

    #[test]
    fn a_packed_base_gives_the_lora_gradients_of_its_dense_copy() {
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let base = LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &device);
        write_hf_folder(&base, &tiny_config(), dir.path()).unwrap();
        let spec = QuantSpec {
            format: QuantFormat::Nf4,
            double_quant: true,
        };
        let packed = Pretrained::<A>::load(dir.path(), Some(spec), &device)
            .unwrap()
            .model
            .no_grad();
        // The same adapters on both: the backend RNG is shared with tests running alongside,
        // so the copy is made after the draw rather than by drawing again.
        let packed = with_adapters(packed, &device);
        let mut dense = packed.clone();
        for layer in dense.model.layers.iter_mut() {
            for (_, l) in layer.parts_mut().0 {
                assert_eq!(l.base.format(), QuantFormat::Nf4);
                l.base = Linear::dense(l.base.weight(&device), None).no_grad();
            }
        }
        let batch = Batch::new(&[vec![&tokens(&[5, 70, 200, 9, 33, 100, 4])]], 0);
        let grads_of = |model: LlamaForCausalLM<A>| {
            let g = batch_nll(&model, &batch, &device).backward();
            model
                .linears()
                .iter()
                .flat_map(|(_, l)| {
                    let lora = l.lora.as_ref().unwrap();
                    [
                        lora.lora_a.val().grad(&g).unwrap(),
                        lora.lora_b.val().grad(&g).unwrap(),
                    ]
                })
                .map(|t| t.into_data().to_vec::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        let (from_packed, from_dense) = (grads_of(packed), grads_of(dense));
        for (p, d) in from_packed.iter().zip(&from_dense) {
            for (x, y) in p.iter().zip(d) {
                assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn a_tiny_run_overfits_and_leaves_the_base_bit_identical() {
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
