//! Perplexity under the reference protocol: tokenize the whole text with no BOS, cut it into
//! non-overlapping windows of W tokens, run each window from an empty cache, score tokens
//! 1..len-1 of each window; perplexity = exp(mean NLL). The same windows give each token's
//! log-probability ([`token_log_probs`]), the self-information prompt compression ranks by.

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
        let (top1, logp) = window_scores(host.as_ref(), model, chunk, device);
        predictions.extend(top1);
        nll -= logp.iter().sum::<f64>();
        scored += chunk.len() - 1;
    }
    let result = Perplexity {
        perplexity: (nll / scored.max(1) as f64).exp(),
        tokens: ids.len(),
        scored,
    };
    (result, predictions)
}

/// The log-probability of every token of `ids` given the tokens before it in its window of
/// `window` tokens; `None` for each window's first token, which has no context.
pub fn token_log_probs<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    ids: &[u32],
    window: usize,
    device: &B::Device,
) -> Vec<Option<f64>> {
    let host = HostDecoder::new(model);
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(window.max(2)) {
        out.push(None);
        if chunk.len() >= 2 {
            let (_, logp) = window_scores(host.as_ref(), model, chunk, device);
            out.extend(logp.into_iter().map(Some));
        }
    }
    out
}

/// One window's top-1 predictions and per-token log-likelihoods (tokens 1..), through the
/// host forward where the model has one, else burn's.
fn window_scores<B: QuantBackend>(
    host: Option<&HostDecoder<B>>,
    model: &LlamaForCausalLM<B>,
    chunk: &[u32],
    device: &B::Device,
) -> (Vec<u32>, Vec<f64>) {
    match host {
        Some(host) => host_window(host, chunk),
        None => burn_window(model, chunk, device),
    }
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

/// Top-1 predictions and the log-likelihood of each of tokens 1.. of one window, through the
/// host forward.
fn host_window<B: QuantBackend>(host: &HostDecoder<B>, chunk: &[u32]) -> (Vec<u32>, Vec<f64>) {
    let logits = host.sequence_logits(chunk);
    let vocab = logits.len() / chunk.len();
    chunk[1..]
        .iter()
        .zip(logits.chunks(vocab))
        .map(|(&target, row)| {
            let (top, logp) = log_prob(row, target as usize);
            (top as u32, logp)
        })
        .unzip()
}

/// [`host_window`] through burn's forward.
fn burn_window<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    chunk: &[u32],
    device: &B::Device,
) -> (Vec<u32>, Vec<f64>) {
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
        values.iter().map(|&v| v as f64).collect(),
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
        let (sum_host, sum_burn): (f64, f64) = (logp_host.iter().sum(), logp_burn.iter().sum());
        assert!(
            (sum_host - sum_burn).abs() < 1e-3,
            "{sum_host} vs {sum_burn}"
        );
    }

    #[test]
    fn token_log_probs_are_the_perplexity_windows_token_by_token() {
        let model = LlamaForCausalLM::<B>::init_seeded(&tiny_config(), 9, &Default::default());
        let ids: Vec<u32> = (0..45).map(|i| (i * 53 % 250) as u32).collect();
        let logp = token_log_probs(&model, &ids, 20, &Default::default());
        assert_eq!(logp.len(), ids.len());
        let firsts: Vec<usize> = (0..ids.len()).filter(|&i| logp[i].is_none()).collect();
        assert_eq!(firsts, [0, 20, 40], "each window's first token is unscored");
        let sum: f64 = logp.iter().flatten().sum();
        let p = perplexity(&model, &ids, 20, &Default::default());
        assert_eq!(p.scored, 42);
        let expected = -(p.perplexity.ln()) * p.scored as f64;
        assert!(
            (sum - expected).abs() < 1e-6 * expected.abs().max(1.0),
            "{sum} vs {expected}"
        );
    }
}
