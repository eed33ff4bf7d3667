//! The OpenAI API's request and response bodies for completions and chat completions, with
//! vLLM's extensions (`top_k`, `ignore_eos`, `use_beam_search` with `best_of` beams), and
//! their checks: a field out of range is a 400 naming the field.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::request::{FinishReason, GenerationParams, TokenLogprob};
use crate::sampling::SamplingParams;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Sampling {
    /// New tokens at most (default 16 for completions, the context for chat).
    pub max_tokens: Option<usize>,
    /// Chat's newer name for max_tokens.
    pub max_completion_tokens: Option<usize>,
    /// 0 to 2; 0 is greedy (default 1).
    pub temperature: Option<f32>,
    /// (0, 1] (default 1).
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 keeps all.
    pub top_k: Option<i64>,
    /// Seed of the draws.
    pub seed: Option<u64>,
    /// Stop strings (at most 4 as in the OpenAI API; more are accepted).
    pub stop: Option<OneOrMany>,
    /// Stream the result as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds usage to the last streamed chunk.
    pub stream_options: Option<Value>,
    /// Choices; only 1 is supported.
    pub n: Option<usize>,
    /// Keep generating past the end-of-sequence token (vLLM).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Beam search (vLLM) with `best_of` beams.
    #[serde(default)]
    pub use_beam_search: bool,
    /// Beams of beam search.
    pub best_of: Option<usize>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The base model's id or an adapter's name.
    pub model: String,
    /// A string, a list of strings, a list of token ids or a list of such lists; read by
    /// [`CompletionRequest::prompts`].
    pub prompt: Value,
    /// Log-probabilities of the top N tokens (0 to 20) besides the chosen one.
    pub logprobs: Option<usize>,
    /// Return the prompt before the completion, and with `logprobs` the log-probability of
    /// each prompt token (the legacy API's way to score a text; `max_tokens` may then be 0).
    #[serde(default)]
    pub echo: bool,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One chat message of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// system, user or assistant.
    pub role: String,
    /// The text, or a list of text parts.
    pub content: Content,
}

/// A message's content: a string or OpenAI's list of parts (only text parts are accepted).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: String,
}

impl Content {
    /// The text of the content; a part that is not text is an error naming its type.
    pub fn text(&self) -> Result<String, Invalid> {
        match self {
            Self::Text(t) => Ok(t.clone()),
            Self::Parts(parts) => parts
                .iter()
                .map(|p| match p.kind.as_str() {
                    "text" => Ok(p.text.as_str()),
                    other => Err(format!(
                        "messages: content parts of type {other:?} are not supported"
                    )),
                })
                .collect(),
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The base model's id or an adapter's name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Report log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// Most likely alternatives per token (0 to 20), with `logprobs`.
    pub top_logprobs: Option<usize>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A request's fault, for a 400.
pub type Invalid = String;

/// One prompt of a completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids, as evaluation harnesses send them.
    Ids(Vec<u32>),
}

/// Prompts one request may carry at most (each is a request of the engine).
pub const MAX_PROMPTS: usize = 256;

impl CompletionRequest {
    /// The prompts: one string, a list of strings, a list of token ids, or a list of lists of
    /// token ids, as the OpenAI API takes them.
    pub fn prompts(&self) -> Result<Vec<Prompt>, Invalid> {
        const SHAPE: &str = "prompt: must be a string, a list of strings, a list of token ids \
                             or a list of lists of token ids";
        let ids = |v: &Value| -> Option<Vec<u32>> {
            v.as_array()?
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        };
        let prompts = match &self.prompt {
            Value::String(s) => vec![Prompt::Text(s.clone())],
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
                vec![Prompt::Ids(ids(&self.prompt).ok_or(SHAPE)?)]
            }
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    other => ids(other).map(Prompt::Ids).ok_or(SHAPE),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(SHAPE.into()),
        };
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return Err(format!(
                "prompt: {} prompts; one request takes 1 to {MAX_PROMPTS}",
                prompts.len()
            ));
        }
        if self.sampling.stream && prompts.len() > 1 {
            return Err("prompt: a streamed request takes one prompt".into());
        }
        Ok(prompts)
    }

    /// How many alternatives to score each prompt token with: with `echo` and `logprobs`
    /// the prompt is scored; `echo` alone only sends it back.
    pub fn prompt_logprobs(&self) -> Option<usize> {
        self.logprobs.filter(|_| self.echo)
    }
}

impl Sampling {
    /// The engine's parameters: `default_max` when max_tokens is absent, `logprobs` top-N,
    /// `eos` as the stop ids unless `ignore_eos`; `prompt_logprobs` scores the prompt; with
    /// `echo` max_tokens may be 0.
    pub fn params(
        &self,
        default_max: usize,
        logprobs: Option<usize>,
        prompt_logprobs: Option<usize>,
        echo: bool,
        eos: &[u32],
        seed: u64,
    ) -> Result<GenerationParams, Invalid> {
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max);
        if max_tokens == 0 && !echo {
            return Err("max_tokens: must be at least 1 (0 only with echo)".into());
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!("temperature: {temperature} is not in [0, 2]"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top_p: {top_p} is not in (0, 1]"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => return Err(format!("top_k: {k} must be -1, 0 or positive")),
        };
        if self.n.is_some_and(|n| n != 1) {
            return Err("n: only 1 choice per request is supported".into());
        }
        if let Some(k) = logprobs.filter(|&k| k > 20) {
            return Err(format!("logprobs: {k} is more than 20"));
        }
        let beams = if self.use_beam_search {
            if logprobs.is_some() || prompt_logprobs.is_some() {
                return Err("logprobs: not available with beam search".into());
            }
            match self.best_of {
                Some(b) if (1..=16).contains(&b) => b,
                Some(b) => return Err(format!("best_of: {b} beams is not in 1..=16")),
                None => return Err("best_of: beam search needs the number of beams".into()),
            }
        } else {
            1
        };
        // Beam search is deterministic; one beam is greedy decoding.
        let temperature = if self.use_beam_search {
            0.0
        } else {
            temperature
        };
        Ok(GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: self.seed.unwrap_or(seed),
            },
            beams,
            stop_ids: if self.ignore_eos {
                Vec::new()
            } else {
                eos.to_vec()
            },
            stop_strings: self
                .stop
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            logprobs,
            prompt_logprobs,
        })
    }

    /// Whether the last streamed chunk carries usage.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
}

impl Usage {
    /// The `usage` object.
    pub fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// One token with its text, for log-probabilities.
#[derive(Debug, Clone)]
pub struct TokenOut {
    /// The token's own text.
    pub piece: String,
    /// Its log-probabilities; `None` for an echoed prompt's first token, which nothing
    /// before it predicts.
    pub logprob: Option<TokenLogprob>,
    /// The alternatives' texts, in `logprob.top` order.
    pub top_pieces: Vec<String>,
}

/// The `logprobs` object of a choice.
pub fn logprobs_json(endpoint: Endpoint, tokens: &[TokenOut]) -> Value {
    match endpoint {
        Endpoint::Completions => {
            let mut offset = 0;
            let mut offsets = Vec::new();
            for t in tokens {
                offsets.push(offset);
                offset += t.piece.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| &t.piece).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter()
                    .map(|t| t.logprob.as_ref().map(|l| l.logprob))
                    .collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.logprob.as_ref().map(|l| {
                        t.top_pieces.iter().zip(&l.top)
                            .map(|(p, (_, lp))| (p.clone(), json!(lp)))
                            .collect::<serde_json::Map<_, _>>()
                    })
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Endpoint::Chat => json!({
            "content": tokens.iter().filter_map(|t| t.logprob.as_ref().map(|l| json!({
                "token": t.piece,
                "logprob": l.logprob,
                "bytes": t.piece.as_bytes(),
                "top_logprobs": t.top_pieces.iter().zip(&l.top).map(|(p, (_, lp))| json!({
                    "token": p, "logprob": lp, "bytes": p.as_bytes(),
                })).collect::<Vec<_>>(),
            }))).collect::<Vec<_>>(),
        }),
    }
}

/// One finished choice of a whole response.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Its text (after the echoed prompt, if any).
    pub text: String,
    /// The `logprobs` object, if asked for.
    pub logprobs: Option<Value>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Its token counts.
    pub usage: Usage,
}

/// What every response to one request shares.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// `cmpl-...` or `chatcmpl-...`.
    pub id: String,
    /// The model named in the request.
    pub model: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A whole (non-streamed) response: one choice per prompt, in order, and their usage
    /// summed.
    pub fn whole(&self, choices: &[Choice]) -> Value {
        let mut usage = Usage::default();
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                usage.prompt += c.usage.prompt;
                usage.completion += c.usage.completion;
                let finish = c.finish.as_str();
                match self.endpoint {
                    Endpoint::Completions => json!({
                        "index": index, "text": c.text, "logprobs": c.logprobs,
                        "finish_reason": finish,
                    }),
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": c.logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage.json(),
        })
    }

    /// One streamed chunk: new `text` (the first chat chunk also names the role), or the
    /// end with its reason.
    pub fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        logprobs: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = match (text, first) {
                    (Some(t), true) => json!({"role": "assistant", "content": t}),
                    (Some(t), false) => json!({"content": t}),
                    (None, _) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The last streamed chunk when usage was asked for: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.json(),
        })
    }
}

/// An OpenAI error body.
pub fn error_json(message: &str, kind: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": null}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(v: Value) -> Sampling {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let err = |v| {
            sampling(v)
                .params(16, None, None, false, &[2], 0)
                .unwrap_err()
        };
        assert!(err(json!({"temperature": 3.0})).starts_with("temperature:"));
        assert!(err(json!({"top_p": 0.0})).starts_with("top_p:"));
        assert!(err(json!({"max_tokens": 0})).starts_with("max_tokens:"));
        assert!(err(json!({"n": 2})).starts_with("n:"));
        assert!(err(json!({"top_k": -3})).starts_with("top_k:"));
        assert!(err(json!({"use_beam_search": true})).starts_with("best_of:"));
        let e = sampling(json!({}))
            .params(16, Some(21), None, false, &[2], 0)
            .unwrap_err();
        assert!(e.starts_with("logprobs:"));
        let scored = sampling(json!({"max_tokens": 0}))
            .params(16, Some(1), Some(1), true, &[2], 0)
            .unwrap();
        assert_eq!((scored.max_tokens, scored.prompt_logprobs), (0, Some(1)));
    }

    #[test]
    fn prompts_come_as_text_token_ids_or_lists_of_either() {
        let prompts = |v: Value| {
            let mut r = json!({"model": "m"});
            r["prompt"] = v;
            serde_json::from_value::<CompletionRequest>(r)
                .unwrap()
                .prompts()
        };
        assert_eq!(prompts(json!("hi")), Ok(vec![Prompt::Text("hi".into())]));
        assert_eq!(prompts(json!([1, 2])), Ok(vec![Prompt::Ids(vec![1, 2])]));
        assert_eq!(
            prompts(json!([[1], "a"])),
            Ok(vec![Prompt::Ids(vec![1]), Prompt::Text("a".into())])
        );
        for bad in [
            json!(3),
            json!([]),
            json!([1, -2]),
            json!([[1], [4294967296u64]]),
            json!([{"a": 1}]),
            json!([1, "a"]),
        ] {
            let e = prompts(bad.clone()).unwrap_err();
            assert!(e.starts_with("prompt:"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_extensions() {
        let p = sampling(json!({"stop": "\n", "ignore_eos": true, "seed": 4}))
            .params(16, None, None, false, &[2], 0)
            .unwrap();
        assert_eq!(
            (p.max_tokens, p.sampling.temperature, p.sampling.seed),
            (16, 1.0, 4)
        );
        assert_eq!(p.stop_strings, vec!["\n".to_string()]);
        assert!(p.stop_ids.is_empty());
        let p =
            sampling(json!({"use_beam_search": true, "best_of": 3, "max_completion_tokens": 5}))
                .params(16, None, None, false, &[2], 0)
                .unwrap();
        assert_eq!((p.beams, p.max_tokens, p.stop_ids.clone()), (3, 5, vec![2]));
    }
}
