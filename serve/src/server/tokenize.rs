//! vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`,
//! so that a client scoring token by token (lm-evaluation-harness's `local-completions`)
//! counts tokens as the server does without a tokenizer of its own.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::completions::parse;
use super::{ApiError, AppState};

/// `POST /tokenize`.
#[derive(Deserialize)]
struct Tokenize {
    prompt: String,
    /// Special tokens the tokenizer adds around a text (BOS for some models); vLLM's default.
    #[serde(default = "yes")]
    add_special_tokens: bool,
    /// Each token's text besides its id.
    #[serde(default)]
    return_token_strs: bool,
}

fn yes() -> bool {
    true
}

/// `POST /detokenize`.
#[derive(Deserialize)]
struct Detokenize {
    tokens: Vec<u32>,
}

/// `POST /tokenize` `{"prompt", "add_special_tokens"}`: the ids, their count and the context.
pub(super) async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: Tokenize = parse(&body)?;
    let tokens = state
        .tokenizer
        .encode_with(&req.prompt, req.add_special_tokens)
        .map_err(|e| ApiError::bad_request(format!("prompt: {e}")))?;
    let mut answer = json!({
        "count": tokens.len(),
        "max_model_len": state.context,
        "tokens": tokens,
    });
    if req.return_token_strs {
        let strs: Vec<String> = tokens
            .iter()
            .map(|&t| state.tokenizer.decode(&[t]).unwrap_or_default())
            .collect();
        answer["token_strs"] = json!(strs);
    }
    Ok(Json(answer))
}

/// `POST /detokenize` `{"tokens"}`: the text.
pub(super) async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: Detokenize = parse(&body)?;
    let vocab = state.tokenizer.id_bound();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(format!(
            "tokens: {bad} is outside the vocabulary (0..{vocab})"
        )));
    }
    let prompt = state
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad_request(format!("tokens: {e}")))?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// `GET /tokenizer_info`: the special tokens, the context and the chat template.
pub(super) async fn info(State(state): State<Arc<AppState>>) -> Json<Value> {
    let t = &state.tokenizer;
    Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": t.bos_token,
        "eos_token": t.eos_token,
        "model_max_length": state.context,
        "vocab_size": t.vocab_size(),
        "chat_template": state.chat.as_ref().map(|c| c.source()),
    }))
}
