//! `ft quant compare | save`: what each storage format of the frozen base costs and keeps.
//!
//! `compare` runs each format in a child process (`ft quant measure`), so that every peak RSS
//! is that format's own, then compares their top-1 predictions with f32's position by position.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use ft_model::perplexity::perplexity_with_predictions;
use ft_model::QuantBackend;
use ft_model::QuantSpec;
use ft_model::{source, Pretrained};
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
}

fn read_text(file: &Option<PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("--file {}", f.display())),
        None => Ok(GENESIS.to_string()),
    }
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
        let t0 = Instant::now();
        let p = Pretrained::<B>::load(&path, Some(self.spec), &device)?;
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
            spec: self.spec.to_string(),
            load_s,
            linear_params,
            linear_bytes,
            peak_rss: peak_rss_bytes(),
            prefill_tokens_per_s: g.prefill_tokens_per_s(),
            decode_tokens_per_s: g.decode_tokens_per_s(),
            perplexity: ppl.perplexity,
            scored: ppl.scored,
        };
        println!("{}", serde_json::to_string(&m)?);
        Ok(())
    }
}

/// Runs `ft quant compare`.
pub fn compare(args: QuantCompareArgs) -> anyhow::Result<()> {
    let mut specs = args.formats.clone();
    specs.retain(|s| *s != QuantSpec::F32);
    specs.insert(0, QuantSpec::F32);
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    source::resolve(&args.model)?; // fetch once, before the children start
    let exe = std::env::current_exe().context("locating the ft binary")?;
    let scratch = tempfile::tempdir().context("creating a temporary folder")?;
    let mut rows = Vec::new();
    for spec in &specs {
        let predictions = scratch.path().join(format!("predictions-{spec}.json"));
        let mut cmd = Command::new(&exe);
        cmd.args([
            "quant",
            "measure",
            "--model",
            &args.model,
            "--device",
            &args.device.to_string(),
        ])
        .args([
            "--spec",
            &spec.to_string(),
            "--window",
            &args.window.to_string(),
        ])
        .arg("--predictions")
        .arg(&predictions);
        if let Some(f) = &args.file {
            cmd.arg("--file").arg(f);
        }
        eprintln!("measuring {spec} ...");
        let out = cmd.output().context("running ft quant measure")?;
        anyhow::ensure!(
            out.status.success(),
            "measuring {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let m: Measurement =
            serde_json::from_slice(&out.stdout).context("reading the measurement")?;
        rows.push((m, read_predictions(&predictions)?));
    }
    let table = render(&rows);
    print!("{table}");
    std::fs::write(args.out.join("quant-compare.md"), &table)?;
    plot(&rows, &args.out.join("perplexity-vs-bytes.svg"))?;
    if let Some(file) = &args.record {
        record(file, "`ft quant compare`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    Ok(())
}

fn read_predictions(path: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn render(rows: &[(Measurement, Vec<u32>)]) -> String {
    let (base, base_pred) = (&rows[0].0, &rows[0].1);
    let mut out = String::from(
        "| format | linear weight MiB | bits/param | bytes/param | peak RSS MiB | load s | prefill tok/s | decode tok/s | perplexity | vs f32 | top-1 agreement |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (m, pred) in rows {
        let agree = pred.iter().zip(base_pred).filter(|(a, b)| a == b).count();
        let bytes_per_param = m.linear_bytes as f64 / m.linear_params.max(1) as f64;
        out += &format!(
            "| {} | {:.1} | {:.3} | {:.3} | {:.0} | {:.2} | {:.1} | {:.2} | {:.4} | {:+.2}% | {:.2}% |\n",
            m.spec,
            m.linear_bytes as f64 / (1 << 20) as f64,
            8.0 * bytes_per_param,
            bytes_per_param,
            m.peak_rss as f64 / (1 << 20) as f64,
            m.load_s,
            m.prefill_tokens_per_s,
            m.decode_tokens_per_s,
            m.perplexity,
            100.0 * (m.perplexity / base.perplexity - 1.0),
            100.0 * agree as f64 / base_pred.len().max(1) as f64,
        );
    }
    out += &format!(
        "\nLinear weights: the {} parameters of the block projections (embeddings and norms stay f32). Perplexity over {} scored tokens; top-1 agreement with f32 at the same positions.\n",
        base.linear_params, base.scored
    );
    out
}

/// Perplexity against weight bytes, one point per format (its colour in the legend).
fn plot(rows: &[(Measurement, Vec<u32>)], path: &Path) -> anyhow::Result<()> {
    Scatter {
        title: "Perplexity against linear weight size".into(),
        x_desc: "linear weights (MiB)".into(),
        y_desc: "perplexity".into(),
        points: rows
            .iter()
            .map(|(m, _)| {
                (
                    m.linear_bytes as f64 / (1 << 20) as f64,
                    m.perplexity,
                    Key {
                        model: m.spec.clone(),
                        ..Key::default()
                    },
                )
            })
            .collect(),
        headings: ["format", "", ""],
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
