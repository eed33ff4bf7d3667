//! What a run of a Llama-family model costs: its parameters, with and without the embedding
//! (Kaplan et al. 2020 count the latter), and its training FLOPs, both as `6 N D` and counted
//! operation by operation as Hoffmann et al. 2022 (appendix F) do, adapted to grouped-query
//! attention and the gated MLP.

use ft_model::LlamaConfig;
use serde::{Deserialize, Serialize};

/// A model's parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Every weight: embedding, blocks, final norm and an untied head.
    pub total: usize,
    /// Without the embedding and an untied head.
    pub non_embedding: usize,
}

/// Counts the weights of a model of `c`.
pub fn params(c: &LlamaConfig) -> Params {
    let (d, hd) = (c.hidden_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let bias = if c.attention_bias { q + 2 * kv } else { 0 };
    let layer = d * (q + 2 * kv) + bias + q * d + 3 * d * c.intermediate_size + 2 * d;
    let embedding = c.vocab_size * d;
    let head = if c.tie_word_embeddings { 0 } else { embedding };
    let non_embedding = c.num_hidden_layers * layer + d;
    Params {
        total: non_embedding + embedding + head,
        non_embedding,
    }
}

/// Forward FLOPs of one token that attends to `context` positions, as Hoffmann et al.
/// count a sequence's: the embedding and the output logits as matmuls with the vocabulary,
/// the q/k/v and output projections, the attention logits, their softmax and the weighted
/// sum of values, and the MLP's three matmuls. Norms and activations are left out, as there.
pub fn forward_flops_per_token(c: &LlamaConfig, context: usize) -> f64 {
    let (d, hd, l) = (c.hidden_size as f64, c.head_dim as f64, context as f64);
    let (h, kv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
    let vocab = 2.0 * c.vocab_size as f64 * d;
    let projections = 2.0 * d * (h + 2.0 * kv) * hd + 2.0 * h * hd * d;
    let attention = 2.0 * l * h * hd + 3.0 * h * l + 2.0 * l * h * hd;
    let mlp = 2.0 * 3.0 * d * c.intermediate_size as f64;
    2.0 * vocab + c.num_hidden_layers as f64 * (projections + attention + mlp)
}

/// Training FLOPs of `tokens` tokens at `context` positions: the backward pass costs twice
/// the forward.
pub fn training_flops(c: &LlamaConfig, tokens: f64, context: usize) -> f64 {
    3.0 * forward_flops_per_token(c, context) * tokens
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, tiny_model};

    use super::*;

    #[test]
    fn the_count_is_the_weights_a_model_has() {
        let mut config = tiny_config();
        for (tied, bias) in [(true, false), (false, true)] {
            config.tie_word_embeddings = tied;
            config.attention_bias = bias;
            let model = tiny_model::<NdArray<f32>>(&config, 3);
            let tensors = model.named_tensors();
            let size = |keep: &dyn Fn(&str) -> bool| -> usize {
                tensors
                    .iter()
                    .filter(|(n, _)| keep(n))
                    .map(|(_, t)| t.data.len())
                    .sum()
            };
            let p = params(&config);
            assert_eq!(p.total, size(&|_| true), "tied {tied}, bias {bias}");
            assert_eq!(
                p.non_embedding,
                size(&|n| !n.contains("embed_tokens") && !n.starts_with("lm_head")),
            );
        }
    }

    /// For a wide model with a short context the count approaches 6N per token: the
    /// attention over positions is small beside the weights, and the embedding's lookup is
    /// counted as the output logits are.
    #[test]
    fn a_wide_model_costs_about_six_flops_a_parameter_a_token() {
        let mut config = tiny_config();
        config.hidden_size = 1024;
        config.intermediate_size = 4096;
        config.num_attention_heads = 8;
        config.num_key_value_heads = 8;
        config.head_dim = 128;
        config.num_hidden_layers = 8;
        config.vocab_size = 1000;
        let n = params(&config).total as f64;
        let counted = training_flops(&config, 1.0, 64);
        assert!(
            (counted / (6.0 * n) - 1.0).abs() < 0.05,
            "{counted} vs {}",
            6.0 * n
        );
        assert!(training_flops(&config, 1.0, 4096) > counted * 1.1);
    }
}
