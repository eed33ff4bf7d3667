//! The key/value cache of incremental decoding: per layer, the rotated keys and the values of
//! every token seen so far, so that each new token costs one position of compute.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::LlamaConfig;

/// Keys and values of past tokens for each layer, `[b, kv, t, d]` each.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with this configuration.
    pub fn new(config: &LlamaConfig) -> Self {
        Self::with_layers(config.num_hidden_layers)
    }

    /// An empty cache for `layers` decoder layers.
    pub fn with_layers(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of `layer`: `None` until its first tokens are appended.
    pub(crate) fn layer(&mut self, layer: usize) -> &mut Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        &mut self.layers[layer]
    }

    /// Records that `s` more tokens were appended to every layer.
    pub(crate) fn advance(&mut self, s: usize) {
        self.len += s;
    }
}
