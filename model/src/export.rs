//! Writing models out in HF layout: `config.json` from a [`LlamaConfig`] and
//! `model.safetensors` from named host tensors, each written atomically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::ModelError;
use crate::gguf_write::write_atomic;
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
