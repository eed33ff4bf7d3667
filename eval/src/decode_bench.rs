//! The decode benchmark of `ft bench generate`: for each weight format, load time, batch-1
//! prefill and decode tokens/s, greedy batches, the weight bytes read per second and resident
//! memory; the machine's read bandwidth to compare those reads with; and the Markdown table,
//! with a peer's row ([`crate::peers`]) and ft's ratios to it.

use std::fmt;
use std::path::Path;
use std::time::Instant;

use ft_model::forward::host::HostDecoder;
use ft_model::kernels::Isa;
use ft_model::{Pretrained, QuantBackend, QuantFormat, QuantSpec};
use ft_serve::{generate, greedy_batch, Sampler, SamplingParams};

use crate::error::EvalError;
use crate::peers::llama_cpp::LlamaCppDecode;
use crate::rss::rss_bytes;

/// Batch sizes of the batched-decode columns.
pub const BATCHES: [usize; 2] = [8, 32];
/// Prompt length in tokens of the batched-decode columns.
pub const BATCH_PROMPT: usize = 16;

/// What to measure: the model, an adapter on it, and the lengths and repetitions.
#[derive(Debug, Clone, Copy)]
pub struct DecodeBench<'a> {
    /// The model file or folder.
    pub model: &'a Path,
    /// A PEFT adapter folder attached to every format's model.
    pub adapter: Option<&'a Path>,
    /// Batch-1 prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens decoded after each prompt.
    pub new_tokens: usize,
    /// Timed batch-1 runs; rows report the median.
    pub runs: u64,
}

/// One row of the table: an engine and what it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeRow {
    /// The engine, its decode path and its weight format.
    pub engine: String,
    /// Seconds to load the model.
    pub load_s: f64,
    /// Batch-1 prefill tokens/s.
    pub prefill: f64,
    /// Batch-1 decode tokens/s.
    pub decode: f64,
    /// Aggregate tokens/s of greedy batches of [`BATCHES`] (ft only).
    pub batches: Option<[f64; 2]>,
    /// Weight bytes read per decode step times decode steps per second, in GB/s (ft only).
    pub weight_gbps: Option<f64>,
    /// Resident memory after the run (ft: this format's model; a peer: its process peak).
    pub rss: u64,
}

impl From<LlamaCppDecode> for DecodeRow {
    fn from(l: LlamaCppDecode) -> Self {
        Self {
            engine: format!(
                "llama.cpp (llama-cpp-python {}, {} threads)",
                l.version, l.threads
            ),
            load_s: l.load_s,
            prefill: l.prefill,
            decode: l.decode,
            batches: None,
            weight_gbps: None,
            rss: l.peak_rss,
        }
    }
}

/// ft's rows, one per format in order, and the batch-1 prompt they decoded (for a peer to
/// decode the same ids).
#[derive(Debug, Clone)]
pub struct DecodeRun {
    /// One row per format.
    pub rows: Vec<DecodeRow>,
    /// The batch-1 prompt's token ids.
    pub prompt: Vec<u32>,
}

/// Loads the model at each of `formats` in turn (`None`: f32) on `device` and measures it.
/// Fails before measuring a format whose context is shorter than the prompt plus new tokens.
pub fn measure_formats<B: QuantBackend>(
    bench: &DecodeBench,
    formats: &[Option<QuantSpec>],
    device: &B::Device,
) -> Result<DecodeRun, EvalError> {
    let mut rows = Vec::new();
    let mut prompt = Vec::new();
    for &quant in formats {
        let t0 = Instant::now();
        let mut pretrained = Pretrained::<B>::load(bench.model, quant, device)?;
        if let Some(dir) = bench.adapter {
            pretrained.attach_adapter(dir)?;
        }
        if quant.is_some_and(|q| q.format == QuantFormat::Bf16) {
            pretrained.model.pack_head(QuantFormat::Bf16);
        }
        let load_s = t0.elapsed().as_secs_f64();
        pretrained.check_context(
            "--prompt-tokens plus --new-tokens",
            bench.prompt_tokens.max(BATCH_PROMPT) + bench.new_tokens,
        )?;
        prompt = bench_prompt(&pretrained, bench.prompt_tokens)?;
        rows.push(measure(&pretrained, quant, &prompt, bench, load_s)?);
    }
    Ok(DecodeRun { rows, prompt })
}

/// One ft row: batch-1 prefill and decode (median of `runs`), greedy batches, bandwidth.
fn measure<B: QuantBackend>(
    p: &Pretrained<B>,
    quant: Option<QuantSpec>,
    prompt: &[u32],
    bench: &DecodeBench,
    load_s: f64,
) -> Result<DecodeRow, EvalError> {
    let n_new = bench.new_tokens;
    let run = || {
        let mut sampler = Sampler::new(SamplingParams::default());
        let g = generate(&p.model, prompt, n_new, &[], &mut sampler, |_| {});
        (g.prefill_tokens_per_s(), g.decode_tokens_per_s())
    };
    run(); // warm-up: first-touch of weights and allocator pools
    let (prefill, decode): (Vec<f64>, Vec<f64>) = (0..bench.runs).map(|_| run()).unzip();
    let decode = median(decode);
    let short = bench_prompt(p, BATCH_PROMPT)?;
    let mut batches = [0.0; BATCHES.len()];
    for (rate, b) in batches.iter_mut().zip(BATCHES) {
        let prompts = vec![short.clone(); b];
        let t = Instant::now();
        let out = greedy_batch(&p.model, &prompts, n_new, &[], b)
            .map_err(|e| EvalError::Example(format!("greedy batch of {b}: {e}")))?;
        *rate = out.iter().map(Vec::len).sum::<usize>() as f64 / t.elapsed().as_secs_f64();
    }
    let head_bytes = match &p.model.head_blocks {
        Some(h) => h.weight.storage_bytes(),
        None => {
            let head = p
                .model
                .lm_head
                .as_ref()
                .map_or_else(|| p.model.model.embed_tokens.dims(), |h| h.dims());
            4 * head[0] * head[1]
        }
    };
    let linear_bytes: usize = p
        .model
        .linears()
        .iter()
        .map(|(_, l)| l.base.weight_bytes())
        .sum();
    let path = match HostDecoder::new(&p.model) {
        Some(_) => format!("host decode, {} kernels", Isa::active().name()),
        None => format!("burn {}", backend_name::<B>()),
    };
    Ok(DecodeRow {
        engine: format!("ft ({path}, {} weights)", format_name(quant)),
        load_s,
        prefill: median(prefill),
        decode,
        batches: Some(batches),
        weight_gbps: Some((linear_bytes + head_bytes) as f64 * decode / 1e9),
        rss: rss_bytes(),
    })
}

/// The weight format as the table names it: q8 and q4 for the GGUF block formats.
fn format_name(quant: Option<QuantSpec>) -> String {
    quant.map_or("f32".into(), |q| match q.format {
        QuantFormat::Q8_0 => "q8".to_string(),
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => "q4".to_string(),
        _ => q.to_string(),
    })
}

/// The median of `v`, which holds at least one value.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn backend_name<B: QuantBackend>() -> &'static str {
    let name = std::any::type_name::<B>();
    if name.contains("NdArray") {
        "ndarray"
    } else if name.contains("Cuda") {
        "cuda"
    } else {
        "other"
    }
}

/// A deterministic prompt of exactly `n` tokens: a fixed English text, repeated.
fn bench_prompt<B: QuantBackend>(p: &Pretrained<B>, n: usize) -> Result<Vec<u32>, EvalError> {
    const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. ";
    let unit = p.tokenizer.encode(TEXT)?;
    Ok(unit.iter().copied().cycle().take(n).collect())
}

/// How fast this machine reads memory, the ceiling of the weight-reads column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadBandwidth {
    /// GB/s, best of 3.
    pub gbps: f64,
    /// Threads that read.
    pub threads: usize,
}

impl ReadBandwidth {
    /// Measures with `threads` threads, each summing its share of a 512 MiB buffer.
    pub fn measure(threads: usize) -> Self {
        let words = vec![1u64; 64 << 20];
        let chunk = words.len().div_ceil(threads.max(1));
        let gbps = (0..3)
            .map(|_| {
                let t = Instant::now();
                let total: u64 = std::thread::scope(|scope| {
                    let parts: Vec<_> = words
                        .chunks(chunk)
                        .map(|part| scope.spawn(move || part.iter().fold(0u64, |a, &w| a ^ w)))
                        .collect();
                    parts.into_iter().map(|h| h.join().unwrap_or(0)).sum()
                });
                std::hint::black_box(total);
                (words.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max);
        Self { gbps, threads }
    }
}

/// The benchmark's Markdown table; `Display` renders it.
#[derive(Debug, Clone)]
pub struct DecodeTable {
    /// ft's rows, then any peer's.
    pub rows: Vec<DecodeRow>,
    /// Batch-1 prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens decoded after each prompt.
    pub new_tokens: usize,
    /// Timed batch-1 runs behind each median.
    pub runs: u64,
    /// The machine's read bandwidth.
    pub read_bandwidth: ReadBandwidth,
}

impl fmt::Display for DecodeTable {
    /// The rows, ft's ratios to a peer's row if there is one (the row without batch
    /// columns), what the batch and weight-read columns mean, and the read bandwidth.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n_prompt, n_new, runs) = (self.prompt_tokens, self.new_tokens, self.runs);
        let [b1, b2] = BATCHES;
        write!(
            f,
            "| engine | load s | prefill tok/s ({n_prompt} tokens) | decode tok/s ({n_new} tokens) \
             | batch {b1} tok/s | batch {b2} tok/s | weight reads GB/s | RSS MiB |\n\
             |---|---|---|---|---|---|---|---|\n"
        )?;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {:.2} | {:.1} | {:.2} | {} | {} | {} | {:.0} |",
                r.engine,
                r.load_s,
                r.prefill,
                r.decode,
                opt(r.batches.map(|b| b[0])),
                opt(r.batches.map(|b| b[1])),
                opt(r.weight_gbps),
                r.rss as f64 / (1 << 20) as f64
            )?;
        }
        if let Some(peer) = self.rows.iter().find(|r| r.batches.is_none()) {
            write!(f, "\nratios to llama.cpp (median of {runs} runs each):\n")?;
            for ft in self.rows.iter().filter(|r| r.batches.is_some()) {
                writeln!(
                    f,
                    "- {}: prefill {:.3}x, decode {:.3}x",
                    ft.engine,
                    ft.prefill / peer.prefill,
                    ft.decode / peer.decode
                )?;
            }
        }
        write!(
            f,
            "\nBatch columns: greedy batches of {BATCH_PROMPT}-token prompts, {n_new} new tokens \
             each, prefill included. Weight reads: bytes of the block linears and the output head \
             per decode step times batch-1 decode steps per second.\n"
        )?;
        writeln!(
            f,
            "Machine read bandwidth: {:.1} GB/s ({} threads summing 512 MiB, best of 3).",
            self.read_bandwidth.gbps, self.read_bandwidth.threads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ft_row(engine: &str, prefill: f64, decode: f64) -> DecodeRow {
        DecodeRow {
            engine: engine.into(),
            load_s: 1.234,
            prefill,
            decode,
            batches: Some([40.0, 90.04]),
            weight_gbps: Some(3.0),
            rss: 512 << 20,
        }
    }

    fn table(rows: Vec<DecodeRow>) -> String {
        DecodeTable {
            rows,
            prompt_tokens: 32,
            new_tokens: 16,
            runs: 3,
            read_bandwidth: ReadBandwidth {
                gbps: 12.34,
                threads: 2,
            },
        }
        .to_string()
    }

    #[test]
    fn the_table_has_a_row_per_engine_and_ratios_to_the_peer() {
        let peer = DecodeRow::from(LlamaCppDecode {
            version: "0.3.2".into(),
            load_s: 0.5,
            prefill: 100.0,
            decode: 20.0,
            peak_rss: 256 << 20,
            threads: 2,
        });
        let t = table(vec![ft_row("ft (q8)", 50.0, 30.0), peer]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| engine | load s | prefill tok/s (32 tokens) | decode tok/s (16 tokens) | batch 8 \
             tok/s | batch 32 tok/s | weight reads GB/s | RSS MiB |"
        );
        assert_eq!(lines[1], "|---|---|---|---|---|---|---|---|");
        assert_eq!(
            lines[2],
            "| ft (q8) | 1.23 | 50.0 | 30.00 | 40.0 | 90.0 | 3.0 | 512 |"
        );
        assert_eq!(
            lines[3],
            "| llama.cpp (llama-cpp-python 0.3.2, 2 threads) | 0.50 | 100.0 | 20.00 | - | - | - \
             | 256 |"
        );
        assert_eq!(lines[5], "ratios to llama.cpp (median of 3 runs each):");
        assert_eq!(lines[6], "- ft (q8): prefill 0.500x, decode 1.500x");
        assert_eq!(
            lines.last(),
            Some(&"Machine read bandwidth: 12.3 GB/s (2 threads summing 512 MiB, best of 3).")
        );
    }

    #[test]
    fn without_a_peer_there_are_no_ratios() {
        let t = table(vec![ft_row("ft (f32)", 50.0, 30.0)]);
        assert!(!t.contains("ratios"));
        assert!(t.contains("\nBatch columns: greedy batches of 16-token prompts, 16 new tokens"));
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
    }

    #[test]
    fn formats_are_named_as_the_table_names_them() {
        assert_eq!(format_name(None), "f32");
        let q = |format| {
            Some(QuantSpec {
                format,
                double_quant: false,
            })
        };
        assert_eq!(format_name(q(QuantFormat::Q8_0)), "q8");
        assert_eq!(format_name(q(QuantFormat::Q4_1)), "q4");
    }
}
