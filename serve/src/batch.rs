//! Greedy generation for many prompts at once, as evaluation needs: every prompt is a request
//! of one [`Engine`], so prompts of any length share each step's ragged forward, a finished
//! answer's slot goes to the next prompt at once (continuous batching), and prompts that
//! start alike share their first KV blocks (the prefix cache). Every row is its own sequence,
//! so the result for each prompt is what [`crate::generate`] gives it alone with greedy
//! sampling.
//!
//! The forward is the engine's: on the CPU the host decoder, which applies an adapter
//! attached to the model itself (training's exact match runs the model being trained),
//! elsewhere burn's ragged forward.

use std::collections::HashMap;

use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::engine::{Engine, EngineConfig};
use crate::error::EngineError;
use crate::request::{Event, GenerationParams, Priority, Request, RequestId};
use crate::runner::Runner;
use crate::sampling::SamplingParams;

/// Greedy continuations of `prompts`, at most `max_new_tokens` each, ending before the first
/// stop id; `batch_size` prompts at most decode together. Returns them in order.
///
/// # Errors
/// A prompt the engine refuses (empty, with a token outside the vocabulary, or too long for
/// the model's context with `max_new_tokens` more), named by its number from 1.
pub fn greedy_batch<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_ids: &[u32],
    batch_size: usize,
) -> Result<Vec<Vec<u32>>, EngineError> {
    greedy_on(
        Runner::new,
        model,
        prompts,
        max_new_tokens,
        stop_ids,
        batch_size,
    )
}

/// How a batch gets its forward: the model, blocks and positions per block.
type MakeRunner<B> = fn(&LlamaForCausalLM<B>, usize, usize) -> Runner<B>;

/// [`greedy_batch`] on the forward `runner` makes ([`Runner::new`], or burn's in tests).
fn greedy_on<B: QuantBackend>(
    runner: MakeRunner<B>,
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_ids: &[u32],
    batch_size: usize,
) -> Result<Vec<Vec<u32>>, EngineError> {
    let mut out = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || max_new_tokens == 0 {
        return Ok(out);
    }
    // Blocks for every running prompt at its longest, so that none is ever preempted.
    let batch_size = batch_size.clamp(1, prompts.len());
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let per_row = (longest + max_new_tokens).div_ceil(BLOCK_SIZE);
    let config = EngineConfig {
        block_size: BLOCK_SIZE,
        kv_blocks: batch_size * per_row,
        max_batch_tokens: MAX_BATCH_TOKENS.max(batch_size),
        max_running: batch_size,
        max_waiting: prompts.len(),
        prefix_cache: true,
        max_adapters: 1,
        // Only interactive requests: the cap never applies.
        batch_step_tokens: MAX_BATCH_TOKENS.max(batch_size),
    };
    ft_model::kernels::on_kernel_thread(|| {
        let runner = runner(model, config.kv_blocks, config.block_size);
        tracing::debug!(
            prompts = prompts.len(),
            batch_size,
            host = runner.is_host(),
            "batched greedy decoding"
        );
        // Stop ids end answers here; stop strings are the caller's, so no text is decoded.
        let detokenize = Box::new(|_: &[u32]| String::new());
        let mut engine = Engine::with_runner(model.clone(), detokenize, config, runner);
        let mut row_of: HashMap<RequestId, usize> = HashMap::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            if i == 1 {
                // The first prompt runs one step alone, so that the blocks of a prefix the
                // prompts share (a task's instruction) are in the prefix cache when the others
                // are admitted, rather than computed by every prompt of the first batch.
                record(engine.step(), &row_of, &mut out)?;
            }
            let request = Request {
                prompt: prompt.clone(),
                adapter: None,
                params: GenerationParams {
                    max_tokens: max_new_tokens,
                    sampling: SamplingParams::default(),
                    stop_ids: stop_ids.to_vec(),
                    ..GenerationParams::default()
                },
                priority: Priority::Interactive,
            };
            let id = engine
                .submit(request)
                .map_err(|e| EngineError::BadRequest(format!("prompt {}: {e}", i + 1)))?;
            row_of.insert(id, i);
        }
        while engine.has_work() {
            record(engine.step(), &row_of, &mut out)?;
        }
        Ok(out)
    })
}

/// Appends the new tokens of one step's `events` to their prompts' answers.
fn record(
    events: Vec<Event>,
    row_of: &HashMap<RequestId, usize>,
    out: &mut [Vec<u32>],
) -> Result<(), EngineError> {
    for event in events {
        match event {
            Event::Token { id, token, .. } => {
                if let Some(&i) = row_of.get(&id) {
                    out[i].push(token);
                }
            }
            Event::Prompt { .. } | Event::Finished { .. } => {}
            Event::Failed { error, .. } => return Err(error),
        }
    }
    Ok(())
}

/// Positions per block of a batch's KV cache.
const BLOCK_SIZE: usize = 16;

/// Tokens one step runs at most: every decoding row, then prompt chunks (the engine's
/// default).
const MAX_BATCH_TOKENS: usize = 256;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};
    use ft_model::forward::host::HostDecoder;
    use ft_model::tiny::{tiny_adapter, tiny_config, tiny_eos, tiny_model};

    use super::*;
    use crate::{generate, Sampler};

    type B = NdArray<f32>;

    /// Prompts of different lengths, more than one batch of them.
    fn prompts() -> Vec<Vec<u32>> {
        vec![
            vec![5, 6, 7],
            vec![100, 3],
            vec![9, 9, 9],
            (40..58).collect(),
            vec![200, 1],
            // The first 16 tokens of the prompt before: one block of the prefix cache.
            (40..56).chain([60]).collect(),
        ]
    }

    #[test]
    fn batched_greedy_equals_one_prompt_at_a_time() {
        let model = tiny_model::<B>(&tiny_config(), 3);
        let prompts = prompts();
        let batched = greedy_batch(&model, &prompts, 6, &[tiny_eos()], 2).unwrap();
        for (p, got) in prompts.iter().zip(&batched) {
            let mut sampler = Sampler::new(SamplingParams::default());
            let alone = generate(&model, p, 6, &[tiny_eos()], &mut sampler, |_| {});
            assert_eq!(&alone.ids, got, "prompt {p:?}");
        }
    }

    #[test]
    fn host_greedy_equals_burn_greedy_with_the_models_own_adapter() {
        let base = tiny_model::<B>(&tiny_config(), 3);
        let mut model = base.clone();
        model
            .attach_adapter(&tiny_adapter(11), Path::new("adapter"))
            .unwrap();
        assert!(HostDecoder::new(&model).is_some(), "the host forward runs");
        let prompts = prompts();
        let host = greedy_batch(&model, &prompts, 8, &[tiny_eos()], 4).unwrap();
        let burn = greedy_on(Runner::burn, &model, &prompts, 8, &[tiny_eos()], 4).unwrap();
        assert_eq!(host, burn);
        for (p, answer) in prompts.iter().zip(&host) {
            assert_clear_lead(&model, p, answer);
        }
        let plain = greedy_batch(&base, &prompts, 8, &[tiny_eos()], 4).unwrap();
        assert_ne!(host, plain, "the adapter changes the answers");
    }

    /// Asserts that each token of `answer` after `prompt` is greedy's pick in burn's padded
    /// forward of the whole sequence, and by a lead over the runner-up of more than twice the
    /// host forward's distance from burn's at that position (below 2e-3 here: the host's KV
    /// cache holds f16), so that host and burn answers agree by the arithmetic, not by luck.
    fn assert_clear_lead(model: &LlamaForCausalLM<B>, prompt: &[u32], answer: &[u32]) {
        let seq: Vec<u32> = prompt.iter().chain(answer).copied().collect();
        let n = seq.len();
        let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let burn = model
            .forward(ids, None)
            .into_data()
            .into_vec::<f32>()
            .unwrap(); // [n * vocab]
        let host = HostDecoder::new(model).unwrap().sequence_logits(&seq); // [n * vocab]
        let vocab = burn.len() / n;
        for (k, &token) in answer.iter().enumerate() {
            let at = (prompt.len() - 1 + k) * vocab;
            let (b, h) = (&burn[at..at + vocab], &host[at..at + vocab]);
            let distance = b
                .iter()
                .zip(h)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(distance < 2e-3, "prompt {prompt:?} token {k}: {distance}");
            let best = crate::sampling::argmax(b);
            assert_eq!(best, token, "prompt {prompt:?} token {k}");
            let second = (0..vocab)
                .filter(|&v| v != best as usize)
                .map(|v| b[v])
                .fold(f32::NEG_INFINITY, f32::max);
            let lead = b[best as usize] - second;
            assert!(
                lead > 2.0 * distance,
                "prompt {prompt:?} token {k}: lead {lead}, distance {distance}"
            );
        }
    }

    #[test]
    fn no_new_tokens_and_no_prompts_decode_nothing() {
        let model = tiny_model::<B>(&tiny_config(), 3);
        let none = greedy_batch(&model, &prompts(), 0, &[], 4).unwrap();
        assert!(none.iter().all(Vec::is_empty));
        assert!(greedy_batch(&model, &[], 4, &[], 4).unwrap().is_empty());
    }

    #[test]
    fn an_empty_prompt_is_refused_by_its_number() {
        let model = tiny_model::<B>(&tiny_config(), 3);
        let err = greedy_batch(&model, &[vec![5], vec![]], 4, &[], 4).unwrap_err();
        assert!(err.to_string().starts_with("prompt 2: "), "{err}");
    }
}
