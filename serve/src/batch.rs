//! Greedy generation for many prompts at once, as evaluation needs: prompts of equal length
//! share one ragged step (the serving engine's forward) over one paged KV cache, so each
//! decode step reads the weights once for the whole batch instead of once per prompt. Every
//! row is its own sequence, so the result for each prompt is what [`crate::generate`] gives
//! it alone with greedy sampling.

use std::collections::BTreeMap;

use ft_model::forward::ragged::Segment;
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::runner::Runner;

use crate::sampling::argmax;

/// Greedy continuations of `prompts` (each non-empty), at most `max_new_tokens` each, ending
/// before the first stop id; `batch_size` rows at most per forward. Returns them in order.
pub fn greedy_batch<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    stop_ids: &[u32],
    batch_size: usize,
) -> Vec<Vec<u32>> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, p) in prompts.iter().enumerate() {
        by_len.entry(p.len()).or_default().push(i);
    }
    let mut out = vec![Vec::new(); prompts.len()];
    // One runner (and one host decoder) for every batch: rows of up to the longest prompt.
    let longest = by_len.keys().last().copied().unwrap_or(0);
    let batch_size = batch_size.clamp(1, prompts.len().max(1));
    let per_row = (longest + max_new_tokens).div_ceil(BLOCK_SIZE).max(1);
    let mut runner = Runner::new(model, batch_size * per_row, BLOCK_SIZE);
    for (len, rows) in by_len {
        if len == 0 {
            continue;
        }
        for chunk in rows.chunks(batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            let decoded = ft_model::kernels::on_kernel_thread(|| {
                decode(
                    model,
                    &mut runner,
                    per_row,
                    &batch,
                    max_new_tokens,
                    stop_ids,
                )
            });
            for (&i, ids) in chunk.iter().zip(decoded) {
                out[i] = ids;
            }
        }
    }
    out
}

/// One batch of equal-length prompts, each a sequence of the step's ragged forward in its
/// own `per_row` blocks of the runner's cache (written afresh from position 0).
fn decode<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    runner: &mut Runner<B>,
    per_row: usize,
    prompts: &[&[u32]],
    max_new_tokens: usize,
    stop_ids: &[u32],
) -> Vec<Vec<u32>> {
    let (b, n) = (prompts.len(), prompts[0].len());
    let tables: Vec<Vec<usize>> = (0..b)
        .map(|i| (i * per_row..(i + 1) * per_row).collect())
        .collect();
    let rows: Vec<usize> = (0..b).collect();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![max_new_tokens == 0; b];
    let mut ids: Vec<u32> = prompts.concat();
    let (mut start, mut len) = (0, n);
    while done.iter().any(|d| !d) {
        let segments: Vec<Segment> = (0..b)
            .map(|_| Segment {
                start,
                len,
                adapter: None,
            })
            .collect();
        let tables: Vec<&[usize]> = tables.iter().map(Vec::as_slice).collect();
        let logits = runner.logits(model, &ids, &segments, &[], tables, &rows); // [b * vocab]
        let vocab = logits.len() / b;
        ids.clear();
        for (row, chunk) in logits.chunks(vocab).enumerate() {
            let next = argmax(chunk);
            if !done[row] {
                if stop_ids.contains(&next) {
                    done[row] = true;
                } else {
                    out[row].push(next);
                    done[row] = out[row].len() >= max_new_tokens;
                }
            }
            ids.push(next);
        }
        start += len;
        len = 1;
    }
    out
}

/// Positions per block of a batch's KV cache.
const BLOCK_SIZE: usize = 16;

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, tiny_model};

    use super::*;
    use crate::{generate, Sampler, SamplingParams};

    type B = NdArray<f32>;

    #[test]
    fn batched_greedy_equals_one_prompt_at_a_time() {
        let model = tiny_model::<B>(&tiny_config(), 3);
        let prompts: Vec<Vec<u32>> = vec![
            vec![5, 6, 7],
            vec![100, 3],
            vec![9, 9, 9],
            vec![40, 41, 42],
            vec![200, 1],
        ];
        let batched = greedy_batch(&model, &prompts, 6, &[258], 2);
        for (p, got) in prompts.iter().zip(&batched) {
            let mut sampler = Sampler::new(SamplingParams::default());
            let alone = generate(&model, p, 6, &[258], &mut sampler, |_| {});
            assert_eq!(&alone.ids, got, "prompt {p:?}");
        }
    }
}
