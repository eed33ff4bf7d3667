//! What a client asks the engine for and what the engine reports back.

use crate::error::EngineError;
use crate::sampling::SamplingParams;

/// Identifies a request within one engine.
pub type RequestId = u64;

/// How to continue one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// New tokens at most; 0 only computes the prompt (for its `prompt_logprobs`).
    pub max_tokens: usize,
    /// Temperature, top-k, top-p and seed (ignored by beam search).
    pub sampling: SamplingParams,
    /// Beams of beam search; 1 samples (or decodes greedily) instead.
    pub beams: usize,
    /// Token ids that end generation (not part of the output).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation where they first occur (not part of the output).
    pub stop_strings: Vec<String>,
    /// Log-probabilities of this many most likely tokens at each step, besides the chosen
    /// token's; `None` reports none.
    pub logprobs: Option<usize>,
    /// The log-probability of every prompt token after the first, with this many most likely
    /// alternatives at each position (the legacy OpenAI API's `echo` with `logprobs`, which
    /// evaluation harnesses score answers with); `None` reports none. Such a prompt is
    /// computed whole, never taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            beams: 1,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// Which requests the engine serves first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    /// A client waits for it: admitted before any batch request, and a batch request gives
    /// up its row when there is no other room.
    #[default]
    Interactive,
    /// A batch job's: runs in the rows interactive requests leave free.
    Batch,
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// The adapter to apply, by name; `None` runs the base model.
    pub adapter: Option<String>,
    /// How to generate.
    pub params: GenerationParams,
    /// Who is waiting for it.
    pub priority: Priority,
}

/// The log-probability of a chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// log p(chosen token), from the model's logits before temperature.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// max_tokens (or the model's context).
    Length,
}

impl FinishReason {
    /// The OpenAI API's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What one engine step reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token of request `id`, with the text it adds (possibly empty while a character
    /// or a possible stop string is incomplete).
    Token {
        /// The request.
        id: RequestId,
        /// The token id.
        token: u32,
        /// Text that can be sent now.
        text: String,
        /// Its log-probabilities, if the request asked for them.
        logprob: Option<TokenLogprob>,
    },
    /// The prompt of request `id` is computed: the log-probability of each prompt token
    /// after the first given those before it, in order (sent once, before any token, when
    /// the request asked for `prompt_logprobs`).
    Prompt {
        /// The request.
        id: RequestId,
        /// One per prompt token after the first.
        logprobs: Vec<TokenLogprob>,
    },
    /// Request `id` ended; `text` is the rest of its text that was held back.
    Finished {
        /// The request.
        id: RequestId,
        /// Why.
        reason: FinishReason,
        /// Held-back text, sent last.
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// The stop token that ended it, if one did, with its log-probabilities when they
        /// were asked for: not part of the text, but reported as the OpenAI API reports it.
        stop_token: Option<(u32, Option<TokenLogprob>)>,
    },
    /// Request `id` failed (its adapter was unloaded, or could not be read, before it ran);
    /// it holds nothing any more.
    Failed {
        /// The request.
        id: RequestId,
        /// What went wrong.
        error: EngineError,
    },
}

impl Event {
    /// The request the event belongs to.
    pub fn id(&self) -> RequestId {
        match self {
            Self::Token { id, .. }
            | Self::Prompt { id, .. }
            | Self::Finished { id, .. }
            | Self::Failed { id, .. } => *id,
        }
    }
}
