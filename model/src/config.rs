//! Model hyperparameters: a serde mirror of HF `config.json`, the same read from GGUF
//! metadata, and the one runtime [`LlamaConfig`] both convert into.

use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::error::ModelError;
use crate::formats::gguf::GgufFile;

/// How RoPE frequencies are rescaled for longer contexts.
#[derive(Config, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (HF `"linear"`).
    Linear {
        /// Context extension factor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (HF `"llama3"`).
    Llama3 {
        /// Context extension factor.
        factor: f64,
        /// Wavelengths longer than original_context / low_freq_factor are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths shorter than original_context / high_freq_factor are kept.
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

/// Hyperparameters of a Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2).
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Optional RoPE rescaling.
    #[config(default = "None")]
    pub rope_scaling: Option<RopeScaling>,
    /// Output head shares the embedding matrix.
    #[config(default = true)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    #[config(default = false)]
    pub attention_bias: bool,
}

/// `config.json` as HF writes it for llama-family models; only the fields ft reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// e.g. `"llama"`, `"mistral"`, `"qwen2"`.
    pub model_type: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    /// Context length.
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// RoPE scaling, as a free-form object.
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the output head is the embedding.
    pub tie_word_embeddings: Option<bool>,
    /// q/k/v (and o) bias; Qwen2 always has q/k/v bias and omits this field.
    pub attention_bias: Option<bool>,
    /// Llama's MLP bias flag; ft supports only false.
    pub mlp_bias: Option<bool>,
    /// Activation; ft supports only SiLU.
    pub hidden_act: Option<String>,
}

impl HfConfig {
    /// Reads and validates `config.json`, returning the runtime config.
    pub fn load(path: &Path) -> Result<LlamaConfig, ModelError> {
        let text = crate::text_file::read(path, crate::text_file::MAX_CONFIG_BYTES)?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, format!("invalid config: {e}")))?;
        hf.into_config(path)
    }

    /// Fills in defaults and checks that ft supports the architecture.
    pub fn into_config(self, path: &Path) -> Result<LlamaConfig, ModelError> {
        let unsupported = |what: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            what,
        };
        let model_type = self.model_type.as_deref().unwrap_or("");
        let arch = self.architectures.first().map(String::as_str).unwrap_or("");
        let is_qwen2 = model_type == "qwen2" || arch == "Qwen2ForCausalLM";
        let known = ["llama", "mistral", "qwen2"].contains(&model_type)
            || ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"].contains(&arch);
        if !known {
            return Err(unsupported(format!(
                "unsupported architecture {arch:?} (model_type {model_type:?}); ft runs llama, mistral and qwen2"
            )));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!(
                "hidden_act {act:?} (ft implements silu)"
            )));
        }
        if self.mlp_bias == Some(true) {
            return Err(unsupported("mlp_bias = true".into()));
        }
        let rope_scaling = self
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| rope_scaling_from_json(v).map_err(unsupported))
            .transpose()?;
        let heads = self.num_attention_heads;
        let config = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads.max(1)),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(is_qwen2),
        };
        config.validate().map_err(unsupported)?;
        Ok(config)
    }
}

fn rope_scaling_from_json(v: &serde_json::Value) -> Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |key: &str| {
        v.get(key)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope_scaling.{key} is missing or not a number"))
    };
    match kind {
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        "default" => Err("rope_scaling of type \"default\" with parameters".into()),
        other => Err(format!(
            "rope_scaling type {other:?} (ft implements linear and llama3)"
        )),
    }
}

impl LlamaConfig {
    /// The `[out, in]` shape of a block projection named by its module (`q_proj`, ...,
    /// `down_proj`, with or without its `self_attn.`/`mlp.` prefix); `None` for another name.
    pub fn projection_shape(&self, module: &str) -> Option<[usize; 2]> {
        let (e, q, kv, f) = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        );
        let name = module.rsplit('.').next().unwrap_or(module);
        Some(match name {
            "q_proj" => [q, e],
            "k_proj" | "v_proj" => [kv, e],
            "o_proj" => [e, q],
            "gate_proj" | "up_proj" => [f, e],
            "down_proj" => [e, f],
            _ => return None,
        })
    }

    /// Reads the hyperparameters of a `llama` or `qwen2` GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf.get_str("general.architecture")?.to_string();
        if arch != "llama" && arch != "qwen2" {
            return Err(ModelError::Unsupported {
                path: gguf.path().to_path_buf(),
                what: format!("unsupported architecture {arch:?}; ft runs llama and qwen2"),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| gguf.get_u64(&key(k)).map(|v| v as usize);
        let heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let vocab_size = match gguf.get_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => gguf.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match gguf
            .metadata
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: gguf.get_f64(&key("rope.scaling.factor"))?,
            }),
            Some(other) => {
                return Err(ModelError::Unsupported {
                    path: gguf.path().to_path_buf(),
                    what: format!("rope scaling type {other:?} (ft implements linear)"),
                })
            }
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
            head_dim: u("rope.dimension_count").unwrap_or(hidden / heads.max(1)),
            max_position_embeddings: u("context_length")?,
            rms_norm_eps: gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: gguf.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: !gguf.tensors.contains_key("output.weight"),
            attention_bias: gguf.tensors.contains_key("blk.0.attn_q.bias"),
        };
        config.validate().map_err(|what| ModelError::Unsupported {
            path: gguf.path().to_path_buf(),
            what,
        })?;
        Ok(config)
    }

    /// Checks the relations between sizes that the model relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err("attention heads must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        // Bounds far above any open model, so that a crafted file is refused before its sizes
        // become allocations (RoPE tables of max_position_embeddings rows, one layer per block).
        for (name, value, limit) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 10),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 20,
            ),
        ] {
            if value > limit {
                return Err(format!("{name} {value} is beyond ft's limit of {limit}"));
            }
        }
        Ok(())
    }

    /// The inverse frequencies of RoPE, one per pair of dimensions, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // transformers' `_compute_llama3_parameters`.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tiny::tiny_config;

    #[test]
    fn sizes_a_crafted_file_could_claim_are_refused_before_they_are_allocated() {
        assert!(tiny_config().validate().is_ok());
        for (field, edit) in [
            (
                "max_position_embeddings",
                (|c: &mut super::LlamaConfig| c.max_position_embeddings = 1 << 40)
                    as fn(&mut super::LlamaConfig),
            ),
            ("num_hidden_layers", |c| c.num_hidden_layers = 1 << 30),
            ("vocab_size", |c| c.vocab_size = usize::MAX),
            ("intermediate_size", |c| c.intermediate_size = 1 << 40),
        ] {
            let mut c = tiny_config();
            edit(&mut c);
            let err = c.validate().unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
