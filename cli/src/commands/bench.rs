//! `ft bench generate`: prefill and decode tokens/s at batch 1 and peak RSS, optionally with
//! llama.cpp (through llama-cpp-python) measured on the same GGUF in the same run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use ft_model::forward::host::HostDecoder;
use ft_model::kernels::Isa;
use ft_model::{source, Pretrained};
use ft_model::{QuantBackend, QuantFormat, QuantSpec};
use ft_serve::{generate as run_generation, greedy_batch, Sampler, SamplingParams};

use crate::args::{BenchGenerateArgs, InferenceWeights};
use crate::commands::report::record;
use crate::device::{dispatch, Job};
use ft_eval::rss::rss_bytes;

/// Runs `ft bench generate`.
pub fn generate(args: BenchGenerateArgs) -> anyhow::Result<()> {
    dispatch(args.model.base.device, args)
}

/// One row of the table.
struct Row {
    engine: String,
    load_s: f64,
    prefill: f64,
    decode: f64,
    /// Aggregate tokens/s of greedy batches of 8 and 32 (ft only).
    batches: Option<[f64; 2]>,
    /// Weight bytes read per decode step times decode steps per second (ft only).
    weight_gbps: Option<f64>,
    /// Resident memory after the run (ft: this format's model; llama.cpp: its process peak).
    rss: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rows of the batched-decode columns, and their prompt length.
const BATCHES: [usize; 2] = [8, 32];
const BATCH_PROMPT: usize = 16;

impl Job for BenchGenerateArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let (n_prompt, n_new) = (self.prompt_tokens as usize, self.new_tokens as usize);
        let path = source::resolve(&self.model.base.model)?;
        let formats: Vec<Option<QuantSpec>> = if self.all_weights {
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
            // QLoRA's base, through the 4-bit kernel.
            .chain([Some(QuantSpec {
                format: QuantFormat::Nf4,
                double_quant: true,
            })])
            .collect()
        } else {
            vec![self.model.base.storage_for(&path)?]
        };
        let mut rows = Vec::new();
        let mut prompt = Vec::new();
        for quant in formats {
            let t0 = Instant::now();
            let mut pretrained = Pretrained::<B>::load(&path, quant, &device)?;
            if let Some(dir) = &self.model.adapter {
                pretrained.attach_adapter(dir)?;
            }
            if quant.is_some_and(|q| q.format == QuantFormat::Bf16) {
                pretrained.model.pack_head(QuantFormat::Bf16);
            }
            let load_s = t0.elapsed().as_secs_f64();
            pretrained.check_context(
                "--prompt-tokens plus --new-tokens",
                n_prompt.max(BATCH_PROMPT) + n_new,
            )?;
            prompt = bench_prompt(&pretrained, n_prompt)?;
            rows.push(measure(
                &pretrained,
                quant,
                &prompt,
                n_new,
                self.runs,
                load_s,
            )?);
        }
        if self.vs_llama_cpp {
            rows.push(llama_cpp(&path, &prompt, n_new, self.threads, self.runs)?);
        }

        let mut table = render(&rows, n_prompt, n_new, self.runs);
        table += &format!(
            "Machine read bandwidth: {:.1} GB/s ({} threads summing 512 MiB, best of 3).\n",
            read_bandwidth_gbps(self.threads),
            self.threads
        );
        print!("{table}");
        if let Some(file) = &self.record {
            record(file, "`ft bench generate`", &table)
                .with_context(|| format!("--record {}", file.display()))?;
        }
        Ok(())
    }
}

/// One ft row: batch-1 prefill and decode (median of `runs`), greedy batches, bandwidth.
fn measure<B: QuantBackend>(
    p: &Pretrained<B>,
    quant: Option<QuantSpec>,
    prompt: &[u32],
    n_new: usize,
    runs: u64,
    load_s: f64,
) -> anyhow::Result<Row> {
    let run = || {
        let mut sampler = Sampler::new(SamplingParams::default());
        let g = run_generation(&p.model, prompt, n_new, &[], &mut sampler, |_| {});
        (g.prefill_tokens_per_s(), g.decode_tokens_per_s())
    };
    run(); // warm-up: first-touch of weights and allocator pools
    let (prefill, decode): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| run()).unzip();
    let decode = median(decode);
    let short = bench_prompt(p, BATCH_PROMPT)?;
    let batches = BATCHES.map(|b| {
        let prompts = vec![short.clone(); b];
        let t = Instant::now();
        let out = greedy_batch(&p.model, &prompts, n_new, &[], b);
        out.iter().map(Vec::len).sum::<usize>() as f64 / t.elapsed().as_secs_f64()
    });
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
    Ok(Row {
        engine: format!(
            "ft ({path}, {} weights)",
            quant.map_or("f32".into(), |q| match q.format {
                QuantFormat::Q8_0 => "q8".to_string(),
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => "q4".to_string(),
                _ => q.to_string(),
            }),
        ),
        load_s,
        prefill: median(prefill),
        decode,
        batches: Some(batches),
        weight_gbps: Some((linear_bytes + head_bytes) as f64 * decode / 1e9),
        rss: rss_bytes(),
    })
}

/// GB/s at which `threads` threads read memory: each sums its share of a 512 MiB buffer.
fn read_bandwidth_gbps(threads: usize) -> f64 {
    let words = vec![1u64; 64 << 20];
    let chunk = words.len().div_ceil(threads.max(1));
    (0..3)
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
        .fold(0.0, f64::max)
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
fn bench_prompt<B: QuantBackend>(p: &Pretrained<B>, n: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. ";
    let unit = p.tokenizer.encode(TEXT)?;
    Ok(unit.iter().copied().cycle().take(n).collect())
}

fn render(rows: &[Row], n_prompt: usize, n_new: usize, runs: u64) -> String {
    let [b1, b2] = BATCHES;
    let mut out = format!(
        "| engine | load s | prefill tok/s ({n_prompt} tokens) | decode tok/s ({n_new} tokens) \
         | batch {b1} tok/s | batch {b2} tok/s | weight reads GB/s | RSS MiB |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for r in rows {
        out += &format!(
            "| {} | {:.2} | {:.1} | {:.2} | {} | {} | {} | {:.0} |\n",
            r.engine,
            r.load_s,
            r.prefill,
            r.decode,
            opt(r.batches.map(|b| b[0])),
            opt(r.batches.map(|b| b[1])),
            opt(r.weight_gbps),
            r.rss as f64 / (1 << 20) as f64
        );
    }
    if let Some(llama) = rows.iter().find(|r| r.batches.is_none()) {
        out += &format!("\nratios to llama.cpp (median of {runs} runs each):\n");
        for ft in rows.iter().filter(|r| r.batches.is_some()) {
            out += &format!(
                "- {}: prefill {:.3}x, decode {:.3}x\n",
                ft.engine,
                ft.prefill / llama.prefill,
                ft.decode / llama.decode
            );
        }
    }
    out += &format!(
        "\nBatch columns: greedy batches of {BATCH_PROMPT}-token prompts, {n_new} new tokens each, \
         prefill included. Weight reads: bytes of the block linears and the output head per \
         decode step times batch-1 decode steps per second.\n"
    );
    out
}

/// Measures llama.cpp in a child process (so its memory is its own) on the same prompt ids.
fn llama_cpp(
    path: &Path,
    prompt: &[u32],
    n_new: usize,
    threads: usize,
    runs: u64,
) -> anyhow::Result<Row> {
    const SCRIPT: &str = r#"
import json, resource, statistics, sys, time
try:
    from llama_cpp import Llama
    import llama_cpp, numpy as np
except ImportError as e:
    sys.exit(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python")
def peak_rss():
    # VmHWM is reset by exec; ru_maxrss would carry over the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, ids, n_new, threads, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=len(ids) + n_new + 8, n_batch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t
pre, dec = [], []
for _ in range(runs + 1):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t3 = time.perf_counter()
    pre.append(len(ids) / (t1 - t0)); dec.append((n_new - 1) / (t3 - t2))
print(json.dumps({"version": llama_cpp.__version__, "load_s": load_s,
                  "prefill": statistics.median(pre[1:]), "decode": statistics.median(dec[1:]),
                  "peak_rss": peak_rss()}))
"#;
    anyhow::ensure!(
        path.is_file(),
        "--vs-llama-cpp needs a GGUF file model, got the folder {}",
        path.display()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(path)
        .arg(serde_json::to_string(prompt)?)
        .arg(n_new.to_string())
        .arg(threads.to_string())
        .arg(runs.to_string())
        .output()
        .context("--vs-llama-cpp: could not run python3")?;
    anyhow::ensure!(
        out.status.success(),
        "--vs-llama-cpp: llama.cpp run failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("--vs-llama-cpp: unreadable result")?;
    let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Row {
        engine: format!(
            "llama.cpp (llama-cpp-python {}, {threads} threads)",
            v["version"].as_str().unwrap_or("?")
        ),
        load_s: num("load_s"),
        prefill: num("prefill"),
        decode: num("decode"),
        batches: None,
        weight_gbps: None,
        rss: num("peak_rss") as u64,
    })
}
