//! The recipe as a torchtune config (torchtune 0.6's `lora_finetune_distributed` recipe):
//! `torchtune.yaml` beside `data/`, the model's `tokenizer.json` and `ft_data.py`, a small
//! module that feeds torchtune ft's examples token for token (torchtune has no template-free
//! format of its own). The network is torchtune's Llama 3.2 builder given the model's own
//! shape, with RoPE unscaled (`scale_factor: 1`), which makes it a plain Llama.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::{segments_jsonl, yaml, Exported, Job};
use crate::error::{Result, TrainError};
use crate::recipe::{OptimizerKind, Scheduler};

/// The config's file name in the output folder.
pub const CONFIG: &str = "torchtune.yaml";

/// The data module's file name (imported as `ft_data`).
const MODULE: &str = "ft_data.py";

/// torchtune's names of the attention projections it adapts, by PEFT name.
const ATTENTION: [(&str, &str); 4] = [
    ("q_proj", "q_proj"),
    ("k_proj", "k_proj"),
    ("v_proj", "v_proj"),
    ("o_proj", "output_proj"),
];

/// The MLP projections, which torchtune adapts all together or not at all.
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

pub(super) fn export(job: Job) -> Result<Exported> {
    let r = &job.loaded.recipe;
    let c = &job.text.config;
    let mut untranslated = job.untranslated;
    if c.attention_bias || c.rope_scaling.is_some() {
        untranslated.push(
            "model: attention biases or scaled RoPE, which torchtune's Llama 3.2 builder does \
             not take; pick the builder of the model's own family"
                .into(),
        );
    }

    // The network and its adapters.
    let attention: Vec<&str> = ATTENTION
        .iter()
        .filter(|(peft, _)| r.lora.targets.iter().any(|t| t == peft))
        .map(|(_, tt)| *tt)
        .collect();
    let mlp = MLP
        .iter()
        .filter(|m| r.lora.targets.iter().any(|t| t == *m))
        .count();
    if mlp != 0 && mlp != MLP.len() {
        untranslated.push(
            "lora.targets: torchtune adapts gate_proj, up_proj and down_proj together; the \
             export adapts all three"
                .into(),
        );
    }
    if r.lora.layers.is_some() {
        untranslated.push("lora.layers: torchtune adapts every layer".into());
    }
    if r.lora.rslora {
        untranslated.push("lora.rslora: torchtune scales by alpha / r only".into());
    }
    let quantize = match r.quant.base.as_str() {
        "nf4" => {
            if !r.quant.double_quant {
                untranslated.push(
                    "quant.double_quant = false: torchao's NF4 always quantizes its scales".into(),
                );
            }
            true
        }
        "none" | "bf16" => false,
        other => {
            untranslated.push(format!(
                "quant.base = {other:?}: torchtune quantizes a base to NF4 only; the export \
                 trains on the unquantized base"
            ));
            false
        }
    };
    let model = json!({
        "_component_": "torchtune.models.llama3_2._component_builders.lora_llama3_2",
        "lora_attn_modules": attention,
        "apply_lora_to_mlp": mlp != 0,
        "apply_lora_to_output": false,
        "vocab_size": c.vocab_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "embed_dim": c.hidden_size,
        "max_seq_len": c.max_position_embeddings,
        "intermediate_dim": c.intermediate_size,
        "norm_eps": c.rms_norm_eps,
        "rope_base": c.rope_theta.round() as i64,
        "scale_factor": 1,
        "lora_rank": r.lora.r,
        "lora_alpha": r.lora.alpha,
        "lora_dropout": r.lora.dropout,
        "quantize_base": quantize,
        "tie_word_embeddings": c.tie_word_embeddings,
    });

    // The tokenizer and the data, as ft tokenizes, masks and splits them.
    let eos = job.text.tokenizer.eos_ids.first().copied().ok_or_else(|| {
        TrainError::Invalid("model.source: the tokenizer has no EOS token".into())
    })?;
    let mut files = vec![
        (
            PathBuf::from("tokenizer/tokenizer.json"),
            job.text.tokenizer.to_json().map_err(|e| {
                TrainError::Invalid(format!("model.source: its tokenizer as JSON: {e}"))
            })?,
        ),
        (
            PathBuf::from(MODULE),
            include_str!("ft_data.py").to_string(),
        ),
    ];
    let mut sources = Vec::new();
    let mut held_out = 0;
    for s in &job.sources {
        let train = PathBuf::from(format!("data/{}-train.jsonl", s.stem));
        sources.push(train.display().to_string());
        files.push((train, segments_jsonl(&s.train)));
        held_out += s.val.len();
    }
    if held_out > 0 {
        untranslated.push(format!(
            "validation ({held_out} examples held out): torchtune's LoRA recipe validates \
             nothing during training; ft's held-out examples are left out of the training files \
             all the same"
        ));
    }
    if r.data.packing {
        untranslated.push("data.packing: the exported examples are not packed".into());
    }
    let tokenizer = json!({
        "_component_": "ft_data.SegmentsTokenizer",
        "path": "tokenizer/tokenizer.json",
        "pad_id": eos,
        "eos_id": eos,
        "max_seq_len": job.seq_len,
    });

    // The loop: torchtune counts epochs, optionally cut to a number of steps each.
    let t = &r.train;
    let examples: usize = job.sources.iter().map(|s| s.train.len()).sum();
    let per_step = t.micro_batch_size * t.grad_accum;
    let steps_per_epoch = (examples / per_step.max(1)).max(1);
    let (epochs, max_steps_per_epoch) = match t.max_steps {
        Some(steps) if steps <= steps_per_epoch => (1, Some(steps)),
        Some(steps) => {
            let epochs = steps.div_ceil(steps_per_epoch);
            if steps % steps_per_epoch != 0 {
                untranslated.push(format!(
                    "train.max_steps = {steps}: torchtune stops at the end of an epoch; the \
                     export runs {epochs} epochs of {steps_per_epoch} steps"
                ));
            }
            (epochs, None)
        }
        None => (t.epochs, None),
    };
    if t.scheduler != Scheduler::Cosine {
        untranslated.push(format!(
            "train.scheduler = {:?}: torchtune ships a cosine schedule only; the export uses it",
            format!("{:?}", t.scheduler).to_lowercase()
        ));
    }
    let scheduler = json!({
        "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "num_warmup_steps": t.warmup_steps,
    });
    let optimizer = json!({
        "_component_": match t.optimizer {
            OptimizerKind::AdamW => "torch.optim.AdamW",
            OptimizerKind::PagedAdamW => "bitsandbytes.optim.PagedAdamW",
        },
        "lr": t.lr,
        "betas": t.betas,
        "eps": t.eps,
        "weight_decay": t.weight_decay,
    });
    if t.eval_every > 0 {
        untranslated.push(format!(
            "train.eval_every = {}: no validation during training (see above)",
            t.eval_every
        ));
    }
    if t.save_every > 0 {
        untranslated.push(format!(
            "train.save_every = {}: torchtune saves at the end of each epoch",
            t.save_every
        ));
    }
    if t.resume.is_some() {
        untranslated.push(
            "train.resume: ft's checkpoints are its own; torchtune resumes from its own".into(),
        );
    }
    let logger = if r.output.loggers.iter().any(|l| l == "tensorboard") {
        "torchtune.training.metric_logging.TensorBoardLogger"
    } else {
        "torchtune.training.metric_logging.DiskLogger"
    };

    let mut cfg = Map::new();
    let mut set = |k: &str, v: Value| {
        cfg.insert(k.into(), v);
    };
    set("output_dir", json!(r.output.dir.display().to_string()));
    set("model", model);
    set("tokenizer", tokenizer);
    set(
        "checkpointer",
        json!({
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": "model",
            "checkpoint_files": ["model.safetensors"],
            "recipe_checkpoint": null,
            "output_dir": "${output_dir}",
            "model_type": "LLAMA3_2",
        }),
    );
    set("resume_from_checkpoint", json!(false));
    set("save_adapter_weights_only", json!(true));
    set(
        "dataset",
        json!({"_component_": "ft_data.segments_dataset", "sources": sources}),
    );
    set("seed", json!(t.seed));
    set("shuffle", json!(true));
    set("batch_size", json!(t.micro_batch_size));
    set("epochs", json!(epochs));
    set("max_steps_per_epoch", json!(max_steps_per_epoch));
    set("gradient_accumulation_steps", json!(t.grad_accum));
    set(
        "clip_grad_norm",
        if t.max_grad_norm > 0.0 {
            json!(t.max_grad_norm)
        } else {
            Value::Null
        },
    );
    set("optimizer", optimizer);
    set("lr_scheduler", scheduler);
    set(
        "loss",
        json!({"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}),
    );
    set(
        "metric_logger",
        json!({"_component_": logger, "log_dir": "${output_dir}/logs"}),
    );
    set("log_every_n_steps", json!(1));
    set("log_peak_memory_stats", json!(false));
    set("compile", json!(false));
    set("device", json!("cuda"));
    set("dtype", json!(if job.bf16 { "bf16" } else { "fp32" }));
    set("enable_activation_checkpointing", json!(false));
    set(
        "profiler",
        json!({"_component_": "torchtune.training.setup_torch_profiler", "enabled": false}),
    );

    let mut comments = vec![
        "torchtune config written by `ft recipe export`; the examples in data/ are ft's, as"
            .into(),
        "ft tokenizes, masks and splits them, read by ft_data.py.".into(),
        format!(
            "Put the model's Hugging Face weights in model/ (tune download {} --output-dir model),",
            job.model
        ),
        "then run from this folder:".into(),
        "PYTHONPATH=. tune run --nproc_per_node N lora_finetune_distributed --config torchtune.yaml"
            .into(),
        String::new(),
        "Not translated:".into(),
    ];
    comments.extend(untranslated.iter().map(|u| format!("- {u}")));
    files.insert(
        0,
        (
            PathBuf::from(CONFIG),
            yaml::document(&Value::Object(cfg), &comments),
        ),
    );
    Ok(Exported {
        files,
        untranslated,
    })
}
