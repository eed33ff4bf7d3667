//! Perplexity under the reference protocol: tokenize the whole text with no BOS, cut it into
//! non-overlapping windows of W tokens, run each window from an empty cache, score tokens
//! 1..len-1 of each window; perplexity = exp(mean NLL).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use ft_quant::QuantBackend;

use crate::llama::LlamaForCausalLM;

/// Result of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens scored (each window's first token has no context and is not scored).
    pub scored: usize,
}

/// Scores `ids` in windows of `window` tokens.
pub fn perplexity<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    ids: &[u32],
    window: usize,
    device: &B::Device,
) -> Perplexity {
    perplexity_with_predictions(model, ids, window, device).0
}

/// [`perplexity`], plus the model's top-1 prediction at every scored position (in order), to
/// compare two models position by position.
pub fn perplexity_with_predictions<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    ids: &[u32],
    window: usize,
    device: &B::Device,
) -> (Perplexity, Vec<u32>) {
    let mut predictions = Vec::with_capacity(ids.len());
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    for chunk in ids.chunks(window.max(2)) {
        if chunk.len() < 2 {
            continue;
        }
        let n = chunk.len();
        let input: Vec<i64> = chunk.iter().map(|&t| t as i64).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, n]), device);
        let logp = log_softmax(model.forward(input, None), 2); // [1, n, vocab]
        let targets: Vec<i64> = chunk[1..].iter().map(|&t| t as i64).collect();
        let targets =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, n - 1, 1]), device);
        let scored_logp = logp.narrow(1, 0, n - 1); // [1, n-1, vocab]
        let top1 = scored_logp
            .clone()
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap_or_default();
        predictions.extend(top1.into_iter().map(|t| t as u32));
        let picked = scored_logp.gather(2, targets); // [1, n-1, 1]
        let values = picked
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        nll -= values.iter().map(|&v| v as f64).sum::<f64>();
        scored += n - 1;
    }
    let result = Perplexity {
        perplexity: (nll / scored.max(1) as f64).exp(),
        tokens: ids.len(),
        scored,
    };
    (result, predictions)
}
