//! Perplexity under the reference protocol: tokenize the whole text with no BOS, cut it into
//! non-overlapping windows of W tokens, run each window from an empty cache, score tokens
//! 1..len-1 of each window; perplexity = exp(mean NLL).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use ft_quant::QuantBackend;

use crate::forward::host::HostDecoder;
use crate::forward::llama::LlamaForCausalLM;

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
    let host = HostDecoder::new(model);
    for chunk in ids.chunks(window.max(2)) {
        if chunk.len() < 2 {
            continue;
        }
        let n = chunk.len();
        let (top1, logp) = match &host {
            Some(host) => host_window(host, chunk),
            None => burn_window(model, chunk, device),
        };
        predictions.extend(top1);
        nll -= logp;
        scored += n - 1;
    }
    let result = Perplexity {
        perplexity: (nll / scored.max(1) as f64).exp(),
        tokens: ids.len(),
        scored,
    };
    (result, predictions)
}

/// The index of the largest logit and log softmax(logits)[target], max-shifted.
fn log_prob(logits: &[f32], target: usize) -> (usize, f64) {
    let (top, max) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |(i, m), (j, &v)| if v > m { (j, v) } else { (i, m) },
        );
    let total: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (top, (logits[target] - max) as f64 - total.ln())
}

/// Top-1 predictions and the summed log-likelihood of tokens 1.. of one window, through the
/// host forward.
fn host_window<B: QuantBackend>(host: &HostDecoder<B>, chunk: &[u32]) -> (Vec<u32>, f64) {
    let logits = host.sequence_logits(chunk);
    let vocab = logits.len() / chunk.len();
    let mut top1 = Vec::with_capacity(chunk.len() - 1);
    let mut total = 0.0;
    for (row, &target) in logits.chunks(vocab).zip(&chunk[1..]) {
        let (top, logp) = log_prob(row, target as usize);
        top1.push(top as u32);
        total += logp;
    }
    (top1, total)
}

/// [`host_window`] through burn's forward.
fn burn_window<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    chunk: &[u32],
    device: &B::Device,
) -> (Vec<u32>, f64) {
    let n = chunk.len();
    let input: Vec<i64> = chunk.iter().map(|&t| t as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, n]), device);
    let logp = log_softmax(model.forward(input, None), 2); // [1, n, vocab]
    let targets: Vec<i64> = chunk[1..].iter().map(|&t| t as i64).collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [1, n - 1, 1]), device);
    let scored_logp = logp.narrow(1, 0, n - 1); // [1, n-1, vocab]
    let top1 = scored_logp
        .clone()
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap_or_default();
    let picked = scored_logp.gather(2, targets); // [1, n-1, 1]
    let values = picked
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default();
    (
        top1.into_iter().map(|t| t as u32).collect(),
        values.iter().map(|&v| v as f64).sum(),
    )
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::backend::Backend;

    use super::*;
    use crate::tiny::tiny_config;

    type B = NdArray<f32>;

    #[test]
    fn a_window_scores_the_same_through_the_host_and_through_burn() {
        B::seed(&Default::default(), 8);
        let model = LlamaForCausalLM::<B>::init_random(&tiny_config(), &Default::default());
        let host = HostDecoder::new(&model).expect("a host model");
        let chunk: Vec<u32> = (0..40).map(|i| (i * 37 % 250) as u32).collect();
        let (top_host, logp_host) = host_window(&host, &chunk);
        let (top_burn, logp_burn) = burn_window(&model, &chunk, &Default::default());
        assert_eq!(top_host, top_burn);
        assert!(
            (logp_host - logp_burn).abs() < 1e-3,
            "{logp_host} vs {logp_burn}"
        );
    }
}
