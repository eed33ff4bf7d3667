//! The recipe as an axolotl config (axolotl 0.18's schema): `axolotl.yaml` beside `data/`, the
//! examples in axolotl's template-free `input_output` format, so that axolotl concatenates
//! exactly the text ft tokenizes and masks the same pieces.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::{segments_jsonl, yaml, Exported, Job};
use crate::error::Result;
use crate::recipe::{OptimizerKind, Scheduler};

/// The config's file name in the output folder.
pub const CONFIG: &str = "axolotl.yaml";

pub(super) fn export(job: Job) -> Result<Exported> {
    let r = &job.loaded.recipe;
    let mut untranslated = job.untranslated;
    let mut c = Map::new();
    let mut set = |k: &str, v: Value| {
        c.insert(k.into(), v);
    };
    set("base_model", json!(job.model));
    if let Some(rev) = r
        .model
        .source
        .strip_prefix("hf:")
        .and_then(|s| s.split_once('@'))
    {
        set("revision_of_model", json!(rev.1));
    }

    // The frozen base: bitsandbytes' storage, as PEFT and ft use it.
    let (adapter, bits) = match r.quant.base.as_str() {
        "nf4" | "fp4" => ("qlora", Some(4)),
        "int8" => ("lora", Some(8)),
        _ => ("lora", None),
    };
    set("adapter", json!(adapter));
    set("load_in_4bit", json!(bits == Some(4)));
    set("load_in_8bit", json!(bits == Some(8)));
    if bits == Some(4) {
        set(
            "bnb_config_kwargs",
            json!({
                "bnb_4bit_quant_type": r.quant.base,
                "bnb_4bit_use_double_quant": r.quant.double_quant,
            }),
        );
    }
    if r.quant.base == "int8-block" {
        untranslated.push(
            "quant.base = \"int8-block\": bitsandbytes stores 8-bit bases by row; the export \
             loads the base in 8 bits (load_in_8bit)"
                .into(),
        );
        set("load_in_8bit", json!(true));
    }
    set("bf16", json!(job.bf16));
    set("fp16", json!(false));
    set("tf32", json!(false));

    // The adapters.
    set("lora_r", json!(r.lora.r));
    if r.lora.alpha.fract() != 0.0 {
        untranslated.push(format!(
            "lora.alpha = {}: axolotl takes a whole number; the export rounds it to {}",
            r.lora.alpha,
            r.lora.alpha.round()
        ));
    }
    set("lora_alpha", json!(r.lora.alpha.round() as i64));
    set("lora_dropout", json!(r.lora.dropout));
    set("lora_target_modules", json!(r.lora.targets));
    if let Some(layers) = &r.lora.layers {
        set("peft_layers_to_transform", json!(layers));
    }
    set("peft_use_rslora", json!(r.lora.rslora));

    // The data, as ft splits and masks it.
    let mut files = Vec::new();
    let mut datasets = Vec::new();
    let mut tests = Vec::new();
    for s in &job.sources {
        let train = PathBuf::from(format!("data/{}-train.jsonl", s.stem));
        datasets.push(json!({
            "path": train.display().to_string(), "ds_type": "json", "type": "input_output",
        }));
        files.push((train, segments_jsonl(&s.train)));
        if !s.val.is_empty() {
            let val = PathBuf::from(format!("data/{}-val.jsonl", s.stem));
            tests.push(json!({
                "path": val.display().to_string(), "ds_type": "json", "split": "train",
                "type": "input_output",
            }));
            files.push((val, segments_jsonl(&s.val)));
        }
        tracing::debug!("{}: {} train, {} val", s.key, s.train.len(), s.val.len());
    }
    set("datasets", json!(datasets));
    if tests.is_empty() {
        set("val_set_size", json!(0.0));
    } else {
        set("test_datasets", json!(tests));
    }
    set("sequence_len", json!(job.seq_len));
    set("excess_length_strategy", json!("truncate"));
    set("sample_packing", json!(r.data.packing));
    if r.data.packing {
        untranslated.push(
            "data.packing: axolotl packs with its multipack sampler, which keeps examples \
             apart only with flash or flex attention (attn_implementation); rows hold other \
             sets of examples than ft's"
                .into(),
        );
    }
    set("train_on_inputs", json!(r.data.train_on_prompt));

    // The loop.
    let t = &r.train;
    match t.max_steps {
        Some(steps) => set("max_steps", json!(steps)),
        None => set("num_epochs", json!(t.epochs)),
    }
    set("micro_batch_size", json!(t.micro_batch_size));
    set("gradient_accumulation_steps", json!(t.grad_accum));
    set("learning_rate", json!(t.lr));
    set(
        "lr_scheduler",
        json!(match t.scheduler {
            Scheduler::Constant => "constant_with_warmup",
            Scheduler::Linear => "linear",
            Scheduler::Cosine => "cosine",
        }),
    );
    set("warmup_steps", json!(t.warmup_steps));
    set("weight_decay", json!(t.weight_decay));
    set("max_grad_norm", json!(t.max_grad_norm));
    set(
        "optimizer",
        json!(match t.optimizer {
            OptimizerKind::AdamW => "adamw_torch",
            OptimizerKind::PagedAdamW => "paged_adamw_32bit",
        }),
    );
    set("adam_beta1", json!(t.betas[0]));
    set("adam_beta2", json!(t.betas[1]));
    set("adam_epsilon", json!(t.eps));
    set("seed", json!(t.seed));
    if t.eval_every > 0 {
        set("eval_steps", json!(t.eval_every));
    } else {
        untranslated.push(
            "train.eval_every = 0 (validation at the end only): axolotl evaluates at its own \
             default interval; set eval_steps"
                .into(),
        );
    }
    if t.save_every > 0 {
        set("save_steps", json!(t.save_every));
    } else {
        set("save_strategy", json!("no"));
    }
    if let Some(resume) = &t.resume {
        untranslated.push(format!(
            "train.resume = {}: ft's checkpoints are its own; axolotl resumes only from its own \
             (resume_from_checkpoint)",
            resume.display()
        ));
    }
    set("logging_steps", json!(1));
    set("output_dir", json!(r.output.dir.display().to_string()));
    set(
        "use_tensorboard",
        json!(r.output.loggers.iter().any(|l| l == "tensorboard")),
    );

    let mut comments = vec![
        "axolotl config written by `ft recipe export`; the examples in data/ are ft's, as".into(),
        "ft tokenizes, masks and splits them.".into(),
        "Run it from this folder: axolotl train axolotl.yaml".into(),
        "(multi-GPU: accelerate launch -m axolotl.cli.train axolotl.yaml).".into(),
        String::new(),
        "Not translated:".into(),
    ];
    comments.extend(untranslated.iter().map(|u| format!("- {u}")));
    let config = yaml::document(&Value::Object(c), &comments);
    files.insert(0, (PathBuf::from(CONFIG), config));
    Ok(Exported {
        files,
        untranslated,
    })
}
