//! `ft bench generate`: prefill and decode tokens/s at batch 1 and peak RSS, optionally with
//! llama.cpp (through llama-cpp-python) measured on the same GGUF in the same run. The
//! measurement, the peer and the table are ft-eval's ([`ft_eval::decode_bench`],
//! [`ft_eval::peers::llama_cpp`]); this file chooses the formats, prints and records.

use anyhow::Context;
use ft_eval::decode_bench::{measure_formats, DecodeBench, DecodeTable, ReadBandwidth};
use ft_eval::peers::llama_cpp;
use ft_model::source;
use ft_model::{QuantBackend, QuantFormat, QuantSpec};

use crate::args::{BenchGenerateArgs, InferenceWeights};
use crate::commands::report::record;
use crate::device::{dispatch, Job};

/// Runs `ft bench generate`.
pub fn generate(args: BenchGenerateArgs) -> anyhow::Result<()> {
    dispatch(args.model.base.device, args)
}

impl Job for BenchGenerateArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let path = source::resolve(&self.model.base.model)?;
        anyhow::ensure!(
            !self.vs_llama_cpp || path.is_file(),
            "--vs-llama-cpp needs a GGUF file model, got the folder {}",
            path.display()
        );
        let formats = if self.all_weights {
            all_weights()
        } else {
            vec![self.model.base.storage_for(&path)?]
        };
        let bench = DecodeBench {
            model: &path,
            adapter: self.model.adapter.as_deref(),
            prompt_tokens: self.prompt_tokens as usize,
            new_tokens: self.new_tokens as usize,
            runs: self.runs,
        };
        let mut run = measure_formats::<B>(&bench, &formats, &device)?;
        if self.vs_llama_cpp {
            let peer = llama_cpp::decode(
                &path,
                &run.prompt,
                bench.new_tokens,
                self.threads,
                self.runs,
            )
            .context("--vs-llama-cpp")?;
            run.rows.push(peer.into());
        }
        let table = DecodeTable {
            rows: run.rows,
            prompt_tokens: bench.prompt_tokens,
            new_tokens: bench.new_tokens,
            runs: bench.runs,
            read_bandwidth: ReadBandwidth::measure(self.threads),
        }
        .to_string();
        print!("{table}");
        if let Some(file) = &self.record {
            record(file, "`ft bench generate`", &table)
                .with_context(|| format!("--record {}", file.display()))?;
        }
        Ok(())
    }
}

/// The formats of `--all-weights`: every inference weight format, then QLoRA's base (NF4
/// with double quantization) through the 4-bit kernel.
fn all_weights() -> Vec<Option<QuantSpec>> {
    [
        InferenceWeights::F32,
        InferenceWeights::Bf16,
        InferenceWeights::Q8,
        InferenceWeights::Q4,
    ]
    .into_iter()
    .map(|w| {
        Some(QuantSpec {
            format: w.format(),
            double_quant: false,
        })
    })
    .chain([Some(QuantSpec {
        format: QuantFormat::Nf4,
        double_quant: true,
    })])
    .collect()
}
