//! A ready-to-run model: weights, configuration, tokenizer and chat template, loaded from a
//! GGUF file or an HF folder; or its text side alone ([`TextSide`]), without the weights.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use ft_quant::{GgmlType, QuantFormat, QuantSpec};

use crate::chat::{ChatTemplate, Message};
use crate::config::{HfConfig, LlamaConfig};
use crate::error::ModelError;
use crate::formats::gguf::{GgufFile, GgufTensors};
use crate::formats::safetensors_dir::SafetensorsDir;
use crate::forward::llama::LlamaForCausalLM;
use crate::source;
use crate::tokenizer::TextTokenizer;

/// Everything needed to tokenize, run and detokenize one model.
#[derive(Debug)]
pub struct Pretrained<B: Backend> {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Hyperparameters.
    pub config: LlamaConfig,
    /// The network.
    pub model: LlamaForCausalLM<B>,
    /// Text <-> ids.
    pub tokenizer: TextTokenizer,
    /// The chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
}

/// The storage the decoding kernels read a checkpoint's block linears in when none is asked
/// for: a GGUF's own blocks where a kernel reads them (Q8_0; Q4_0 and Q4_1 as 4-bit), bf16 for
/// bf16, Q8_0 for the formats without a kernel (F16, K-quants), and `None` (f32) for f32
/// files and HF folders.
pub fn default_inference_format(path: &Path) -> Result<Option<QuantFormat>, ModelError> {
    if path.is_dir() {
        return Ok(None);
    }
    let file = GgufFile::open(path)?;
    Ok(file
        .tensors
        .get("blk.0.attn_q.weight")
        .and_then(|t| match t.ty {
            GgmlType::F32 => None,
            GgmlType::Bf16 => Some(QuantFormat::Bf16),
            GgmlType::Q4_0 | GgmlType::Q4_1 => Some(QuantFormat::Q4_0),
            GgmlType::Q8_0 | GgmlType::F16 | GgmlType::Q4K | GgmlType::Q6K => {
                Some(QuantFormat::Q8_0)
            }
        }))
}

/// What tokenizing text for a model needs, read without its weights: the configuration (for
/// the context length), the tokenizer and the chat template.
#[derive(Debug)]
pub struct TextSide {
    /// Hyperparameters.
    pub config: LlamaConfig,
    /// Text <-> ids.
    pub tokenizer: TextTokenizer,
    /// The chat template, if the model has one.
    pub chat_template: Option<ChatTemplate>,
}

impl TextSide {
    /// Reads the text side of a GGUF file or an HF folder (a GGUF is mapped, not read).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(file)?;
        let tokenizer = TextTokenizer::from_gguf(file)?;
        let chat_template = match file
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
        {
            Some(src) => Some(ChatTemplate::new(src)?),
            None => None,
        };
        Self {
            config,
            tokenizer,
            chat_template,
        }
        .checked(file.path())
    }

    fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let config = HfConfig::load(&config_path)?;
        let raw = read_json(&config_path)?;
        let generation = read_json(&dir.join("generation_config.json")).ok();
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json")).ok();
        let mut eos_ids = ids(&raw["eos_token_id"]);
        if let Some(g) = &generation {
            for id in ids(&g["eos_token_id"]) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let token_text = |key: &str| {
            tokenizer_config.as_ref().and_then(|t| match &t[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v["content"].as_str().map(str::to_string),
            })
        };
        let tokenizer = TextTokenizer::from_file(
            &dir.join("tokenizer.json"),
            eos_ids,
            token_text("bos_token"),
            token_text("eos_token"),
        )?;
        let chat_template = match tokenizer_config.as_ref().map(|t| &t["chat_template"]) {
            Some(serde_json::Value::String(src)) => Some(ChatTemplate::new(src)?),
            _ => None,
        };
        Self {
            config,
            tokenizer,
            chat_template,
        }
        .checked(dir)
    }

    /// Refuses a tokenizer that makes ids the embedding has no row for (every such id would
    /// index past the embedding in the forward).
    fn checked(self, path: &Path) -> Result<Self, ModelError> {
        // Ids need not be dense: the largest, not the count, must have a row.
        let (bound, rows) = (self.tokenizer.id_bound(), self.config.vocab_size);
        if bound > rows {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "the tokenizer has {} tokens with ids up to {}, past the embedding's {rows} \
                     rows",
                    self.tokenizer.vocab_size(),
                    bound - 1
                ),
            });
        }
        Ok(self)
    }
}

impl<B: Backend> Pretrained<B> {
    /// Resolves a model source string ([`source::resolve`]) and loads it.
    pub fn from_source(
        source: &str,
        quant: Option<QuantSpec>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let path = source::resolve(source)?;
        Self::load(&path, quant, device)
    }

    /// Loads a GGUF file or an HF folder. `quant` is the storage of the block linear weights;
    /// `None` keeps what the checkpoint stores (f32 for dense checkpoints; GGUF blocks are
    /// dequantized to f32).
    pub fn load(
        path: &Path,
        quant: Option<QuantSpec>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        if path.is_dir() {
            Self::load_hf_dir(path, quant, device)
        } else {
            Self::load_gguf(path, quant, device)
        }
    }

    fn load_gguf(
        path: &Path,
        quant: Option<QuantSpec>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let TextSide {
            config,
            tokenizer,
            chat_template,
        } = TextSide::from_gguf(&file)?;
        let permuted = (file.get_str("general.architecture")? == "llama")
            .then_some((config.num_attention_heads, config.num_key_value_heads));
        let tensors = GgufTensors::new(file, permuted)?;
        let model = LlamaForCausalLM::load(&config, &tensors, quant, device)?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            model,
            tokenizer,
            chat_template,
        })
    }

    fn load_hf_dir(
        dir: &Path,
        quant: Option<QuantSpec>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let TextSide {
            config,
            tokenizer,
            chat_template,
        } = TextSide::from_hf_dir(dir)?;
        let tensors = SafetensorsDir::open(dir)?;
        let model = LlamaForCausalLM::load(&config, &tensors, quant, device)?;
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            model,
            tokenizer,
            chat_template,
        })
    }

    /// Reads the PEFT LoRA adapter in `dir` and attaches it to the model.
    pub fn attach_adapter(&mut self, dir: &Path) -> Result<(), ModelError> {
        let adapter = ft_adapters::PeftAdapter::read(dir)?;
        self.model.attach_adapter(&adapter, dir)
    }

    /// The prompt text for a single user message, through the chat template.
    pub fn chat_prompt(&self, user: &str) -> Result<String, ModelError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!("{} has no chat template", self.path.display()))
        })?;
        let messages = [Message {
            role: "user".into(),
            content: user.into(),
        }];
        template.render(
            &messages,
            true,
            self.tokenizer.bos_token.as_deref(),
            self.tokenizer.eos_token.as_deref(),
        )
    }

    /// Fails with a clear error when `tokens` exceed the model's context.
    pub fn check_context(&self, what: &str, tokens: usize) -> Result<(), ModelError> {
        let context = self.config.max_position_embeddings;
        if tokens > context {
            return Err(ModelError::ContextOverflow {
                what: what.to_string(),
                tokens,
                context,
            });
        }
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let text = crate::text_file::read(path, crate::text_file::MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}

/// A token id or list of ids from a config value.
fn ids(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}
