//! Tiny random checkpoints, written the way real ones are: an HF folder (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `model.safetensors`) or a llama.cpp-style GGUF
//! (q/k rows permuted, tokenizer in the metadata). Tests build them to cover model variants and
//! loader faults without downloading anything.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde_json::json;

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::export::{hf_config_json, write_safetensors};
use crate::gguf::{gguf_name, permute_rows, GgufValue};
use crate::gguf_write::{write_atomic, GgufWriter};
use crate::llama::LlamaForCausalLM;
use crate::tokenizer::{bpe_tokenizer_json, byte_level_alphabet};

/// Special tokens after the 256 byte tokens: ids 256, 257, 258.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, the template of SmolLM2 and Qwen2 instruct models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A small configuration: 2 layers, width 32, 4 query and 2 key/value heads of 8, the
/// byte-level vocabulary of [`tiny_tokens`], a context of 64.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 256 + SPECIAL_TOKENS.len(),
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// Token strings (every byte, then [`SPECIAL_TOKENS`]) and their GGUF token types.
pub fn tiny_tokens() -> (Vec<String>, Vec<u64>) {
    let mut tokens = byte_level_alphabet();
    let mut types = vec![1u64; tokens.len()];
    for s in SPECIAL_TOKENS {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types)
}

/// The id of `<|im_end|>`, which ends generation in tiny models.
pub fn tiny_eos() -> u32 {
    258
}

/// Writes `model` as an HF folder in `dir`.
pub fn write_hf_folder<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &LlamaConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let (tokens, types) = tiny_tokens();
    let tokenizer =
        bpe_tokenizer_json(&tokens, &[], &types, "gpt2").map_err(ModelError::Tokenizer)?;
    let tokenizer_config = json!({
        "chat_template": CHATML_TEMPLATE,
        "bos_token": null,
        "eos_token": SPECIAL_TOKENS[2],
    });
    for (name, value) in [
        ("config.json", hf_config_json(config, Some(tiny_eos()))),
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", tokenizer_config),
    ] {
        let path = dir.join(name);
        write_atomic(&path, value.to_string().as_bytes())?;
    }
    write_safetensors(&dir.join("model.safetensors"), &model.named_tensors())
}

/// Writes `model` as a `llama` GGUF with f32 tensors at `path`.
pub fn write_gguf<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &LlamaConfig,
    path: &Path,
) -> Result<(), ModelError> {
    let c = config;
    let (tokens, types) = tiny_tokens();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("general.alignment", GgufValue::U32(32))
        .metadata("llama.context_length", u32v(c.max_position_embeddings))
        .metadata("llama.embedding_length", u32v(c.hidden_size))
        .metadata("llama.block_count", u32v(c.num_hidden_layers))
        .metadata("llama.feed_forward_length", u32v(c.intermediate_size))
        .metadata("llama.attention.head_count", u32v(c.num_attention_heads))
        .metadata("llama.attention.head_count_kv", u32v(c.num_key_value_heads))
        .metadata("llama.rope.dimension_count", u32v(c.head_dim))
        .metadata("llama.rope.freq_base", GgufValue::F32(c.rope_theta as f32))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(c.rms_norm_eps as f32),
        )
        .metadata("llama.vocab_size", u32v(c.vocab_size))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            GgufValue::Array(
                types
                    .into_iter()
                    .map(|t| GgufValue::I32(t as i32))
                    .collect(),
            ),
        )
        .metadata("tokenizer.ggml.merges", GgufValue::Array(Vec::new()))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(tiny_eos()))
        .metadata(
            "tokenizer.chat_template",
            GgufValue::String(CHATML_TEMPLATE.into()),
        );
    for (name, t) in model.named_tensors() {
        let gguf = gguf_name(&name)
            .ok_or_else(|| ModelError::format(path, format!("no GGUF name for {name}")))?;
        let t = if name.contains("self_attn.q_proj.") {
            permute_rows(t, c.num_attention_heads)
        } else if name.contains("self_attn.k_proj.") {
            permute_rows(t, c.num_key_value_heads)
        } else {
            t
        };
        w.tensor_f32(&gguf, t.shape.clone(), &t.data);
    }
    w.write(path)
}
