//! Text to token ids and back, through the `tokenizers` crate: loaded from `tokenizer.json`, or
//! built from the vocabulary and merges that a GGUF file carries in its metadata.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};

use crate::error::ModelError;
use crate::formats::gguf::GgufFile;

/// A tokenizer plus the special tokens generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    /// The BOS token's text, for chat templates.
    pub bos_token: Option<String>,
    /// The EOS token's text, for chat templates.
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TextTokenizer(vocab {}, eos {:?})",
            self.vocab_size(),
            self.eos_ids
        )
    }
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// The longest added (special or user-defined) token read. The `tokenizers` crate matches
/// added tokens with an Aho-Corasick automaton whose dense form grows with the tokens'
/// length times the alphabet: one crafted token of 300 KB took it minutes to build. Real
/// added tokens are a few dozen bytes.
const MAX_ADDED_TOKEN_BYTES: usize = 1024;

/// Refuses an added token longer than [`MAX_ADDED_TOKEN_BYTES`].
fn check_added_tokens<'a>(
    path: &Path,
    contents: impl Iterator<Item = &'a str>,
) -> Result<(), ModelError> {
    for (i, content) in contents.enumerate() {
        if content.len() > MAX_ADDED_TOKEN_BYTES {
            return Err(ModelError::format(
                path,
                format!(
                    "added token {i} is {} bytes long; ft reads added tokens of at most \
                     {MAX_ADDED_TOKEN_BYTES} bytes",
                    content.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Split regexes of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`.
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TextTokenizer {
    /// Loads `tokenizer.json`; `eos_ids` come from the model's config.
    pub fn from_file(
        path: &Path,
        eos_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ModelError> {
        let text = crate::text_file::read(path, crate::text_file::MAX_TOKENIZER_BYTES)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(path, format!("invalid tokenizer: {e}")))?;
        let added = json["added_tokens"].as_array().into_iter().flatten();
        let contents = added.map(|t| t["content"].as_str().unwrap_or_default());
        check_added_tokens(path, contents)?;
        let inner = crate::caught::catch(|| tokenizers::Tokenizer::from_str(&text))
            .map_err(|why| ModelError::format(path, format!("invalid tokenizer: {why}")))?
            .map_err(|e| ModelError::format(path, format!("invalid tokenizer: {e}")))?;
        Ok(Self {
            inner,
            eos_ids,
            bos_token,
            eos_token,
        })
    }

    /// Builds the BPE tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let path = gguf.path();
        let kind = gguf.get_str("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "tokenizer.ggml.model {kind:?}: ft builds BPE (gpt2) tokenizers from GGUF; use an HF folder with tokenizer.json"
                ),
            });
        }
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            gguf.get_array(key)?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ModelError::format(path, format!("{key} holds a non-string"))
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match gguf.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .unwrap_or_default()
                .iter()
                .map(|t| t.as_u64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let added = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED);
        check_added_tokens(path, added.map(|(token, _)| token.as_str()))?;
        let pre = gguf
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let spec = bpe_tokenizer_json(&tokens, &merges, &types, pre).map_err(|what| {
            ModelError::Unsupported {
                path: path.to_path_buf(),
                what,
            }
        })?;
        let spec = spec.to_string();
        let inner = crate::caught::catch(|| tokenizers::Tokenizer::from_str(&spec))
            .map_err(|why| ModelError::format(path, format!("tokenizer metadata: {why}")))?
            .map_err(|e| ModelError::format(path, format!("tokenizer metadata: {e}")))?;
        let token = |key: &str| {
            gguf.metadata
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokens.get(id as usize).map(|t| (id as u32, t.clone())))
        };
        let eos = token("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some((id, _)) = token("tokenizer.ggml.eot_token_id") {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Self {
            inner,
            eos_ids,
            bos_token: token("tokenizer.ggml.bos_token_id").map(|(_, t)| t),
            eos_token: eos.map(|(_, t)| t),
        })
    }

    /// Token ids of `text`, special tokens such as `<|im_start|>` parsed, no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, false)
    }

    /// Token ids of `text`, with the tokens the tokenizer's post-processor adds around a
    /// text (a BOS, for models that have one) when `add_special_tokens`.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One past the largest id the tokenizer can make (its vocabulary's ids need not be
    /// dense: an added token may take any id).
    pub fn id_bound(&self) -> usize {
        let vocab = self.inner.get_vocab(true);
        vocab.values().max().map_or(0, |&id| id as usize + 1)
    }

    /// The id of a token's exact text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The `tokenizer.json` of a byte-level BPE tokenizer (GPT-2 style, as GGUF files describe
/// them): `tokens` by id, `merges` as "a b", GGUF token types (3 = control, 4 = user-defined
/// become added tokens) and llama.cpp's pre-tokenizer name.
pub fn bpe_tokenizer_json(
    tokens: &[String],
    merges: &[String],
    types: &[u64],
    pre: &str,
) -> Result<Value, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        // llama.cpp names it "gpt-2"; GGUF files written by earlier ft versions say "gpt2".
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} (ft knows smollm, gpt2, llama-bpe, qwen2); use an HF folder with tokenizer.json"
            ))
        }
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, (content, &t))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == TOKEN_TYPE_CONTROL})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// GPT-2's byte-to-character table: the 256 single-byte tokens of a byte-level BPE, by byte.
pub fn byte_level_alphabet() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).map(String::from).unwrap_or_default()
        })
        .collect()
}
