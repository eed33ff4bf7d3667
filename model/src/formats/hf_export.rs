//! Writing models out in HF layout: `config.json` from a [`LlamaConfig`] and
//! `model.safetensors` from named host tensors, each written atomically, and a whole model
//! folder (config, weights, tokenizer, chat template) that transformers and `ft` load.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use burn::tensor::backend::Backend;

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::ModelError;
use crate::formats::gguf_write::write_atomic;
use crate::pretrained::Pretrained;
use crate::weights::HostTensor;

/// Writes f32 tensors to a safetensors file with `{"format": "pt"}` metadata, as transformers does.
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, t), (_, b)) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| ModelError::format(path, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let out = safetensors::serialize(views, Some(metadata))
        .map_err(|e| ModelError::format(path, format!("serializing: {e}")))?;
    write_atomic(path, &out)
}

/// The HF `config.json` of a llama-family model with this configuration.
pub fn hf_config_json(c: &LlamaConfig, eos_token_id: Option<u32>) -> serde_json::Value {
    let rope_scaling = match &c.rope_scaling {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                     "high_freq_factor": high_freq_factor,
                     "original_max_position_embeddings": original_max_position_embeddings}),
    };
    let (arch, model_type) = if c.attention_bias {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": eos_token_id,
    })
}

impl<B: Backend> Pretrained<B> {
    /// Writes the model as an HF folder: `config.json`, `generation_config.json`,
    /// `model.safetensors` (f32), `tokenizer.json` and `tokenizer_config.json` (special tokens
    /// and chat template). The folder is assembled beside `dir` and renamed into place, so
    /// `dir` is either the previous folder or the complete new one.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        let name = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let parent = dir.parent().unwrap_or(Path::new("."));
        let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let result = (|| {
            if staging.exists() {
                std::fs::remove_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
            }
            std::fs::create_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
            let eos = self.tokenizer.eos_ids.first().copied();
            let tokenizer_config = json!({
                "chat_template": self.chat_template.as_ref().map(|t| t.source()),
                "bos_token": self.tokenizer.bos_token,
                "eos_token": self.tokenizer.eos_token,
            });
            let generation = json!({ "eos_token_id": self.tokenizer.eos_ids });
            for (file, text) in [
                ("config.json", hf_config_json(&self.config, eos).to_string()),
                ("generation_config.json", generation.to_string()),
                ("tokenizer.json", self.tokenizer.to_json()?),
                ("tokenizer_config.json", tokenizer_config.to_string()),
            ] {
                write_atomic(&staging.join(file), text.as_bytes())?;
            }
            write_safetensors(
                &staging.join("model.safetensors"),
                &self.model.named_tensors(),
            )?;
            if dir.exists() {
                std::fs::rename(dir, &old).map_err(|e| ModelError::io(dir, e))?;
            }
            if let Err(e) = std::fs::rename(&staging, dir) {
                // Put the previous folder back rather than leave none.
                if old.exists() {
                    let _ = std::fs::rename(&old, dir);
                }
                return Err(ModelError::io(dir, e));
            }
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
            }
            Ok(())
        })();
        if result.is_err() && staging.exists() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }
}
