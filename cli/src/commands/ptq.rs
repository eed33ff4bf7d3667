//! `ft quant rtn | gptq | awq`: the decoder's projections rounded onto a storage format's grid,
//! to the nearest point, by GPTQ, or after AWQ's scaling on calibration text, and written
//! where `--model` loads them: a GGUF file for the ggml formats, bitsandbytes' HF folder for
//! nf4 (a QLoRA base), an f32 HF folder (the grid's values) for int3/int2.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use ft_model::formats::bnb_write::save_pretrained;
use ft_model::formats::gguf_export::{write_pretrained_gguf_quantized, GgufExportType};
use ft_model::ptq::awq::Awq;
use ft_model::ptq::{self, calibration, Gptq, Grid, Method};
use ft_model::{source, Pretrained, QuantFormat, QuantSpec};

use crate::args::{CalibArgs, GptqArgs, QuantAwqArgs, QuantGptqArgs, QuantPtqArgs};
use crate::error::{usage, UsageError};

/// Int3/int2 weights per group when `--group` is not given.
const INT_GROUP: usize = 64;

/// Runs `ft quant rtn`.
pub fn rtn(args: QuantPtqArgs) -> anyhow::Result<()> {
    let grid = grid(&args)?;
    let mut p = load(&args.model)?;
    check_groups(&p, grid)?;
    let t0 = Instant::now();
    let quantized = ptq::quantize(&mut p.model, grid, Method::Rtn, &[], |_, _| {})?;
    write(&mut p, &args, grid, &quantized)?;
    println!(
        "rounded {} projections to {} in {:.1} s; wrote {}",
        quantized.len(),
        args.format,
        t0.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Runs `ft quant gptq`.
pub fn gptq(args: QuantGptqArgs) -> anyhow::Result<()> {
    let grid = grid(&args.ptq)?;
    let method = gptq_method(&args.gptq)?;
    let mut p = load(&args.ptq.model)?;
    check_groups(&p, grid)?;
    let samples = windows(&p, &args.calib)?;
    let t0 = Instant::now();
    let quantized = ptq::quantize(&mut p.model, grid, method, &samples, |done, of| {
        layer_done("gptq", done, of, t0);
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    write(&mut p, &args.ptq, grid, &quantized)?;
    println!(
        "quantized {} projections to {} with GPTQ on {} windows of {} tokens in {seconds:.1} s; wrote {}",
        quantized.len(),
        args.ptq.format,
        samples.len(),
        args.calib.calib_len,
        args.ptq.out.display()
    );
    Ok(())
}

/// Runs `ft quant awq`.
pub fn awq(args: QuantAwqArgs) -> anyhow::Result<()> {
    let grid = grid(&args.ptq)?;
    let method = match args.then.as_str() {
        "gptq" => gptq_method(&args.gptq)?,
        _ => Method::Rtn,
    };
    let mut p = load(&args.ptq.model)?;
    check_groups(&p, grid)?;
    let samples = windows(&p, &args.calib)?;
    let settings = Awq {
        grid_points: args.grid as usize,
        clip: !args.no_clip,
    };
    let t0 = Instant::now();
    let report = ptq::awq::apply(&mut p.model, grid, settings, &samples, |done, of| {
        layer_done("awq", done, of, t0);
    })?;
    let quantized = ptq::quantize(&mut p.model, grid, method, &samples, |done, of| {
        if method != Method::Rtn {
            layer_done("awq: gptq", done, of, t0);
        }
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    write(&mut p, &args.ptq, grid, &quantized)?;
    println!(
        "AWQ scales (mean alpha {:.2}) left {:.1}% of round-to-nearest's output error on {} windows of {} tokens{}; quantized {} projections to {} ({}) in {seconds:.1} s; wrote {}",
        report.mean_alpha,
        100.0 * report.error / report.rtn_error.max(f64::MIN_POSITIVE),
        samples.len(),
        args.calib.calib_len,
        if settings.clip {
            format!(", clipping {:.1}% of groups", 100.0 * report.clipped)
        } else {
            String::new()
        },
        quantized.len(),
        args.ptq.format,
        args.then,
        args.ptq.out.display()
    );
    Ok(())
}

/// GPTQ with the command's settings.
fn gptq_method(args: &GptqArgs) -> anyhow::Result<Method> {
    if !(args.damp.is_finite() && args.damp > 0.0) {
        return Err(usage("--damp", "a fraction above 0", args.damp));
    }
    Ok(Method::Gptq(Gptq {
        damp: args.damp,
        act_order: args.act_order,
        ..Gptq::default()
    }))
}

/// Reports a layer done on stderr.
fn layer_done(what: &str, done: usize, of: usize, t0: Instant) {
    eprintln!(
        "ft quant {what}: layer {done} of {of} ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
}

/// The calibration windows `--calib`, `--calib-samples`, `--calib-len` and `--seed` name.
fn windows(p: &Pretrained<crate::device::Cpu>, args: &CalibArgs) -> anyhow::Result<Vec<Vec<u32>>> {
    let context = p.config.max_position_embeddings;
    if args.calib_len as usize > context {
        return Err(usage(
            "--calib-len",
            &format!("at most the model's context of {context} tokens"),
            args.calib_len,
        ));
    }
    let text = match &args.calib {
        Some(file) => {
            let contents = std::fs::read_to_string(file)
                .with_context(|| format!("--calib {}", file.display()))?;
            let jsonl = file.extension().is_some_and(|e| e == "jsonl");
            calibration::text_of(&contents, jsonl)
                .with_context(|| format!("--calib {}", file.display()))?
        }
        None => calibration::text_of(calibration::BUNDLED, true)?,
    };
    Ok(calibration::windows(
        &p.tokenizer,
        &text,
        args.calib_samples as usize,
        args.calib_len as usize,
        context,
        args.seed,
    )
    .map_err(|e| UsageError(format!("--calib: {e}")))?)
}

/// The grid `--format` and `--group` name.
fn grid(args: &QuantPtqArgs) -> anyhow::Result<Grid> {
    let fixed = |grid: Grid| match args.group {
        Some(g) if g as usize != grid.group() => Err(usage(
            "--group",
            &format!("{}, the only group {} holds", grid.group(), args.format),
            g,
        )),
        _ => Ok(grid),
    };
    if args.double_quant && args.format != "nf4" {
        return Err(usage("--double-quant", "--format nf4", &args.format));
    }
    let group = args.group.map_or(INT_GROUP, |g| g as usize);
    match args.format.as_str() {
        "q4_0" => fixed(Grid::Q4_0),
        "q4_1" => fixed(Grid::Q4_1),
        "q8_0" => fixed(Grid::Q8_0),
        "nf4" => fixed(Grid::Nf4),
        "int3" => Ok(Grid::Int { bits: 3, group }),
        "int2" => Ok(Grid::Int { bits: 2, group }),
        other => Err(usage(
            "--format",
            "q4_0, q4_1, q8_0, nf4, int3 or int2",
            other,
        )),
    }
}

/// The model with dense f32 projections.
fn load(model: &str) -> anyhow::Result<Pretrained<crate::device::Cpu>> {
    let path = source::resolve(model)?;
    let spec = QuantSpec {
        format: QuantFormat::F32,
        double_quant: false,
    };
    Ok(Pretrained::load(&path, Some(spec), &Default::default())?)
}

/// Every projection's inputs must be a whole number of groups.
fn check_groups(p: &Pretrained<crate::device::Cpu>, grid: Grid) -> anyhow::Result<()> {
    let g = grid.group();
    for (name, l) in p.model.linears() {
        let inputs = l.base.shape()[1];
        if inputs % g != 0 {
            return Err(usage(
                "--group",
                &format!("a divisor of every projection's inputs ({name} has {inputs})"),
                g,
            ));
        }
    }
    Ok(())
}

/// Writes the quantized model to `--out`: a GGUF file with the projections' blocks (the
/// embedding in Q8_0), bitsandbytes' NF4 folder, or an f32 HF folder.
fn write(
    p: &mut Pretrained<crate::device::Cpu>,
    args: &QuantPtqArgs,
    grid: Grid,
    quantized: &BTreeMap<String, ptq::Quantized>,
) -> anyhow::Result<()> {
    let out = &args.out;
    match grid {
        Grid::Q4_0 | Grid::Q4_1 | Grid::Q8_0 => {
            write_pretrained_gguf_quantized(p, GgufExportType::Q8_0, quantized, out)
        }
        Grid::Nf4 => {
            ptq::pack_nf4(&mut p.model, quantized, args.double_quant)?;
            let spec = QuantSpec {
                format: QuantFormat::Nf4,
                double_quant: args.double_quant,
            };
            save_pretrained(p, spec, out)
        }
        Grid::Int { .. } => p.save_hf(out),
    }
    .with_context(|| format!("--out {}", out.display()))
}
