//! The distillation run: `[model]` is the frozen teacher, the student is made of the teacher's
//! layers (DistilBERT, Sanh et al. 2019, arXiv:1910.01108) or is another model with the same
//! tokenizer, and each step trains the student on
//! `alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)` ([`ft_distill::losses`]).
//!
//! The teacher's logits come online (a teacher forward per batch, every logit) or offline (its
//! top-k logits at every trained position computed once into a cache file that later epochs
//! and later runs reuse). With `lmbda > 0`, that share of steps trains on completions the
//! student samples itself, scored by the teacher (on-policy distillation, GKD: Agarwal et al.
//! 2024, arXiv:2306.13649); those steps use the divergence alone, as labels are the student's
//! own tokens. The student trains in full (every dense weight, AdamW, no weight decay on norms)
//! or through `[lora]` adapters. The batching, schedule, clipping and accumulation are the
//! training loop's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use ft_adapters::registry::AddInfo;
use ft_adapters::LoraConfig;
use ft_distill::{
    check_same_tokenizer, student_from_teacher, DistillLoss, Divergence, StudentInit,
    TeacherLogits, TopKCache,
};
use ft_eval::tasks::SplitMix64;
use ft_model::{LlamaForCausalLM, Pretrained, QuantBackend};
use ft_serve::{generate, Sampler, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState};
use crate::data::{self, Batch, Encoder, Format, Tokenized};
use crate::error::{write_atomic, At, Result, TrainError};
use crate::memory::MemoryReport;
use crate::metrics::Metrics;
use crate::optim::{AdamW, StateBytes};
use crate::plan::Plan;
use crate::recipe::{
    DistillMethod, DistillMode, DistillSection, DivergenceKind, Engine, LoadedRecipe,
    OptimizerKind, Recipe, StudentLayers,
};

use super::host_step::{HostStep, Scorer};
use super::loss::{nll, target_ids, target_logits};
use super::setup::{
    check_lora_shape, load_data, peft_config, prepare, progress, quant_spec, register,
};
use super::step_loop::{run_steps, Objective, Run};
use super::trainables::Trainables;

/// Tokens per perplexity window over `eval_texts`, as the reference protocol uses (fewer
/// when a model's context is shorter).
const WINDOW: usize = 256;

/// Perplexity of one held-out text under the teacher and the student before and after.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextScore {
    /// The file, as the recipe names it.
    pub file: String,
    /// Tokens scored.
    pub scored: usize,
    /// The teacher's perplexity.
    pub teacher: f64,
    /// The student's before training.
    pub student_before: f64,
    /// The student's after training.
    pub student_after: f64,
}

/// What a finished distillation run reports in `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistillSummary {
    /// Mean training loss over the last 10% of steps (at least one).
    pub train_loss: f64,
    /// The student's validation cross-entropy after training.
    pub val_loss: f64,
    /// The same before training.
    pub val_loss_before: f64,
    /// The teacher's validation cross-entropy.
    pub teacher_val_loss: f64,
    /// Perplexity of each `distill.eval_texts` file.
    pub texts: Vec<TextScore>,
    /// Teacher decoder layers.
    pub teacher_layers: usize,
    /// Student decoder layers.
    pub student_layers: usize,
    /// Bytes of every teacher weight as stored (quantized blocks count packed).
    pub teacher_weight_bytes: usize,
    /// Bytes of every student weight (f32).
    pub student_weight_bytes: usize,
    /// Parameters trained.
    pub trainable_params: usize,
    /// Steps whose batches the student sampled (on-policy).
    pub on_policy_steps: usize,
    /// Seconds spent building the offline teacher cache (0 when reused or online).
    pub cache_build_s: f64,
    /// Non-padding tokens per second of training (teacher, student forward and backward,
    /// update).
    pub train_tokens_per_s: f64,
    /// Peak resident set size of the process.
    pub peak_rss_bytes: u64,
    /// Seconds of training steps.
    pub train_s: f64,
    /// Wall time of the whole run.
    pub wall_s: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Where the optimizer's state lives.
    pub optimizer_state: StateBytes,
    /// Device-resident bytes (teacher and student weights, ...) against host bytes.
    pub memory: MemoryReport,
    /// Examples truncated to max_seq_len.
    pub truncated_examples: usize,
    /// The student folder written (full training, or a student made of teacher layers).
    pub student_dir: Option<PathBuf>,
}

/// Runs a recipe with a `[distill]` section on backend `B` (an autodiff backend).
pub fn distill<B>(loaded: &LoadedRecipe, device: &B::Device) -> Result<DistillSummary>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
{
    let started = Instant::now();
    let r = &loaded.recipe;
    let d = r.distill.as_ref().ok_or_else(|| {
        TrainError::Invalid("distill: the recipe has no [distill] section".into())
    })?;
    let out = r.output.dir.clone();
    if d.method == DistillMethod::Full && r.output.registry.is_some() {
        return Err(TrainError::Invalid(
            "output.registry: the registry holds adapters; a student trained in full is written \
             as a model folder (leave output.registry out or set distill.method = \"lora\")"
                .into(),
        ));
    }
    let resume = prepare::<B>(r)?;
    let teacher =
        Pretrained::<B::InnerBackend>::from_source(&r.model.source, quant_spec(r)?, device)
            .at_with(|| format!("model.source {}", r.model.source))?;
    let mut student = load_student::<B>(r, d, resume.as_deref(), device)?;
    let from_layers = d.student.is_none();
    check_same_tokenizer(
        (&teacher.config, &teacher.tokenizer),
        (&student.config, &student.tokenizer),
    )
    .at("distill.student")?;
    let data = load_data(loaded, &teacher)?;
    write_atomic(&out.join("recipe.toml"), r.to_toml().as_bytes())?;
    let context = student
        .config
        .max_position_embeddings
        .min(teacher.config.max_position_embeddings);
    if r.data.max_seq_len > context {
        return Err(TrainError::Invalid(format!(
            "data.max_seq_len: {} exceeds the context both models share ({context} tokens)",
            r.data.max_seq_len
        )));
    }
    if d.mode == DistillMode::Offline && d.top_k > teacher.config.vocab_size {
        return Err(TrainError::Invalid(format!(
            "distill.top_k: at most the teacher's vocabulary of {} tokens, got {}",
            teacher.config.vocab_size, d.top_k
        )));
    }
    if d.lmbda > 0.0 && r.data.max_seq_len + d.max_new_tokens > context {
        return Err(TrainError::Invalid(format!(
            "distill.max_new_tokens: data.max_seq_len ({}) plus {} sampled tokens exceed the \
             context both models share ({context} tokens)",
            r.data.max_seq_len, d.max_new_tokens
        )));
    }
    B::seed(device, r.train.seed);

    let mut model = student.model.clone();
    if d.method == DistillMethod::Lora {
        model = model.no_grad();
        check_lora_shape(r, &student.config)?;
        let lora = LoraConfig::from(&r.lora);
        let adapted = model.add_lora(&lora, &r.lora.targets, r.lora.layers.as_deref())?;
        if adapted.is_empty() {
            return Err(TrainError::Invalid(
                "lora.targets and lora.layers select no module of the student".into(),
            ));
        }
    }
    let trainables = match d.method {
        DistillMethod::Full => Trainables::Full,
        DistillMethod::Lora => Trainables::Lora,
    };
    let trainable = trainables.count(&mut model);
    let mut optimizer = AdamW::<B::InnerBackend>::new(
        r.train.optimizer == OptimizerKind::PagedAdamW,
        r.train.page_min_elements,
    );
    let mut state = TrainerState::default();
    if let Some(dir) = &resume {
        state = checkpoint::load_state(dir)?;
        if d.method == DistillMethod::Lora {
            checkpoint::load_adapters(dir, &mut model, device)?;
        }
        checkpoint::load_optimizer(dir, &mut optimizer, &state, device)?;
        tracing::info!("resuming from {} at step {}", dir.display(), state.step);
    }

    let pad = teacher.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let plan = Plan::new(r, &data.train);
    let total = plan.total_steps;
    let val_batches = plan.val_batches(&data.val, pad);
    let rows = r.train.micro_batch_size;
    let window = WINDOW.min(context);
    let eval_texts: Vec<EvalText> = d
        .eval_texts
        .iter()
        .map(|f| eval_text(loaded, f, &student, window))
        .collect::<Result<_>>()?;
    // A resumed run reports the figures its checkpoint kept from before training.
    // Evaluation runs on the host kernels unless the recipe asks for burn's.
    let on_host = r.train.engine != Engine::Burn;
    if resume.is_none() || state.distill.is_none() {
        let student_before = model.valid();
        let (teacher_scorer, student_scorer) = (
            Scorer::new(&teacher.model, on_host),
            Scorer::new(&student_before, on_host),
        );
        state.val_loss_before = student_scorer.mean_nll(&val_batches)?;
        let progress = state.distill.get_or_insert_with(Default::default);
        progress.teacher_val_loss = teacher_scorer.mean_nll(&val_batches)?;
        progress.texts_before = eval_texts
            .iter()
            .map(|t| {
                Ok((
                    text_perplexity(&teacher_scorer, t, rows)?.0,
                    text_perplexity(&student_scorer, t, rows)?.0,
                ))
            })
            .collect::<Result<_>>()?;
    }
    // Labels alone (alpha = 1) need no teacher logits, cached or not.
    let cache = match d.mode {
        DistillMode::Offline if d.alpha < 1.0 => {
            let t0 = Instant::now();
            let path = out.join("teacher-topk.safetensors");
            let (cache, built) = teacher_cache(r, d, &teacher, &data.train, pad, &path)?;
            if built {
                state
                    .distill
                    .get_or_insert_with(Default::default)
                    .cache_build_s += t0.elapsed().as_secs_f64();
            }
            Some(cache)
        }
        _ => None,
    };

    let before = state.distill.clone().unwrap_or_default();
    tracing::info!(
        "teacher val loss {:.4}, student before {:.4} ({} of {} layers)",
        before.teacher_val_loss,
        state.val_loss_before,
        student.config.num_hidden_layers,
        teacher.config.num_hidden_layers
    );
    if resume.is_none() && checkpoint::clear(&out)? {
        // Only now, once everything has loaded, so a run that fails to start destroys nothing.
        tracing::info!(
            "removed the checkpoints of an earlier run in {}",
            out.display()
        );
    }

    let loss_fn = DistillLoss {
        divergence: match d.loss {
            DivergenceKind::ForwardKl => Divergence::ForwardKl,
            DivergenceKind::ReverseKl => Divergence::ReverseKl,
            DivergenceKind::Jsd => Divergence::Jsd { beta: d.beta },
        },
        temperature: d.temperature,
        alpha: d.alpha,
    };
    let host = match r.train.engine {
        Engine::Burn => None,
        engine => {
            // The host step brings the teacher online; a cache of its top-k logits stays with
            // burn's autodiff.
            let online = d.mode == DistillMode::Online || d.alpha >= 1.0;
            let inner = model.valid();
            let step = match d.method {
                _ if !online => None,
                DistillMethod::Full => HostStep::everything(&inner),
                DistillMethod::Lora => HostStep::adapters(&inner),
            }
            .and_then(|s| s.with_teacher(&teacher.model, loss_fn));
            if step.is_none() && engine == Engine::Host {
                return Err(TrainError::usage(
                    "train.engine",
                    "\"auto\" or \"burn\" with an offline teacher or weights outside host \
                     memory (a GPU device)",
                    "\"host\"",
                ));
            }
            step
        }
    };
    tracing::info!(
        "student steps on {}",
        if host.is_some() {
            "the host kernels"
        } else {
            "burn's autodiff"
        }
    );
    let mut metrics = Metrics::open(&out, &r.output.loggers, resume.as_ref().map(|_| state.step))
        .map_err(|e| TrainError::io(&out, e))?;
    let run = Run {
        recipe: r,
        out: &out,
        device,
        train: &data.train,
        val_batches: &val_batches,
        pad,
        trainables,
    };
    let mut objective = Distillation {
        recipe: r,
        section: d,
        teacher: &teacher,
        cache: cache.as_ref(),
        student: &mut student,
        train: &data.train,
        pad,
        loss: loss_fn,
        on_policy: false,
        host,
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

    let after = model.valid();
    let after_scorer = Scorer::new(&after, on_host);
    let progress = state.distill.clone().unwrap_or_default();
    let texts: Vec<TextScore> = eval_texts
        .iter()
        .zip(&progress.texts_before)
        .map(|(t, &(teacher, before))| {
            let (ppl, scored) = text_perplexity(&after_scorer, t, rows)?;
            Ok(TextScore {
                file: t.file.clone(),
                scored,
                teacher,
                student_before: before,
                student_after: ppl,
            })
        })
        .collect::<Result<_>>()?;
    for t in &texts {
        tracing::info!(
            "perplexity of {}: teacher {:.3}, student before {:.3}, after {:.3}",
            t.file,
            t.teacher,
            t.student_before,
            t.student_after
        );
    }

    let student_layers = student.config.num_hidden_layers;
    let mut student_dir = None;
    if d.method == DistillMethod::Lora {
        // The adapter's layer numbers are the student's: its base is the student, never the
        // teacher.
        let mut config = peft_config(r, &model);
        config.base_model_name_or_path = Some(match &d.student {
            Some(source) => ft_model::source::hub_id(source),
            None => out.join("student").display().to_string(),
        });
        model.to_peft(config).write(&out)?;
    }
    if d.method == DistillMethod::Full || from_layers {
        let dir = out.join("student");
        if d.method == DistillMethod::Full {
            student.model = model.clone();
        }
        student.save_hf(&dir).at("writing the student")?;
        tracing::info!("student written to {}", dir.display());
        student_dir = Some(dir);
    }

    let tail = (state.losses.len() / 10)
        .max(1)
        .min(state.losses.len().max(1));
    let summary = DistillSummary {
        train_loss: state.losses.iter().rev().take(tail).sum::<f64>() / tail as f64,
        val_loss: state.val_loss,
        val_loss_before: state.val_loss_before,
        teacher_val_loss: progress.teacher_val_loss,
        texts,
        teacher_layers: teacher.config.num_hidden_layers,
        student_layers,
        teacher_weight_bytes: teacher.model.weight_bytes(),
        student_weight_bytes: after.weight_bytes(),
        trainable_params: trainable,
        on_policy_steps: progress.on_policy_steps,
        cache_build_s: progress.cache_build_s,
        train_tokens_per_s: state.train_tokens as f64 / state.train_s.max(1e-9),
        peak_rss_bytes: ft_eval::rss::peak_rss_bytes(),
        train_s: state.train_s,
        wall_s: started.elapsed().as_secs_f64(),
        steps: total,
        optimizer_state: optimizer.state_bytes(),
        memory: MemoryReport::new(
            // A student trained in full: its weights are the trainable parameters.
            teacher.model.weight_bytes()
                + match d.method {
                    DistillMethod::Full => after.weight_bytes().saturating_sub(4 * trainable),
                    DistillMethod::Lora => after.weight_bytes(),
                },
            trainable,
            optimizer.state_bytes(),
        ),
        truncated_examples: data.truncated,
        student_dir,
    };
    let json = serde_json::to_string_pretty(&summary)?;
    write_atomic(&out.join("summary.json"), json.as_bytes())?;
    if let (Some(dir), DistillMethod::Lora) = (&r.output.registry, d.method) {
        let info = AddInfo {
            task: r.data.task.clone(),
            base_model: Some(match &d.student {
                Some(source) => ft_model::source::hub_id(source),
                None => out.join("student").display().to_string(),
            }),
            base_sha256: None,
            recipe: Some(r.to_toml()),
            metrics: Some(serde_json::to_value(&summary)?),
        };
        register(dir, &out, &r.output.adapter_name, info)?;
    }
    Ok(summary)
}

/// Distillation: the student's loss against the teacher's logits (online, or from the
/// offline cache) and the labels, as `distill.alpha` mixes them; an on-policy step (a
/// `distill.lmbda` share) trains on completions the student samples, by the divergence alone.
struct Distillation<'a, B: AutodiffBackend>
where
    B::InnerBackend: QuantBackend,
{
    recipe: &'a Recipe,
    section: &'a DistillSection,
    teacher: &'a Pretrained<B::InnerBackend>,
    cache: Option<&'a TopKCache>,
    /// The student's container: a checkpoint of a student trained in full writes it whole.
    student: &'a mut Pretrained<B>,
    train: &'a [Tokenized],
    pad: u32,
    loss: DistillLoss,
    /// Whether this step samples its batches from the student.
    on_policy: bool,
    /// The host step, where it can run this distillation (on-policy steps stay with burn's
    /// autodiff).
    host: Option<HostStep<B::InnerBackend>>,
}

impl<B> Objective<B> for Distillation<'_, B>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
{
    fn begin_step(&mut self, step: usize) {
        let seed = self.recipe.train.seed;
        self.on_policy = self.section.lmbda > 0.0 && unit(seed, step) < self.section.lmbda;
    }

    fn batch(
        &mut self,
        model: &LlamaForCausalLM<B>,
        step: usize,
        index: usize,
        drawn: Batch,
    ) -> Batch {
        if !self.on_policy {
            return drawn;
        }
        let seed = self.recipe.train.seed ^ ((step as u64) << 16 | index as u64);
        let stops = &self.teacher.tokenizer.eos_ids;
        sampled_batch(
            &model.valid(),
            &drawn,
            self.train,
            self.section,
            stops,
            self.pad,
            seed,
            &self.recipe.length_buckets(),
        )
    }

    fn loss(&self, model: &LlamaForCausalLM<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        let step_loss = if self.on_policy {
            DistillLoss {
                alpha: 0.0,
                ..self.loss
            }
        } else {
            self.loss
        };
        let logits = target_logits(model, batch, device);
        let labels = target_ids::<B>(batch, device);
        if step_loss.alpha >= 1.0 {
            return nll(logits, labels);
        }
        let teacher_logits = match self.cache {
            Some(cache) => cached_logits::<B>(cache, batch, device),
            None => TeacherLogits::Full(Tensor::from_inner(target_logits(
                &self.teacher.model,
                batch,
                device,
            ))),
        };
        step_loss.forward(logits, teacher_logits, labels)
    }

    fn scalars(&self) -> Vec<(&'static str, f64)> {
        vec![("train/on_policy", f64::from(u8::from(self.on_policy)))]
    }

    fn end_step(&mut self, state: &mut TrainerState) {
        if self.on_policy {
            state
                .distill
                .get_or_insert_with(Default::default)
                .on_policy_steps += 1;
        }
    }

    fn host(&self) -> Option<&HostStep<B::InnerBackend>> {
        self.host.as_ref().filter(|_| !self.on_policy)
    }

    fn save(&mut self, model: &LlamaForCausalLM<B>, dir: &Path) -> Result<()> {
        match self.section.method {
            DistillMethod::Full => {
                self.student.model = model.clone();
                Ok(self.student.save_hf(&dir.join("student"))?)
            }
            DistillMethod::Lora => Ok(model.to_peft(peft_config(self.recipe, model)).write(dir)?),
        }
    }
}

/// The student (dense f32, on the autodiff backend): a checkpoint's student folder when a run
/// that trains in full resumes, else `distill.student`, else the chosen teacher layers.
fn load_student<B>(
    r: &Recipe,
    d: &DistillSection,
    resume: Option<&Path>,
    device: &B::Device,
) -> Result<Pretrained<B>>
where
    B: AutodiffBackend + QuantBackend,
{
    if let (Some(dir), DistillMethod::Full) = (resume, d.method) {
        let folder = dir.join("student");
        return Pretrained::<B>::load(&folder, None, device)
            .at_with(|| format!("train.resume: {}", folder.display()));
    }
    if let Some(source) = &d.student {
        return Pretrained::<B>::from_source(source, None, device)
            .at_with(|| format!("distill.student {source}"));
    }
    let mut dense = Pretrained::<B>::from_source(&r.model.source, None, device)
        .at_with(|| format!("model.source {}", r.model.source))?;
    let init = match &d.init {
        StudentLayers::Named(_) => StudentInit::EveryOtherLayer,
        StudentLayers::List(layers) => StudentInit::Layers(layers.clone()),
    };
    let (model, config) =
        student_from_teacher(&dense.model, &dense.config, &init).at("distill.init")?;
    dense.model = model;
    dense.config = config;
    Ok(dense)
}

/// A uniform draw in [0, 1) that depends only on the seed and the step (so a resumed run
/// makes the same on-policy choices).
fn unit(seed: u64, step: usize) -> f64 {
    let mut rng = SplitMix64(seed ^ 0x6B2D_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9));
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Trained positions of one example (each predicts a trained token from the ones before).
fn trained_positions(t: &Tokenized) -> usize {
    t.train.iter().skip(1).filter(|&&x| x).count()
}

/// The offline teacher: read from `path` when it matches the teacher and the data, otherwise
/// computed over the training examples in order and written. Returns whether it was built.
fn teacher_cache<B: QuantBackend>(
    r: &Recipe,
    d: &DistillSection,
    teacher: &Pretrained<B>,
    train: &[Tokenized],
    pad: u32,
    path: &Path,
) -> Result<(TopKCache, bool)> {
    let id = format!(
        "{} ({}), data sha256 {}",
        r.model.source,
        r.quant.base,
        fingerprint(train)
    );
    let vocab = teacher.config.vocab_size;
    if path.is_file() {
        match TopKCache::read(path, &id, vocab) {
            Ok(cache) if cache.k == d.top_k && matches_data(&cache, train) => {
                tracing::info!(
                    "reusing the teacher's top-{} logits in {}",
                    cache.k,
                    path.display()
                );
                return Ok((cache, false));
            }
            Ok(_) => tracing::info!(
                "{} was made for other data or another k; computing it again",
                path.display()
            ),
            Err(e) => tracing::info!("{e}; computing the teacher cache again"),
        }
    }
    let device = teacher.model.device();
    let mut cache = TopKCache::new(d.top_k, vocab, &id);
    let bar = progress(train.len(), 0);
    bar.set_message(format!("teacher top-{} logits", d.top_k));
    // Examples packed in order into rows of max_seq_len (each attends only to itself), so
    // the teacher reads little padding; targets come out in example order. The rows are
    // padded up to the length buckets, as training batches are.
    let lengths: Vec<usize> = train.iter().map(|t| t.ids.len()).collect();
    let layout = data::rows(&lengths, true, r.data.max_seq_len);
    let buckets = r.length_buckets();
    let mut done = 0;
    for chunk in layout.chunks(r.train.micro_batch_size.max(1)) {
        let rows: Vec<Vec<&Tokenized>> = chunk
            .iter()
            .map(|row| row.iter().map(|&i| &train[i]).collect())
            .collect();
        let batch = Batch::with_buckets(&rows, pad, &buckets);
        let logits: Vec<f32> = if batch.loss_tokens() == 0 {
            Vec::new()
        } else {
            target_logits(&teacher.model, &batch, &device)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| TrainError::Invalid(format!("teacher logits: {e:?}")))?
        };
        let mut at = 0;
        for &i in chunk.iter().flatten() {
            let n = trained_positions(&train[i]) * vocab;
            cache.push_example(&logits[at..at + n]);
            at += n;
        }
        done += chunk.iter().map(Vec::len).sum::<usize>();
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    cache.write(path).at("writing the teacher cache")?;
    Ok((cache, true))
}

/// sha256 of every token id and trained flag of `train`: a cache made from other data (or
/// the same data tokenized or truncated differently) is not reused.
fn fingerprint(train: &[Tokenized]) -> String {
    let mut bytes = Vec::new();
    for t in train {
        bytes.extend((t.ids.len() as u64).to_le_bytes());
        for (&id, &trained) in t.ids.iter().zip(&t.train) {
            bytes.extend((u64::from(id) << 1 | u64::from(trained)).to_le_bytes());
        }
    }
    ft_adapters::registry::sha256_hex(&bytes)
}

/// Whether `cache` holds exactly the trained positions of `train`.
fn matches_data(cache: &TopKCache, train: &[Tokenized]) -> bool {
    cache.len() == train.len()
        && train.iter().enumerate().all(|(i, t)| {
            cache
                .example(i)
                .is_some_and(|(ids, _)| ids.len() == trained_positions(t) * cache.k)
        })
}

/// The cached top-k teacher logits of a training batch, in target order.
fn cached_logits<B: AutodiffBackend>(
    cache: &TopKCache,
    batch: &Batch,
    device: &B::Device,
) -> TeacherLogits<B> {
    let (mut ids, mut logits) = (Vec::new(), Vec::new());
    for &e in &batch.examples {
        if let Some((i, l)) = cache.example(e) {
            ids.extend(i.iter().map(|&x| x as i64));
            logits.extend_from_slice(l);
        }
    }
    let (n, k) = (batch.loss_tokens(), cache.k);
    TeacherLogits::TopK {
        logits: Tensor::from_data(
            TensorData::new(logits, [n, k]).convert::<B::FloatElem>(),
            device,
        ),
        ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, k]), device),
    }
}

/// The batch's examples with their completions replaced by ones the student samples: each
/// keeps its prompt (the untrained head; for plain text, its first half up to 64 tokens) and
/// trains on up to `max_new_tokens` sampled tokens (and the stop token that ended them, if one
/// did). The batch is padded up to `buckets` as the drawn ones are.
#[allow(clippy::too_many_arguments)]
fn sampled_batch<B: QuantBackend>(
    student: &LlamaForCausalLM<B>,
    batch: &Batch,
    train: &[Tokenized],
    d: &DistillSection,
    stops: &[u32],
    pad: u32,
    seed: u64,
    buckets: &[usize],
) -> Batch {
    let docs: Vec<Tokenized> = batch
        .examples
        .iter()
        .enumerate()
        .map(|(row, &e)| {
            let t = &train[e];
            let first_trained = t.train.iter().position(|&x| x).unwrap_or(t.ids.len());
            let cut = if first_trained <= 1 {
                (t.ids.len() / 2).clamp(1, 64)
            } else {
                first_trained
            };
            if t.ids.is_empty() {
                return t.clone();
            }
            let prompt = &t.ids[..cut.min(t.ids.len())];
            let mut sampler = Sampler::new(SamplingParams {
                temperature: d.sample_temperature as f32,
                top_k: 0,
                top_p: 1.0,
                seed: seed.wrapping_mul(31).wrapping_add(row as u64),
            });
            let sampled = generate(
                student,
                prompt,
                d.max_new_tokens,
                stops,
                &mut sampler,
                |_| {},
            );
            let mut ids = prompt.to_vec();
            ids.extend(&sampled.ids);
            ids.extend(sampled.stop);
            let mut flags = vec![false; prompt.len()];
            flags.resize(ids.len(), true);
            Tokenized { ids, train: flags }
        })
        .collect();
    let rows: Vec<Vec<&Tokenized>> = docs.iter().map(|t| vec![t]).collect();
    Batch::with_buckets(&rows, pad, buckets)
}

/// A held-out text cut into documents, each scored on its own: windows of [`WINDOW`] tokens
/// of a plain text file (the reference perplexity protocol), or one document per JSONL record
/// (rendered in its own layout, chat records through the chat template).
struct EvalText {
    /// The file as the recipe names it.
    file: String,
    /// Every token of each document is scored from the ones before it.
    docs: Vec<Tokenized>,
    /// Longest document, and the row length documents are packed into.
    window: usize,
}

/// Reads and tokenizes one `distill.eval_texts` file.
fn eval_text<B: Backend>(
    loaded: &LoadedRecipe,
    file: &Path,
    model: &Pretrained<B>,
    window: usize,
) -> Result<EvalText> {
    let path = loaded.resolve(file);
    let name = file.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TrainError::io(&path, e))
        .at("distill.eval_texts")?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        let ids = model.tokenizer.encode(&text)?;
        let docs = ids
            .chunks(window)
            .map(|w| Tokenized::all_trained(w.to_vec()))
            .collect();
        return Ok(EvalText {
            file: name,
            docs,
            window,
        });
    }
    let format = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| {
            [
                ("messages", Format::Chat),
                ("text", Format::Text),
                ("prompt", Format::Completion),
                ("instruction", Format::Alpaca),
            ]
            .into_iter()
            .find(|(key, _)| v.get(key).is_some())
            .map(|(_, f)| f)
        })
        .ok_or_else(|| {
            TrainError::Invalid(format!(
                "distill.eval_texts: {}: expected JSONL records with messages, text, prompt \
                 or instruction",
                path.display()
            ))
        })?;
    let records = data::parse_jsonl(&text, format, &Default::default(), &name)?;
    let encoder = Encoder {
        tokenizer: &model.tokenizer,
        template: model.chat_template.as_ref(),
        eos: model.tokenizer.eos_ids.first().copied(),
        train_on_prompt: true,
        max_seq_len: window,
    };
    let docs = records
        .iter()
        .map(|rec| {
            encoder
                .encode(rec)
                .map(|(t, _)| Tokenized::all_trained(t.ids))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EvalText {
        file: name,
        docs,
        window,
    })
}

/// Perplexity of a held-out text and the tokens scored: its documents packed into rows of
/// its window (each attending only to itself), `rows` rows per forward.
fn text_perplexity<B: QuantBackend>(
    scorer: &Scorer<B>,
    text: &EvalText,
    rows: usize,
) -> Result<(f64, usize)> {
    let lengths: Vec<usize> = text.docs.iter().map(|t| t.ids.len()).collect();
    let layout: Vec<Vec<&Tokenized>> = data::rows(&lengths, true, text.window)
        .into_iter()
        .map(|row| row.into_iter().map(|i| &text.docs[i]).collect())
        .collect();
    let (mut nll_sum, mut scored) = (0.0, 0);
    for chunk in layout.chunks(rows.max(1)) {
        let batch = Batch::new(chunk, 0);
        if batch.loss_tokens() > 0 {
            nll_sum += scorer.nll(&batch)?;
            scored += batch.loss_tokens();
        }
    }
    Ok(((nll_sum / scored.max(1) as f64).exp(), scored))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::backend::{Autodiff, NdArray};
    use burn::module::Param;
    use burn::tensor::ElementConversion;
    use ft_model::params::ParamMut;
    use ft_model::tiny::tiny_config;

    use super::*;
    use crate::recipe;
    use crate::run::trainables::accumulate_param_grads;

    fn tokens(ids: &[u32]) -> Tokenized {
        Tokenized::all_trained(ids.to_vec())
    }

    /// Stores every weight of `m` as f64 (random initialization draws f32 values).
    fn as_f64<B: Backend>(m: &mut LlamaForCausalLM<B>) {
        for (_, p) in m.params_mut() {
            match p {
                ParamMut::Matrix(p) => {
                    let data = p.val().into_data().convert::<f64>();
                    *p = Param::from_tensor(Tensor::from_data(data, &p.device()));
                }
                ParamMut::Vector(p) => {
                    let data = p.val().into_data().convert::<f64>();
                    *p = Param::from_tensor(Tensor::from_data(data, &p.device()));
                }
            }
        }
    }

    #[test]
    fn the_host_step_gives_burns_loss_and_gradients_for_every_student_weight() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        A::seed(&device, 11);
        let teacher = LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &device);
        let mut config = tiny_config();
        config.num_hidden_layers = 1;
        let mut student = LlamaForCausalLM::<A>::init_random(&config, &device);
        // Two packed documents in row 0, one and padding in row 1.
        let (a, b, c) = (
            tokens(&[5, 70, 200, 9, 33]),
            tokens(&[8, 1, 2]),
            tokens(&[40, 41, 42, 43]),
        );
        let batch = Batch::new(&[vec![&a, &b], vec![&c]], 0);
        for divergence in [Divergence::ForwardKl, Divergence::Jsd { beta: 0.3 }] {
            let loss_fn = DistillLoss {
                divergence,
                temperature: 2.0,
                alpha: 0.4,
            };
            let scale = 0.125;
            let teacher_logits = target_logits(&teacher, &batch, &device);
            let loss = loss_fn.forward(
                target_logits(&student, &batch, &device),
                TeacherLogits::Full(Tensor::from_inner(teacher_logits)),
                target_ids::<A>(&batch, &device),
            );
            let want_loss = loss.clone().into_scalar().elem::<f64>();
            let g = (loss * scale).backward();
            let mut want = BTreeMap::new();
            accumulate_param_grads(&mut student, &g, &mut want);
            let host = HostStep::everything(&student.valid())
                .and_then(|s| s.with_teacher(&teacher, loss_fn))
                .expect("host tensors");
            let mut got = BTreeMap::new();
            let host_loss = host
                .gradients(&student, &batch, scale, 0, &mut got)
                .expect("a valid batch");
            assert!(
                (host_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "{divergence:?}: {host_loss} vs {want_loss}"
            );
            assert_eq!(got.len(), want.len(), "one gradient per weight");
            for (name, w) in &want {
                // f32 or f64, whichever the test process made the device's default.
                let values = |t: &Tensor<NdArray<f32>, 2>| -> Vec<f32> {
                    t.clone()
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32")
                };
                let (w, h) = (values(w), values(&got[name]));
                let size = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = h
                    .iter()
                    .zip(&w)
                    .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-4 * size,
                    "{divergence:?} {name}: off by {diff} of {size}"
                );
            }
        }
    }

    #[test]
    fn student_gradients_match_finite_differences() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f64>>;
        let device = Default::default();
        A::seed(&device, 3);
        let mut teacher = LlamaForCausalLM::<NdArray<f64>>::init_random(&tiny_config(), &device);
        let mut config = tiny_config();
        config.num_hidden_layers = 1;
        let mut student = LlamaForCausalLM::<A>::init_random(&config, &device);
        as_f64(&mut teacher);
        as_f64(&mut student);
        let (a, b) = (tokens(&[5, 70, 200, 9, 33]), tokens(&[8, 1, 2]));
        let batch = Batch::new(&[vec![&a], vec![&b]], 0);
        let loss_fn = DistillLoss {
            divergence: Divergence::Jsd { beta: 0.3 },
            temperature: 2.0,
            alpha: 0.4,
        };
        let loss_of = |m: &LlamaForCausalLM<A>| {
            let teacher_logits = target_logits(&teacher, &batch, &device);
            loss_fn
                .forward(
                    target_logits(m, &batch, &device),
                    TeacherLogits::Full(Tensor::from_inner(teacher_logits)),
                    target_ids::<A>(&batch, &device),
                )
                .into_scalar()
                .elem::<f64>()
        };
        let teacher_logits = target_logits(&teacher, &batch, &device);
        let g = loss_fn
            .forward(
                target_logits(&student, &batch, &device),
                TeacherLogits::Full(Tensor::from_inner(teacher_logits)),
                target_ids::<A>(&batch, &device),
            )
            .backward();
        let mut grads = BTreeMap::new();
        accumulate_param_grads(&mut student, &g, &mut grads);
        assert_eq!(grads.len(), student.params_mut().len());
        // L(p + t u) for the weight `name` moved along u.
        let loss_along = |name: &str, u: &[f64], t: f64| {
            let mut m = student.clone();
            for (n, p) in m.params_mut() {
                if n != name {
                    continue;
                }
                let moved =
                    |v: Vec<f64>| -> Vec<f64> { v.iter().zip(u).map(|(x, d)| x + t * d).collect() };
                match p {
                    ParamMut::Matrix(p) => {
                        let v = moved(p.val().into_data().convert::<f64>().to_vec().unwrap());
                        *p = Param::from_tensor(Tensor::from_data(
                            TensorData::new(v, p.dims()),
                            &device,
                        ));
                    }
                    ParamMut::Vector(p) => {
                        let v = moved(p.val().into_data().convert::<f64>().to_vec().unwrap());
                        *p = Param::from_tensor(Tensor::from_data(
                            TensorData::new(v, p.dims()),
                            &device,
                        ));
                    }
                }
            }
            loss_of(&m)
        };
        for name in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            let grad: Vec<f64> = grads[name]
                .clone()
                .into_data()
                .convert::<f64>()
                .to_vec()
                .unwrap();
            let raw: Vec<f64> = (0..grad.len())
                .map(|i| ((i * 7919 + 13) % 101) as f64 - 50.0)
                .collect();
            let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
            let u: Vec<f64> = raw.iter().map(|x| x / norm).collect();
            let central = |h: f64| (loss_along(name, &u, h) - loss_along(name, &u, -h)) / (2.0 * h);
            // Richardson extrapolation cancels the O(h^2) error of the quotient.
            let fd = (4.0 * central(0.1) - central(0.2)) / 3.0;
            let an: f64 = grad.iter().zip(&u).map(|(a, b)| a * b).sum();
            assert!(
                an.abs() > 1e-5,
                "{name}: the check needs a gradient to compare"
            );
            assert!(
                (fd - an).abs() <= 1e-5 + 1e-2 * an.abs(),
                "{name}: fd {fd} vs {an}"
            );
        }
    }

    #[test]
    fn cached_logits_follow_the_batch_layout() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        A::seed(&device, 4);
        let teacher = LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &device);
        let train: Vec<Tokenized> = (0..7u32)
            .map(|i| {
                let ids: Vec<u32> = (0..3 + i).map(|j| (i * 31 + j * 7) % 250).collect();
                let mut t = tokens(&ids);
                t.train[1] = false;
                t
            })
            .collect();
        let text = "[model]\nsource = \"teacher\"\n[distill]\nmode = \"offline\"\ntop_k = 5\n[data]\ntrain = \"t.jsonl\"\npacking = true\nmax_seq_len = 16\n[train]\nmicro_batch_size = 2\nseed = 9\n";
        let r = recipe::parse(text, &[], "r.toml").unwrap();
        let d = r.distill.clone().unwrap();
        let vocab = tiny_config().vocab_size;
        let mut cache = TopKCache::new(d.top_k, vocab, "teacher");
        for t in &train {
            let batch = Batch::new(&[vec![t]], 0);
            let logits: Vec<f32> = target_logits(&teacher, &batch, &device)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            cache.push_example(&logits);
        }
        assert!(matches_data(&cache, &train));
        let plan = Plan::new(&r, &train);
        let mut cursor = plan.cursor(0, 0);
        for _ in 0..4 {
            let batch = cursor.next_batch(&train, 0);
            assert!(batch.examples.len() > batch.b, "rows are packed");
            let TeacherLogits::TopK { ids, logits } = cached_logits::<A>(&cache, &batch, &device)
            else {
                panic!("top-k logits expected");
            };
            let online: Vec<f32> = target_logits(&teacher, &batch, &device)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            let ids: Vec<i64> = ids.into_data().to_vec().unwrap();
            let logits: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();
            for (row, want) in online.chunks(vocab).enumerate() {
                let (want_ids, want_logits) = ft_distill::cache::top_k(want, 5);
                let got: Vec<u32> = ids[row * 5..row * 5 + 5]
                    .iter()
                    .map(|&i| i as u32)
                    .collect();
                assert_eq!(got, want_ids, "row {row}");
                for (g, w) in logits[row * 5..row * 5 + 5].iter().zip(&want_logits) {
                    assert!((g - w).abs() < 1e-4, "{g} vs {w}");
                }
            }
        }
    }
}
