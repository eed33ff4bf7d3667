//! Tiny random checkpoints, written the way real ones are: an HF folder (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, `model.safetensors`) or a llama.cpp-style GGUF
//! (q/k rows permuted, tokenizer in the metadata). Tests build them to cover model variants and
//! loader faults without downloading anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use ft_adapters::peft::{LoraWeights, Matrix, PeftAdapter, PeftConfig};
use serde_json::json;

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::formats::gguf_export::{self, GgufExportType, GgufTokenizer};
use crate::formats::gguf_write::write_atomic;
use crate::formats::hf_export::{hf_config_json, write_safetensors};
use crate::forward::llama::LlamaForCausalLM;
use crate::tokenizer::{bpe_tokenizer_json, byte_level_alphabet};
use crate::weights::{HostTensor, TensorSource};

/// Special tokens after the 256 byte tokens: ids 256, 257, 258.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, the template of SmolLM2 and Qwen2 instruct models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A random model of `config` from `seed`, the same one every time
/// ([`LlamaForCausalLM::init_seeded`]).
pub fn tiny_model<B: Backend>(config: &LlamaConfig, seed: u64) -> LlamaForCausalLM<B> {
    LlamaForCausalLM::init_seeded(config, seed, &B::Device::default())
}

/// A model of `config` whose every weight is a fixed function of its name and position (norms
/// 1): unlike [`tiny_model`], no random draw, so it is the same bytes on every machine, for
/// comparisons with what another engine computed once from the same file.
pub fn formula_model<B: Backend>(config: &LlamaConfig) -> LlamaForCausalLM<B> {
    struct Formula {
        tensors: BTreeMap<String, HostTensor>,
        path: PathBuf,
    }
    impl TensorSource for Formula {
        fn names(&self) -> Vec<String> {
            self.tensors.keys().cloned().collect()
        }
        fn location(&self) -> &Path {
            &self.path
        }
        fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
            self.tensors
                .get(name)
                .map(|t| HostTensor::new(t.shape.clone(), t.data.clone()))
                .ok_or_else(|| ModelError::format(&self.path, format!("no tensor {name}")))
        }
    }
    let device = B::Device::default();
    let shapes = LlamaForCausalLM::<B>::init_random(config, &device).named_tensors();
    let tensors = shapes
        .into_iter()
        .map(|(name, t)| {
            let salt = name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let data = (0..t.data.len() as u64)
                .map(|i| {
                    if name.contains("norm") {
                        1.0
                    } else {
                        ((i.wrapping_mul(2_654_435_761).wrapping_add(salt) % 1009) as f32 / 1009.0
                            - 0.5)
                            * 0.2
                    }
                })
                .collect();
            (name, HostTensor::new(t.shape, data))
        })
        .collect();
    let source = Formula {
        tensors,
        path: PathBuf::from("formula"),
    };
    LlamaForCausalLM::load(config, &source, None, &device).expect("the formula's own shapes")
}

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

/// A rank-2 PEFT adapter for a [`tiny_config`] model on q, v, up and down projections of every
/// layer, its values a deterministic function of `seed`.
pub fn tiny_adapter(seed: usize) -> PeftAdapter {
    let matrix = |shape: [usize; 2], s: usize| Matrix {
        shape,
        data: (0..shape[0] * shape[1])
            .map(|i| (((i + s) * 7919 % 97) as f32 - 48.0) * 0.01)
            .collect(),
    };
    let c = tiny_config();
    let (e, kv, f) = (
        c.hidden_size,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut modules = BTreeMap::new();
    for i in 0..c.num_hidden_layers {
        for (j, (name, n_in, n_out)) in [
            ("self_attn.q_proj", e, e),
            ("self_attn.v_proj", e, kv),
            ("mlp.up_proj", e, f),
            ("mlp.down_proj", f, e),
        ]
        .into_iter()
        .enumerate()
        {
            let s = seed + 4 * i + j;
            modules.insert(
                format!("model.layers.{i}.{name}"),
                LoraWeights {
                    a: matrix([2, n_in], s),
                    b: matrix([n_out, 2], s + 1),
                },
            );
        }
    }
    let config: PeftConfig = serde_json::from_value(json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "bias": "none"
    }))
    .expect("a valid PEFT config");
    PeftAdapter { config, modules }
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
    write_gguf_as(model, config, GgufExportType::F32, path)
}

/// Writes `model` as a `llama` GGUF with its matrices in `ty` at `path`.
pub fn write_gguf_as<B: Backend>(
    model: &LlamaForCausalLM<B>,
    config: &LlamaConfig,
    ty: GgufExportType,
    path: &Path,
) -> Result<(), ModelError> {
    let (tokens, types) = tiny_tokens();
    let tokenizer = GgufTokenizer {
        tokens,
        types: types.into_iter().map(|t| t as i32).collect(),
        merges: Vec::new(),
        pre: "gpt-2".into(),
        eos: Some(tiny_eos()),
        bos: None,
    };
    gguf_export::write_gguf(model, config, &tokenizer, Some(CHATML_TEMPLATE), ty, path)
}
