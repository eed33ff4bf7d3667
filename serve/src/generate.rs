//! Single-sequence generation: prefill the prompt once, then decode one token per step
//! through the KV cache until a stop token or the token budget. It runs the serving engine's
//! forward over a paged cache of its own, so one sequence decodes as fast as a served one.

use std::time::Instant;

use ft_model::forward::ragged::Segment;
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::runner::Runner;

use crate::sampling::Sampler;

/// What one generation produced and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids (a stop token that ended generation is not included).
    pub ids: Vec<u32>,
    /// The stop token that ended generation, if one did (not the token budget).
    pub stop: Option<u32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (up to the first token's logits).
    pub prefill_s: f64,
    /// Seconds spent on the decode steps after the first token.
    pub decode_s: f64,
    /// Decode steps (forward passes of one token).
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_s)
    }

    /// Decode steps per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// One sequence's keys and values in a paged pool of its own, blocks in order: the forward
/// is the serving engine's, so decoding reads the cache in place.
struct SequenceCache<B: QuantBackend> {
    runner: Runner<B>,
    table: Vec<usize>,
    stored: usize,
}

impl<B: QuantBackend> SequenceCache<B> {
    /// Room for `tokens` positions.
    fn new(model: &LlamaForCausalLM<B>, tokens: usize) -> Self {
        let blocks = tokens.div_ceil(BLOCK_SIZE).max(1);
        Self {
            runner: Runner::new(model, blocks, BLOCK_SIZE),
            table: (0..blocks).collect(),
            stored: 0,
        }
    }

    /// Logits of the last position after feeding `ids`.
    fn next_logits(&mut self, model: &LlamaForCausalLM<B>, ids: &[u32]) -> Vec<f32> {
        let segment = Segment {
            start: self.stored,
            len: ids.len(),
            adapter: None,
        };
        let last = ids.len() - 1;
        let logits = self
            .runner
            .logits(model, ids, &[segment], &[], vec![&self.table], &[last]);
        self.stored += ids.len();
        logits
    }
}

/// Positions per block of [`SequenceCache`].
const BLOCK_SIZE: usize = 16;

/// Generates up to `max_new_tokens` after `prompt` (which must be non-empty and, with the new
/// tokens, fit the context: callers check), calling `on_token` for each new id. Runs on a
/// kernel thread ([`ft_model::kernels::on_kernel_thread`]).
pub fn generate<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    sampler: &mut Sampler,
    on_token: impl FnMut(u32) + Send,
) -> Generation {
    ft_model::kernels::on_kernel_thread(|| {
        generate_here(model, prompt, max_new_tokens, stop_ids, sampler, on_token)
    })
}

/// [`generate`] on the calling thread.
fn generate_here<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_ids: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Generation {
    let mut cache = SequenceCache::new(model, prompt.len() + max_new_tokens);
    let mut out = Generation {
        ids: Vec::new(),
        stop: None,
        prompt_tokens: prompt.len(),
        prefill_s: 0.0,
        decode_s: 0.0,
        decode_steps: 0,
    };
    if max_new_tokens == 0 || prompt.is_empty() {
        return out;
    }
    let t0 = Instant::now();
    let mut logits = cache.next_logits(model, prompt);
    out.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&logits);
        if stop_ids.contains(&next) {
            out.stop = Some(next);
            break;
        }
        out.ids.push(next);
        on_token(next);
        if out.ids.len() >= max_new_tokens {
            break;
        }
        logits = cache.next_logits(model, &[next]);
        out.decode_steps += 1;
    }
    out.decode_s = t1.elapsed().as_secs_f64();
    out
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, tiny_model};

    use super::*;
    use crate::SamplingParams;

    type B = NdArray<f32>;

    #[test]
    fn the_stop_token_that_ended_generation_is_reported() {
        let model = tiny_model::<B>(&tiny_config(), 3);
        let greedy = || Sampler::new(SamplingParams::default());
        let free = generate(&model, &[5, 6, 7], 4, &[], &mut greedy(), |_| {});
        assert_eq!(free.ids.len(), 4);
        assert_eq!(free.stop, None, "the budget ended it");
        // Stopping on the third token greedy decoding picks.
        let third = free.ids[2];
        let stopped = generate(&model, &[5, 6, 7], 4, &[third], &mut greedy(), |_| {});
        let before = free.ids.iter().position(|&t| t == third).unwrap();
        assert_eq!(stopped.ids, free.ids[..before]);
        assert_eq!(stopped.stop, Some(third));
    }
}
