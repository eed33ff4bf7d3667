//! Training from scratch (`[model] init = "random"`): a Llama of the recipe's architecture,
//! with the vocabulary of the source's tokenizer, drawn from `train.seed` (normal with standard
//! deviation 0.02, norms 1, as HF initializes Llama) and trained in full on the labels'
//! cross-entropy by the one step loop. The run reports what a scaling law is fitted on: the
//! parameters (total and without the embedding), the tokens trained, the training FLOPs
//! (`6 N D` and counted with attention) and the held-out loss.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use ft_model::pretrained::TextSide;
use ft_model::{LlamaConfig, LlamaForCausalLM, Pretrained, QuantBackend};
use serde::{Deserialize, Serialize};

use super::fine_tune::CrossEntropy;
use super::host_step::{HostStep, Scorer};
use super::setup::{prepare, tokenize_data};
use super::step_loop::{run_steps, Objective, Run};
use super::trainables::Trainables;
use crate::checkpoint::{self, TrainerState};
use crate::error::{write_atomic, At, Result, TrainError};
use crate::metrics::Metrics;
use crate::optim::{AdamW, StateBytes};
use crate::plan::Plan;
use crate::recipe::{Architecture, Engine, LoadedRecipe, OptimizerKind, Recipe};
use crate::scaling::count;

/// What a finished run from scratch reports in `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainSummary {
    /// Mean training loss over the last 10% of steps (at least one).
    pub train_loss: f64,
    /// Held-out loss (nats per token) after training: the `L` of a scaling law.
    pub val_loss: f64,
    /// The same at initialization.
    pub val_loss_before: f64,
    /// Every parameter: the `N` of Hoffmann et al.
    pub params: usize,
    /// Parameters without the embedding: the `N` of Kaplan et al.
    pub non_embedding_params: usize,
    /// Tokens trained on (padding left out): the `D`.
    pub tokens: usize,
    /// `6 N D`.
    pub flops_6nd: f64,
    /// Training FLOPs counted operation by operation, attention included
    /// ([`count::training_flops`]) at the run's `data.max_seq_len`.
    pub flops: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Non-padding tokens per second of training.
    pub train_tokens_per_s: f64,
    /// Seconds of training steps.
    pub train_s: f64,
    /// Wall time of the whole run (of this process, when resumed).
    pub wall_s: f64,
    /// Peak resident set size of the process.
    pub peak_rss_bytes: u64,
    /// Where the optimizer state lives.
    pub optimizer_state: StateBytes,
    /// Examples truncated to max_seq_len.
    pub truncated_examples: usize,
    /// The trained model, an HF folder (`ft generate --model` and `ft perplexity` read it).
    pub model_dir: PathBuf,
}

/// The configuration of a model of `a` with the vocabulary and numerics of `base` (the
/// source's configuration) and a context of `context` positions; the head is tied to the
/// embedding.
pub fn config(a: &Architecture, base: &LlamaConfig, context: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: base.vocab_size,
        hidden_size: a.hidden_size,
        intermediate_size: a.intermediate_size,
        num_hidden_layers: a.num_hidden_layers,
        num_attention_heads: a.num_attention_heads,
        num_key_value_heads: a.num_key_value_heads,
        head_dim: a.hidden_size / a.num_attention_heads,
        max_position_embeddings: context,
        rms_norm_eps: base.rms_norm_eps,
        rope_theta: base.rope_theta,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// Runs a recipe whose `[model]` asks for a model trained from scratch.
pub fn pretrain<B>(loaded: &LoadedRecipe, device: &B::Device) -> Result<PretrainSummary>
where
    B: AutodiffBackend + QuantBackend,
    B::InnerBackend: QuantBackend,
{
    let started = Instant::now();
    let r = &loaded.recipe;
    let arch = r.model.architecture().ok_or_else(|| {
        TrainError::Invalid("model.init: a run from scratch needs init = \"random\"".into())
    })?;
    let out = r.output.dir.clone();
    let resume = prepare::<B>(r)?;
    let path = ft_model::source::resolve(&r.model.source)
        .at_with(|| format!("model.source {}", r.model.source))?;
    let text = TextSide::load(&path).at_with(|| format!("model.source {}", r.model.source))?;
    let config = config(&arch, &text.config, r.data.max_seq_len);
    let data = tokenize_data(
        loaded,
        &text.tokenizer,
        text.chat_template.as_ref(),
        r.data.max_seq_len,
    )?;
    write_atomic(&out.join("recipe.toml"), r.to_toml().as_bytes())?;
    let mut container = match &resume {
        Some(dir) => {
            let folder = dir.join("model");
            Pretrained::<B>::load(&folder, None, device)
                .at_with(|| format!("train.resume: {}", folder.display()))?
        }
        None => Pretrained {
            path: out.join("model"),
            model: LlamaForCausalLM::init_seeded(&config, r.train.seed, device),
            config: config.clone(),
            tokenizer: text.tokenizer,
            chat_template: text.chat_template,
        },
    };
    let mut model = container.model.clone();
    let mut optimizer = AdamW::<B::InnerBackend>::new(
        r.train.optimizer == OptimizerKind::PagedAdamW,
        r.train.page_min_elements,
    );
    let mut state = TrainerState::default();
    if let Some(dir) = &resume {
        state = checkpoint::load_state(dir)?;
        checkpoint::load_optimizer(dir, &mut optimizer, &state, device)?;
        tracing::info!("resuming from {} at step {}", dir.display(), state.step);
    }
    let pad = container.tokenizer.eos_ids.first().copied().unwrap_or(0);
    let plan = Plan::new(r, &data.train);
    let val_batches = plan.val_batches(&data.val, pad);
    if val_batches.iter().all(|b| b.real_tokens == 0) {
        return Err(TrainError::usage(
            "data.val_fraction",
            "held-out data to score the model on (data.val, or a data.val_fraction and \
             data.val_limit above 0)",
            "no validation tokens",
        ));
    }
    let host = host_step(r, &model.valid())?;
    if resume.is_none() {
        // An earlier run's summary must not stand for this one until it finishes.
        let stale = out.join("summary.json");
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| TrainError::io(&stale, e))?;
        }
        state.val_loss_before =
            Scorer::new(&model.valid(), host.is_some()).mean_nll(&val_batches)?;
        if checkpoint::clear(&out)? {
            tracing::info!(
                "removed the checkpoints of an earlier run in {}",
                out.display()
            );
        }
    }
    let counts = count::params(&config);
    tracing::info!(
        "training {} parameters ({} without the embedding) from scratch on {}",
        counts.total,
        counts.non_embedding,
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
        trainables: Trainables::Full,
    };
    let mut objective = CrossEntropy::<B> {
        recipe: r,
        host,
        whole: Some(&mut container),
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
    let model_dir = out.join("model");
    objective.save(&model, &out)?;

    let tail = (state.losses.len() / 10)
        .max(1)
        .min(state.losses.len().max(1));
    let tokens = state.train_tokens;
    let summary = PretrainSummary {
        train_loss: state.losses.iter().rev().take(tail).sum::<f64>() / tail as f64,
        val_loss: state.val_loss,
        val_loss_before: state.val_loss_before,
        params: counts.total,
        non_embedding_params: counts.non_embedding,
        tokens,
        flops_6nd: 6.0 * counts.total as f64 * tokens as f64,
        flops: count::training_flops(&config, tokens as f64, r.data.max_seq_len),
        steps: state.step,
        train_tokens_per_s: tokens as f64 / state.train_s.max(1e-9),
        train_s: state.train_s,
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_bytes: ft_eval::rss::peak_rss_bytes(),
        optimizer_state: optimizer.state_bytes(),
        truncated_examples: data.truncated,
        model_dir,
    };
    let json = serde_json::to_string_pretty(&summary)?;
    write_atomic(&out.join("summary.json"), json.as_bytes())?;
    Ok(summary)
}

/// The host step of every weight unless the recipe asks for burn's autodiff.
fn host_step<B: QuantBackend>(
    r: &Recipe,
    model: &LlamaForCausalLM<B>,
) -> Result<Option<HostStep<B>>> {
    match r.train.engine {
        Engine::Burn => Ok(None),
        Engine::Auto => Ok(HostStep::everything(model)),
        Engine::Host => HostStep::everything(model).map(Some).ok_or_else(|| {
            TrainError::usage(
                "train.engine",
                "\"auto\" or \"burn\" where the weights are not in host memory (a GPU device)",
                "\"host\"",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use ft_model::tiny::{tiny_config, tiny_model, write_hf_folder};

    use super::*;
    use crate::recipe;

    type A = Autodiff<NdArray<f32>>;

    /// Trains a 2-layer model of width 16 from scratch with the tokenizer of a tiny model
    /// folder in `dir`, seeded `seed`, into `dir/NAME`.
    fn run(dir: &std::path::Path, name: &str, seed: u64) -> PretrainSummary {
        let text = format!(
            "[model]\nsource = {:?}\ninit = \"random\"\nhidden_size = 16\nnum_hidden_layers = 2\n\
             num_attention_heads = 2\nintermediate_size = 32\n[data]\ntrain = \"train.jsonl\"\n\
             format = \"text\"\nmax_seq_len = 64\npacking = true\nval_fraction = 0.2\n[train]\n\
             max_tokens = 1500\nmicro_batch_size = 2\nlr = 0.01\nseed = {seed}\n[output]\n\
             dir = {:?}\n",
            dir.join("tokenizer"),
            dir.join(name)
        );
        let loaded = LoadedRecipe {
            recipe: recipe::parse(&text, &[], "scratch.toml").unwrap(),
            base_dir: dir.to_path_buf(),
        };
        pretrain::<A>(&loaded, &Default::default()).unwrap()
    }

    #[test]
    fn a_seed_gives_the_same_model_and_the_summary_counts_what_was_trained() {
        let _turn = crate::f64_tensors();
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config();
        let source = tiny_model::<NdArray<f32>>(&config, 1);
        write_hf_folder(&source, &config, &dir.path().join("tokenizer")).unwrap();
        let lines: Vec<String> = (0..40)
            .map(|i| {
                let text = format!("in the beginning {i} the word was {} and it was", i * 7);
                serde_json::json!({ "text": text }).to_string()
            })
            .collect();
        std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();

        let (a, b, c) = (
            run(dir.path(), "a", 7),
            run(dir.path(), "b", 7),
            run(dir.path(), "c", 8),
        );
        let weights = |name: &str| {
            Pretrained::<NdArray<f32>>::load(
                &dir.path().join(name).join("model"),
                None,
                &Default::default(),
            )
            .unwrap()
            .model
            .named_tensors()
        };
        let (wa, wb, wc) = (weights("a"), weights("b"), weights("c"));
        assert!(wa
            .iter()
            .zip(&wb)
            .all(|(x, y)| x.0 == y.0 && x.1.data == y.1.data));
        assert!(wa.iter().zip(&wc).any(|(x, y)| x.1.data != y.1.data));
        assert_eq!(a.val_loss, b.val_loss);

        let trained =
            Pretrained::<NdArray<f32>>::load(&a.model_dir, None, &Default::default()).unwrap();
        assert_eq!(trained.config.hidden_size, 16);
        assert_eq!(trained.config.vocab_size, config.vocab_size);
        let stored: usize = wa.iter().map(|(_, t)| t.data.len()).sum();
        assert_eq!(a.params, stored);
        assert_eq!(a.params, count::params(&trained.config).total);
        assert!(a.non_embedding_params < a.params);
        assert!(a.tokens >= 1500, "{a:?}");
        assert_eq!(a.flops_6nd, 6.0 * a.params as f64 * a.tokens as f64);
        assert!(a.flops > 0.0);
        assert!(a.val_loss < a.val_loss_before - 1.0, "{a:?}");
        assert!(c.val_loss < c.val_loss_before);
    }
}
