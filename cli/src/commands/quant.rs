//! `ft quant compare | save`: what each storage format of the frozen base costs and keeps, and
//! what each way of rounding to it (RTN, GPTQ, AWQ, AWQ+GPTQ) buys.
//!
//! `compare` runs each format in a child process (`ft quant measure`), so that every peak RSS
//! is that format's own, then compares their top-1 predictions with f32's position by position.
//! Post-training quantization rows are written by `ft quant rtn|gptq|awq` children (their
//! wall time is the quantization time) and measured as written; with `--vs-llama-cpp`,
//! llama.cpp quantizes the same weights itself and scores every Q4_0 file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use ft_eval::peers::llama_cpp_quant;
use ft_model::formats::gguf_export::{write_pretrained_gguf, GgufExportType};
use ft_model::perplexity::perplexity_with_predictions;
use ft_model::QuantBackend;
use ft_model::{source, Pretrained, QuantFormat, QuantSpec};
use ft_serve::{generate, Sampler, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::args::{QuantCompareArgs, QuantMeasureArgs, QuantSaveArgs};
use crate::commands::report::record;
use crate::device::{dispatch, Job};
use crate::error::usage;
use ft_eval::plot::{Chart, Key, Scatter};
use ft_eval::rss::peak_rss_bytes;

/// Genesis 1-3 (King James Version, public domain): the default text to score.
const GENESIS: &str = include_str!("../../../fixtures/reference/kjv_genesis_1-3.txt");

/// The bundled chat validation conversations: the default second text, never calibration.
const CHAT_VAL: &str = include_str!("../../../data/chat/chatterbot-en-val.jsonl");

/// What one format measured.
#[derive(Debug, Serialize, Deserialize)]
struct Measurement {
    spec: String,
    load_s: f64,
    linear_params: usize,
    linear_bytes: usize,
    peak_rss: u64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    perplexity: f64,
    scored: usize,
    perplexity2: Option<f64>,
}

fn read_text(file: &Option<PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("--file {}", f.display())),
        None => Ok(GENESIS.to_string()),
    }
}

/// The chat validation conversations as text, one turn a line.
fn chat_text() -> anyhow::Result<String> {
    let mut lines = Vec::new();
    for line in CHAT_VAL.lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line)?;
        for m in record["messages"].as_array().into_iter().flatten() {
            lines.push(m["content"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(lines.join("\n"))
}

/// Runs `ft quant measure`.
pub fn measure(args: QuantMeasureArgs) -> anyhow::Result<()> {
    dispatch(args.device, args)
}

impl Job for QuantMeasureArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let path = source::resolve(&self.model)?;
        let text = read_text(&self.file)?;
        // As stored: a GGUF's own blocks on the kernels that read them, as `ft perplexity`.
        let spec = match self.spec {
            Some(spec) => Some(spec),
            None => {
                ft_model::pretrained::default_inference_format(&path)?.map(|format| QuantSpec {
                    format,
                    double_quant: false,
                })
            }
        };
        let t0 = Instant::now();
        let p = Pretrained::<B>::load(&path, spec, &device)?;
        let load_s = t0.elapsed().as_secs_f64();
        let linears = p.model.linears();
        let linear_params = linears
            .iter()
            .map(|(_, l)| l.base.shape()[0] * l.base.shape()[1])
            .sum();
        let linear_bytes = linears.iter().map(|(_, l)| l.base.weight_bytes()).sum();
        let ids = p.tokenizer.encode(&text)?;
        anyhow::ensure!(ids.len() >= 2, "--file: fewer than 2 tokens to score");
        let context = p.config.max_position_embeddings;
        if self.window as usize > context {
            return Err(usage(
                "--window",
                &format!("at most the model context of {context} tokens"),
                self.window,
            ));
        }
        let (ppl, predictions) =
            perplexity_with_predictions(&p.model, &ids, self.window as usize, &device);
        std::fs::write(&self.predictions, serde_json::to_string(&predictions)?)
            .with_context(|| format!("{}", self.predictions.display()))?;
        let perplexity2 = match &self.second_file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--second-file {}", f.display()))?;
                let ids = p.tokenizer.encode(&text)?;
                anyhow::ensure!(
                    ids.len() >= 2,
                    "--second-file: fewer than 2 tokens to score"
                );
                let (ppl, _) =
                    perplexity_with_predictions(&p.model, &ids, self.window as usize, &device);
                Some(ppl.perplexity)
            }
            None => None,
        };
        // Speed: a prompt of up to 64 tokens from the text, then 16 greedy tokens.
        let prompt = &ids[..ids.len().min(64).min(context.saturating_sub(16)).max(1)];
        let g = generate(
            &p.model,
            prompt,
            16,
            &[],
            &mut Sampler::new(SamplingParams::default()),
            |_| {},
        );
        let m = Measurement {
            spec: spec.map_or_else(|| "as stored".into(), |s| s.to_string()),
            load_s,
            linear_params,
            linear_bytes,
            peak_rss: peak_rss_bytes(),
            prefill_tokens_per_s: g.prefill_tokens_per_s(),
            decode_tokens_per_s: g.decode_tokens_per_s(),
            perplexity: ppl.perplexity,
            scored: ppl.scored,
            perplexity2,
        };
        println!("{}", serde_json::to_string(&m)?);
        Ok(())
    }
}

/// The method of the rows quantized as they load.
const LOAD_RTN: &str = "RTN at load";

/// One row of the comparison.
struct Row {
    /// The storage format.
    format: String,
    /// How the weights were rounded to it.
    method: String,
    /// Who loaded and scored the file: ft, or llama.cpp.
    scorer: &'static str,
    /// ft's measurement (absent for llama.cpp's rows).
    m: Option<Measurement>,
    perplexity: f64,
    perplexity2: Option<f64>,
    /// Top-1 predictions on the first text.
    predictions: Vec<u32>,
    /// Wall seconds to write the file.
    quant_s: Option<f64>,
}

/// Runs `ft quant compare`.
pub fn compare(args: QuantCompareArgs) -> anyhow::Result<()> {
    let mut specs = args.formats.clone();
    specs.retain(|s| *s != QuantSpec::F32);
    specs.insert(0, QuantSpec::F32);
    for f in &args.ptq {
        if !["q4_0", "q4_1", "q8_0", "nf4", "int3", "int2"].contains(&f.as_str()) {
            return Err(usage("--ptq", "q4_0, q4_1, q8_0, nf4, int3 or int2", f));
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    let model_path = source::resolve(&args.model)?; // fetch once, before the children start
    let exe = std::env::current_exe().context("locating the ft binary")?;
    let scratch = tempfile::tempdir().context("creating a temporary folder")?;
    let second = match &args.second_file {
        Some(f) => f.clone(),
        None => {
            let f = scratch.path().join("chat-val.txt");
            std::fs::write(&f, chat_text()?)?;
            f
        }
    };
    let measure = |model: &str,
                   spec: Option<QuantSpec>,
                   name: &str|
     -> anyhow::Result<(Measurement, Vec<u32>)> {
        let predictions = scratch.path().join(format!("predictions-{name}.json"));
        let mut cmd = Command::new(&exe);
        cmd.args(["quant", "measure", "--model", model])
            .args(["--device", &args.device.to_string()])
            .args(["--window", &args.window.to_string()])
            .arg("--predictions")
            .arg(&predictions)
            .arg("--second-file")
            .arg(&second);
        if let Some(spec) = spec {
            cmd.args(["--spec", &spec.to_string()]);
        }
        if let Some(f) = &args.file {
            cmd.arg("--file").arg(f);
        }
        eprintln!("measuring {name} ...");
        let out = cmd.output().context("running ft quant measure")?;
        anyhow::ensure!(
            out.status.success(),
            "measuring {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let m: Measurement =
            serde_json::from_slice(&out.stdout).context("reading the measurement")?;
        Ok((m, read_predictions(&predictions)?))
    };
    let mut rows = Vec::new();
    for spec in &specs {
        let (m, predictions) = measure(&args.model, Some(*spec), &spec.to_string())?;
        rows.push(Row {
            format: spec.to_string(),
            method: if *spec == QuantSpec::F32 {
                "-"
            } else {
                "RTN at load"
            }
            .into(),
            scorer: "ft",
            perplexity: m.perplexity,
            perplexity2: m.perplexity2,
            m: Some(m),
            predictions,
            quant_s: None,
        });
    }
    let mut q4_0_files = Vec::new();
    for format in &args.ptq {
        for method in &args.methods {
            let name = format!("{format}-{}", method.replace('+', "-"));
            let ggml = format.starts_with('q');
            let out = scratch.path().join(if ggml {
                format!("{name}.gguf")
            } else {
                name.clone()
            });
            let mut cmd = Command::new(&exe);
            match method.as_str() {
                "awq+gptq" => cmd.args(["quant", "awq", "--then", "gptq"]),
                m => cmd.args(["quant", m]),
            };
            cmd.args(["--model", &args.model, "--format", format])
                .arg("--out")
                .arg(&out);
            if format == "nf4" {
                cmd.arg("--double-quant");
            }
            if method != "rtn" {
                if let Some(n) = args.calib_samples {
                    cmd.args(["--calib-samples", &n.to_string()]);
                }
                if let Some(n) = args.calib_len {
                    cmd.args(["--calib-len", &n.to_string()]);
                }
            }
            eprintln!("quantizing {format} with {method} ...");
            let t0 = Instant::now();
            let done = cmd.output().context("running ft quant")?;
            let quant_s = t0.elapsed().as_secs_f64();
            anyhow::ensure!(
                done.status.success(),
                "quantizing {format} with {method} failed: {}",
                String::from_utf8_lossy(&done.stderr).trim()
            );
            let path = out.to_string_lossy().to_string();
            let (m, predictions) = measure(&path, None, &name)?;
            if format == "q4_0" {
                q4_0_files.push((method.clone(), out));
            }
            rows.push(Row {
                format: if format == "nf4" {
                    "nf4+dq".into()
                } else {
                    format.clone()
                },
                method: method_name(method),
                scorer: "ft",
                perplexity: m.perplexity,
                perplexity2: m.perplexity2,
                m: Some(m),
                predictions,
                quant_s: Some(quant_s),
            });
        }
    }
    let mut notes = Vec::new();
    if args.vs_llama_cpp {
        let p = Pretrained::<crate::device::Cpu>::load(
            &model_path,
            Some(QuantSpec {
                format: QuantFormat::F32,
                double_quant: false,
            }),
            &Default::default(),
        )?;
        let f16 = scratch.path().join("f16.gguf");
        write_pretrained_gguf(&p, GgufExportType::F16, &f16)?;
        let texts = vec![
            p.tokenizer.encode(&read_text(&args.file)?)?,
            p.tokenizer.encode(&std::fs::read_to_string(&second)?)?,
        ];
        let q4_0 = scratch.path().join("llama-cpp-q4_0.gguf");
        let others: Vec<PathBuf> = q4_0_files.iter().map(|(_, f)| f.clone()).collect();
        eprintln!(
            "llama.cpp: quantizing to Q4_0 and scoring {} files ...",
            others.len() + 2
        );
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let r = llama_cpp_quant::quantize_and_score(
            &f16,
            &q4_0,
            &others,
            &texts,
            args.window as usize,
            threads,
        )?;
        let methods = ["-".to_string(), "RTN (llama.cpp's quantizer)".into()]
            .into_iter()
            .chain(q4_0_files.iter().map(|(m, _)| method_name(m)));
        for ((score, method), format) in r.scores.into_iter().zip(methods).zip(
            ["f16".to_string()]
                .into_iter()
                .chain(std::iter::repeat("q4_0".to_string())),
        ) {
            let quant_s = (method.contains("llama.cpp")).then_some(r.quantize_s);
            rows.push(Row {
                format,
                method,
                scorer: "llama.cpp",
                m: None,
                perplexity: score.perplexity[0],
                perplexity2: score.perplexity.get(1).copied(),
                predictions: score.predictions,
                quant_s,
            });
        }
        notes.push(format!("llama.cpp rows: llama-cpp-python {}, its f16 GGUF of the same weights as their baseline; the llama.cpp Q4_0 file keeps llama.cpp's own choice for the tied embedding (Q6_K), ft's files hold it in Q8_0.", r.version));
    }
    let table = render(&rows, &notes);
    print!("{table}");
    std::fs::write(args.out.join("quant-compare.md"), &table)?;
    plot(&rows, &args.out.join("perplexity-vs-bytes.svg"))?;
    if let Some(file) = &args.record {
        record(file, "`ft quant compare`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    Ok(())
}

/// A method as the table names it.
fn method_name(method: &str) -> String {
    match method {
        "rtn" => "RTN",
        "gptq" => "GPTQ",
        "awq" => "AWQ",
        "awq+gptq" => "AWQ + GPTQ",
        other => other,
    }
    .into()
}

fn read_predictions(path: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn render(rows: &[Row], notes: &[String]) -> String {
    let mut out = String::from(
        "| format | method | scored by | linear weight MiB | bits/param | bytes/param | peak RSS MiB | load s | prefill tok/s | decode tok/s | perplexity | vs f32 | RTN's excess removed | perplexity, 2nd text | top-1 agreement | quantization s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let dash = || "-".to_string();
    for row in rows {
        // Each scorer's rows against its own unquantized baseline (its first row).
        let Some(base) = rows.iter().find(|r| r.scorer == row.scorer) else {
            continue;
        };
        // The first file rounded to nearest of the same format and scorer (for llama.cpp's
        // rows, its own quantizer's); a base rounded at load keeps its embedding in f32, unlike
        // the files, so it is no baseline.
        let rtn = rows.iter().find(|r| {
            r.scorer == row.scorer
                && r.format == row.format
                && r.method.starts_with("RTN")
                && r.method != LOAD_RTN
        });
        let removed = match rtn {
            Some(rtn) if !row.method.starts_with("RTN") && rtn.perplexity > base.perplexity => {
                format!(
                    "{:.1}%",
                    100.0 * (rtn.perplexity - row.perplexity) / (rtn.perplexity - base.perplexity)
                )
            }
            _ => dash(),
        };
        let agree = row
            .predictions
            .iter()
            .zip(&base.predictions)
            .filter(|(a, b)| a == b)
            .count();
        let m = row.m.as_ref();
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.4} | {:+.2}% | {} | {} | {:.2}% | {} |\n",
            row.format,
            row.method,
            row.scorer,
            m.map_or_else(dash, |m| format!("{:.1}", m.linear_bytes as f64 / (1 << 20) as f64)),
            m.map_or_else(dash, |m| format!("{:.3}", 8.0 * m.linear_bytes as f64 / m.linear_params.max(1) as f64)),
            m.map_or_else(dash, |m| format!("{:.3}", m.linear_bytes as f64 / m.linear_params.max(1) as f64)),
            m.map_or_else(dash, |m| format!("{:.0}", m.peak_rss as f64 / (1 << 20) as f64)),
            m.map_or_else(dash, |m| format!("{:.2}", m.load_s)),
            m.map_or_else(dash, |m| format!("{:.1}", m.prefill_tokens_per_s)),
            m.map_or_else(dash, |m| format!("{:.2}", m.decode_tokens_per_s)),
            row.perplexity,
            100.0 * (row.perplexity / base.perplexity - 1.0),
            removed,
            row.perplexity2.map_or_else(dash, |p| format!("{p:.4}")),
            100.0 * agree as f64 / base.predictions.len().max(1) as f64,
            row.quant_s.map_or_else(dash, |s| format!("{s:.0}")),
        );
    }
    if let Some(base) = rows.first().and_then(|r| r.m.as_ref()) {
        out += &format!(
            "\nLinear weights: the {} parameters of the block projections (embeddings and norms stay f32 at load, Q8_0 in the GGUF files ft writes). Perplexity over {} scored tokens; top-1 agreement with the unquantized model of the same scorer at the same positions; RTN's excess removed: the share of round-to-nearest's excess perplexity over the unquantized model that the method removes, against the first file rounded to nearest of the same format and scorer (for llama.cpp's rows, llama.cpp's own Q4_0).\n",
            base.linear_params, base.scored
        );
    }
    for note in notes {
        out += &format!("\n{note}\n");
    }
    out
}

/// Perplexity against weight bytes, one point per row ft measured (its colour in the legend).
fn plot(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    Scatter {
        title: "Perplexity against linear weight size".into(),
        x_desc: "linear weights (MiB)".into(),
        y_desc: "perplexity".into(),
        points: rows
            .iter()
            .filter_map(|row| {
                let m = row.m.as_ref()?;
                Some((
                    m.linear_bytes as f64 / (1 << 20) as f64,
                    row.perplexity,
                    Key {
                        model: row.method.clone(),
                        storage: row.format.clone(),
                        ..Key::default()
                    },
                ))
            })
            .collect(),
        headings: ["method", "format", ""],
        x_from_zero: true,
    }
    .save_svg(path)?;
    Ok(())
}

/// Runs `ft quant save`.
pub fn save(args: QuantSaveArgs) -> anyhow::Result<()> {
    let spec = QuantSpec {
        format: args.format.format,
        double_quant: args.format.double_quant || args.double_quant,
    };
    let path = source::resolve(&args.model)?;
    let device = Default::default();
    let p = Pretrained::<crate::device::Cpu>::load(&path, Some(spec), &device)?;
    ft_model::formats::bnb_write::save_pretrained(&p, spec, &args.out)?;
    println!("saved {spec} model to {}", args.out.display());
    Ok(())
}
