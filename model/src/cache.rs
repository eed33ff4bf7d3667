//! The key/value cache of incremental decoding: per layer, the rotated keys and the values of
//! every token seen so far, so that each new token costs one position of compute.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::LlamaConfig;

/// Keys and values of past tokens for each layer, `[b, kv, t, d]` each.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    len: usize,
}

/// One layer's keys and values in buffers of `capacity` positions, `len` of them used.
///
/// New positions are written in place (the buffers are uniquely owned between steps), so a
/// decode step copies one position per layer instead of the whole past; capacity doubles
/// when it runs out.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> LayerCache<B> {
    /// Appends `k`, `v` `[b, kv, s, d]` to the layer's cache in `slot` and returns every
    /// position's keys and values, `[b, kv, t, d]`.
    pub fn append(
        slot: &mut Option<Self>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kv, s, d] = k.dims();
        let mut c = slot.take().unwrap_or_else(|| Self {
            keys: Tensor::zeros([b, kv, 0, d], &k.device()),
            values: Tensor::zeros([b, kv, 0, d], &k.device()),
            len: 0,
        });
        let capacity = c.keys.dims()[2];
        if c.len + s > capacity {
            let grown = (c.len + s).next_power_of_two().max(64);
            let more = |t: Tensor<B, 4>| {
                let pad = Tensor::zeros([b, kv, grown - capacity, d], &t.device());
                Tensor::cat(vec![t, pad], 2)
            };
            c.keys = more(c.keys);
            c.values = more(c.values);
        }
        let at = [0..b, 0..kv, c.len..c.len + s, 0..d];
        c.keys = c.keys.slice_assign(at.clone(), k);
        c.values = c.values.slice_assign(at, v);
        c.len += s;
        let out = (
            c.keys.clone().narrow(2, 0, c.len),
            c.values.clone().narrow(2, 0, c.len),
        );
        *slot = Some(c);
        out
    }
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
    pub(crate) fn layer(&mut self, layer: usize) -> &mut Option<LayerCache<B>> {
        &mut self.layers[layer]
    }

    /// Records that `s` more tokens were appended to every layer.
    pub(crate) fn advance(&mut self, s: usize) {
        self.len += s;
    }
}
