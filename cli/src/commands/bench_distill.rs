//! `ft bench distill`: the recipe as written and its twin trained on the labels alone
//! (`distill.alpha = 1`: same student, steps, data and schedule, no teacher), each in its own
//! `ft train` process, then one table: held-out perplexity of the teacher, the student before
//! training, after cross-entropy-only training and after distillation; decode tokens/s of
//! teacher and distilled student measured side by side in this process; weight bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use ft_model::{Pretrained, QuantBackend};
use ft_serve::{generate, Sampler, SamplingParams};

use crate::args::BenchDistillArgs;
use crate::commands::report::record;
use crate::device::{dispatch, DeviceSpec, Job};
use ft_trainer::recipe::LoadedRecipe;
use ft_trainer::run::DistillSummary;

/// The prompt both models continue when decode speed is timed.
const PROMPT: &str = "In the beginning God created the heaven and the earth.";

/// Runs `ft bench distill`.
pub fn run(args: BenchDistillArgs) -> anyhow::Result<()> {
    let loaded = LoadedRecipe::load(&args.recipe, &args.sets)?;
    anyhow::ensure!(
        loaded.recipe.distill.is_some(),
        "{}: the recipe has no [distill] section",
        args.recipe.display()
    );
    let distilled = train(&args, "distill", &[])?;
    // Labels alone: no divergence term and no on-policy steps (which would consult the
    // teacher).
    let ce_only = train(&args, "ce-only", &["distill.alpha=1", "distill.lmbda=0"])?;
    let student = distilled
        .student_dir
        .clone()
        .context("the distillation run wrote no student folder (distill.method = \"full\")")?;
    let device: DeviceSpec = loaded
        .recipe
        .model
        .device
        .parse()
        .map_err(|e: String| anyhow::anyhow!("model.device: {e}"))?;
    let speeds = dispatch(
        device,
        Speeds {
            teacher: loaded.recipe.model.source.clone(),
            student,
            new_tokens: args.new_tokens as usize,
        },
    )?;
    let table = render(&distilled, &ce_only, speeds);
    print!("{table}");
    if let Some(file) = &args.record {
        record(file, "`ft bench distill`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    Ok(())
}

/// Runs the recipe into `out/name` with extra overrides; returns its summary.
fn train(args: &BenchDistillArgs, name: &str, extra: &[&str]) -> anyhow::Result<DistillSummary> {
    let exe = std::env::current_exe().context("locating the ft binary")?;
    let out: PathBuf = args.out.join(name);
    eprintln!(
        "training {} ({name}) into {}",
        args.recipe.display(),
        out.display()
    );
    let mut cmd = Command::new(&exe);
    cmd.arg("train")
        .arg(&args.recipe)
        .arg("--set")
        .arg(format!("output.dir={}", out.display()));
    for s in args
        .sets
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        cmd.arg("--set").arg(s);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running ft train {}", args.recipe.display()))?;
    anyhow::ensure!(
        status.success(),
        "ft train {} ({name}) failed ({status})",
        args.recipe.display()
    );
    read_summary(&out.join("summary.json"))
}

fn read_summary(path: &Path) -> anyhow::Result<DistillSummary> {
    serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a distillation summary", path.display()))
}

/// Decode speed of the teacher (as stored in its source) and the student folder.
struct Speeds {
    teacher: String,
    student: PathBuf,
    new_tokens: usize,
}

impl Job for Speeds {
    /// Decode tokens/s of (teacher, student).
    type Output = (f64, f64);

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<(f64, f64)> {
        let teacher = Pretrained::<B>::from_source(&self.teacher, None, &device)?;
        let student = Pretrained::<B>::load(&self.student, None, &device)?;
        let ids = teacher.tokenizer.encode(PROMPT)?;
        let speed = |p: &Pretrained<B>| {
            let mut sampler = Sampler::new(SamplingParams::default());
            // No stop ids: every run decodes exactly `new_tokens`.
            generate(&p.model, &ids, self.new_tokens, &[], &mut sampler, |_| {})
                .decode_tokens_per_s()
        };
        // Alternated, best of two each, so that a noisy moment hits both alike.
        let (mut t, mut s) = (0f64, 0f64);
        for _ in 0..2 {
            t = t.max(speed(&teacher));
            s = s.max(speed(&student));
        }
        Ok((t, s))
    }
}

fn render(
    distilled: &DistillSummary,
    ce_only: &DistillSummary,
    (t_tok_s, s_tok_s): (f64, f64),
) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let files: Vec<&str> = distilled.texts.iter().map(|t| t.file.as_str()).collect();
    let mut t = String::from("| model | layers | weights | steps | ");
    for f in &files {
        t.push_str(&format!("perplexity `{f}` | "));
    }
    t.push_str("decode tok/s (batch 1) | train wall |\n|---|---|---|---|");
    t.push_str(&"---|".repeat(files.len() + 2));
    t.push('\n');
    let ppl = |pick: &dyn Fn(usize) -> f64| -> String {
        (0..files.len())
            .map(|i| format!("{:.3} | ", pick(i)))
            .collect()
    };
    let d = distilled;
    t.push_str(&format!(
        "| teacher | {} | {:.1} MiB | - | {}{t_tok_s:.1} | - |\n",
        d.teacher_layers,
        mib(d.teacher_weight_bytes),
        ppl(&|i| d.texts[i].teacher),
    ));
    t.push_str(&format!(
        "| student before training | {} | {:.1} MiB | 0 | {}{s_tok_s:.1} | - |\n",
        d.student_layers,
        mib(d.student_weight_bytes),
        ppl(&|i| d.texts[i].student_before),
    ));
    for (name, s, speed) in [
        ("student, cross-entropy only", ce_only, "-".to_string()),
        ("student, distilled", distilled, format!("{s_tok_s:.1}")),
    ] {
        t.push_str(&format!(
            "| {name} | {} | {:.1} MiB | {} | {}{speed} | {:.0} s |\n",
            s.student_layers,
            mib(s.student_weight_bytes),
            s.steps,
            ppl(&|i| s.texts.get(i).map_or(f64::NAN, |x| x.student_after)),
            s.wall_s,
        ));
    }
    t
}
