//! The model's forwards, all of the same arithmetic:
//! - [`llama`]: the padded batch on burn, as the paper writes the model; training
//!   (autodiff), distillation, CUDA, and the reference the other two are tested against;
//! - [`ragged`]: the ragged batch on burn, for backends without a host path (CUDA);
//! - [`host`]: the same ragged batch on the CPU in plain Rust over the ft-quant kernels, no
//!   burn op; every CPU forward of generation, perplexity and the server;
//! - [`train`]: the host forward of a training batch that keeps what backward needs, with its
//!   backward to the LoRA adapters: every CPU training step.
//!
//! The two ragged forwards are the serving ones: many sequences' new tokens flattened into one
//! batch, each at its own position with its own adapter, over a paged KV cache. Both apply
//! each adapter once per run of consecutive rows that share it ([`adapter_runs`]).

pub mod host;
pub mod llama;
pub mod ragged;
pub mod train;

use ragged::Segment;

/// Consecutive rows of the flattened batch that share an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: usize,
    len: usize,
    adapter: usize,
}

/// The runs of rows with an adapter in the batch `segments` flattens: adjacent segments with
/// the same adapter make one run, so its update is two products over all their rows; rows
/// without an adapter are in no run.
fn adapter_runs(segments: &[Segment]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut at = 0;
    for seg in segments {
        if let Some(a) = seg.adapter {
            match runs.last_mut() {
                Some(r) if r.adapter == a && r.start + r.len == at => r.len += seg.len,
                _ => runs.push(Run {
                    start: at,
                    len: seg.len,
                    adapter: a,
                }),
            }
        }
        at += seg.len;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_segments_of_one_adapter_make_one_run() {
        let seg = |len, adapter| Segment {
            start: 0,
            len,
            adapter,
        };
        let segments = [
            seg(2, Some(0)),
            seg(1, Some(0)),
            seg(3, None),
            seg(1, Some(0)),
            seg(2, Some(1)),
        ];
        let run = |start, len, adapter| Run {
            start,
            len,
            adapter,
        };
        assert_eq!(
            adapter_runs(&segments),
            [run(0, 3, 0), run(6, 1, 0), run(7, 2, 1)]
        );
    }
}
