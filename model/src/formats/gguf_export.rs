//! Writes a model as a GGUF file that llama.cpp loads: llama-family metadata, the byte-level
//! BPE tokenizer (tokens, merges, token types, pre-tokenizer name, special ids, chat
//! template), q/k rows permuted back into llama.cpp's interleaved order, 1-D tensors in f32
//! and matrices in F32, F16 or Q8_0, or as the blocks a post-training quantization gave.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use ft_quant::ggml::{quantize_f16, quantize_q8_0};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::formats::gguf::{gguf_name, permute_block_rows, permute_rows, GgufValue};
use crate::formats::gguf_write::GgufWriter;
use crate::forward::llama::LlamaForCausalLM;
use crate::pretrained::Pretrained;
use crate::ptq::Quantized;
use crate::tokenizer::{LLAMA3_SPLIT, QWEN2_SPLIT};

/// The storage of the matrices of an exported GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufExportType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// llama.cpp's 8-bit blocks of 32 (matrices whose rows are not a multiple of 32 stay F16).
    Q8_0,
}

impl FromStr for GgufExportType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("expected f32, f16 or q8_0, got {other:?}")),
        }
    }
}

/// What GGUF says about a tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizer {
    /// Token strings by id.
    pub tokens: Vec<String>,
    /// GGUF token types (1 normal, 3 control, 4 user-defined).
    pub types: Vec<i32>,
    /// BPE merges as "a b".
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name.
    pub pre: String,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
}

impl GgufTokenizer {
    /// Reads a byte-level BPE `tokenizer.json`; other tokenizers have no GGUF form here.
    pub fn from_json(json: &str, eos: Option<u32>, bos: Option<u32>) -> Result<Self, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if v["model"]["type"] != "BPE" {
            return Err(format!("tokenizer model {} is not BPE", v["model"]["type"]));
        }
        let vocab = v["model"]["vocab"]
            .as_object()
            .ok_or("tokenizer has no vocab")?;
        let mut tokens = vec![String::new(); vocab.len()];
        let mut types = vec![1i32; vocab.len()];
        for (token, id) in vocab {
            let id = id.as_u64().ok_or("non-integer token id")? as usize;
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
                types.resize(id + 1, 1);
            }
            tokens[id] = token.clone();
        }
        for added in v["added_tokens"].as_array().into_iter().flatten() {
            let id = added["id"].as_u64().ok_or("added token without id")? as usize;
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
                types.resize(id + 1, 1);
            }
            tokens[id] = added["content"].as_str().unwrap_or_default().to_string();
            types[id] = if added["special"] == true { 3 } else { 4 };
        }
        let merges = v["model"]["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) => Ok(format!(
                    "{} {}",
                    pair[0].as_str().unwrap_or(""),
                    pair[1].as_str().unwrap_or("")
                )),
                _ => Err("merge is neither \"a b\" nor [a, b]".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            tokens,
            types,
            merges,
            pre: pre_name(&v["pre_tokenizer"])?,
            eos,
            bos,
        })
    }
}

/// llama.cpp's name for a pre-tokenizer that ft can also build back from GGUF.
fn pre_name(pre: &Value) -> Result<String, String> {
    let kind = |p: &Value| p["type"].as_str().unwrap_or("").to_string();
    let regex = |p: &Value| p["pattern"]["Regex"].as_str().unwrap_or("").to_string();
    let parts: Vec<&Value> = match kind(pre).as_str() {
        "Sequence" => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let shape: Vec<String> = parts.iter().map(|p| kind(p)).collect();
    Ok(
        match shape.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["ByteLevel"] => "gpt-2".into(),
            ["Digits", "ByteLevel"] if parts[0]["individual_digits"] == true => "smollm".into(),
            ["Split", "ByteLevel"] if regex(parts[0]) == LLAMA3_SPLIT => "llama-bpe".into(),
            ["Split", "ByteLevel"] if regex(parts[0]) == QWEN2_SPLIT => "qwen2".into(),
            _ => return Err(format!("pre-tokenizer {shape:?} has no GGUF name ft knows")),
        },
    )
}

/// Writes `p` as a GGUF file with matrices in `ty`.
pub fn write_pretrained_gguf<B: Backend>(
    p: &Pretrained<B>,
    ty: GgufExportType,
    path: &Path,
) -> Result<(), ModelError> {
    write_pretrained_gguf_quantized(p, ty, &BTreeMap::new(), path)
}

/// Writes `p` as a GGUF file: the matrices named in `quantized` as their ggml blocks (a
/// post-training quantization's codes, written as they are), the other matrices in `ty`.
pub fn write_pretrained_gguf_quantized<B: Backend>(
    p: &Pretrained<B>,
    ty: GgufExportType,
    quantized: &BTreeMap<String, Quantized>,
    path: &Path,
) -> Result<(), ModelError> {
    let tokenizer = GgufTokenizer::from_json(
        &p.tokenizer.to_json()?,
        p.tokenizer.eos_ids.first().copied(),
        p.tokenizer
            .bos_token
            .as_deref()
            .and_then(|t| p.tokenizer.token_to_id(t)),
    )
    .map_err(ModelError::Tokenizer)?;
    write_gguf(
        &p.model,
        &p.config,
        &tokenizer,
        p.chat_template.as_ref().map(|t| t.source()),
        Matrices { ty, quantized },
        path,
    )
}

/// How a GGUF file stores its matrices: those in `quantized` as their ggml blocks, the
/// others in `ty`.
#[derive(Debug, Clone, Copy)]
pub struct Matrices<'a> {
    /// The storage of the matrices not in `quantized`.
    pub ty: GgufExportType,
    /// Quantized matrices by parameter name.
    pub quantized: &'a BTreeMap<String, Quantized>,
}

impl From<GgufExportType> for Matrices<'static> {
    fn from(ty: GgufExportType) -> Self {
        static NONE: BTreeMap<String, Quantized> = BTreeMap::new();
        Self {
            ty,
            quantized: &NONE,
        }
    }
}

/// llama.cpp's architecture name for a model of `c`: `qwen2` for q/k/v biases, else `llama`.
/// Qwen2 keeps HF's row order; llama.cpp permutes the q/k rows of `llama` models only.
pub fn architecture(c: &LlamaConfig) -> &'static str {
    if c.attention_bias {
        "qwen2"
    } else {
        "llama"
    }
}

/// Writes a model and its tokenizer as a GGUF file with its matrices as `matrices` says.
pub fn write_gguf<'a, B: Backend>(
    model: &LlamaForCausalLM<B>,
    c: &LlamaConfig,
    tokenizer: &GgufTokenizer,
    chat_template: Option<&str>,
    matrices: impl Into<Matrices<'a>>,
    path: &Path,
) -> Result<(), ModelError> {
    let Matrices { ty, quantized } = matrices.into();
    let arch = architecture(c);
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let strings =
        |v: &[String]| GgufValue::Array(v.iter().cloned().map(GgufValue::String).collect());
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String(arch.into()))
        .metadata("general.alignment", GgufValue::U32(32))
        .metadata(&key("context_length"), u32v(c.max_position_embeddings))
        .metadata(&key("embedding_length"), u32v(c.hidden_size))
        .metadata(&key("block_count"), u32v(c.num_hidden_layers))
        .metadata(&key("feed_forward_length"), u32v(c.intermediate_size))
        .metadata(&key("attention.head_count"), u32v(c.num_attention_heads))
        .metadata(&key("attention.head_count_kv"), u32v(c.num_key_value_heads))
        .metadata(&key("rope.dimension_count"), u32v(c.head_dim))
        .metadata(&key("rope.freq_base"), GgufValue::F32(c.rope_theta as f32))
        .metadata(
            &key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps as f32),
        )
        .metadata(&key("vocab_size"), u32v(c.vocab_size))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata(
            "tokenizer.ggml.pre",
            GgufValue::String(tokenizer.pre.clone()),
        )
        .metadata("tokenizer.ggml.tokens", strings(&tokenizer.tokens))
        .metadata(
            "tokenizer.ggml.token_type",
            GgufValue::Array(tokenizer.types.iter().map(|t| GgufValue::I32(*t)).collect()),
        )
        .metadata("tokenizer.ggml.merges", strings(&tokenizer.merges));
    if let Some(eos) = tokenizer.eos {
        w.metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(eos));
    }
    if let Some(bos) = tokenizer.bos {
        w.metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(bos));
    }
    if let Some(template) = chat_template {
        w.metadata(
            "tokenizer.chat_template",
            GgufValue::String(template.into()),
        );
    }
    for (name, t) in model.named_tensors() {
        let gguf = gguf_name(&name)
            .ok_or_else(|| ModelError::format(path, format!("no GGUF name for {name}")))?;
        // llama.cpp's llama layout interleaves the q/k rows of each head.
        let heads = match (
            arch,
            name.contains("self_attn.q_proj."),
            name.contains("self_attn.k_proj."),
        ) {
            ("llama", true, _) => Some(c.num_attention_heads),
            ("llama", _, true) => Some(c.num_key_value_heads),
            _ => None,
        };
        if let Some((block_ty, bytes)) = quantized.get(&name).and_then(Quantized::ggml_blocks) {
            let bytes = match heads {
                Some(h) => permute_block_rows(&bytes, t.shape[0], h),
                None => bytes,
            };
            w.tensor(&gguf, t.shape.clone(), block_ty.id(), bytes);
            continue;
        }
        let t = match heads {
            Some(h) => permute_rows(t, h),
            None => t,
        };
        let matrix = t.shape.len() == 2;
        match ty {
            _ if !matrix => w.tensor_f32(&gguf, t.shape.clone(), &t.data),
            GgufExportType::F32 => w.tensor_f32(&gguf, t.shape.clone(), &t.data),
            GgufExportType::Q8_0 if t.shape[1] % 32 == 0 => {
                let bytes = quantize_q8_0(&t.data)
                    .map_err(|e| ModelError::format(path, format!("{name}: {e}")))?;
                w.tensor(&gguf, t.shape.clone(), 8, bytes)
            }
            GgufExportType::F16 | GgufExportType::Q8_0 => {
                w.tensor(&gguf, t.shape.clone(), 1, quantize_f16(&t.data))
            }
        };
    }
    w.write(path)
}
