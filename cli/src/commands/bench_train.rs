//! `ft bench train`: runs recipes one after another, each in its own `ft train` process (so
//! each peak RSS is its own), and prints one table of their summaries side by side: base
//! storage and bytes, peak RSS, training tokens/s, the share of step time spent dequantizing,
//! losses and held-out exact match before and after. With `--vs-peft`, each recipe's job is
//! also trained by Hugging Face transformers + PEFT ([`super::bench_train_peft`]) and a second
//! table sets the two side by side.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::args::BenchTrainArgs;
use crate::commands::bench_train_peft::PeftPeer;
use crate::commands::report::record;
use ft_trainer::run::Summary;

/// Runs `ft bench train`.
pub fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the ft binary")?;
    // The environment first, so that a failed install stops the bench before its long runs.
    let peer = if args.vs_peft {
        Some(PeftPeer::new(&args).context("--vs-peft")?)
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut vs = Vec::new();
    for recipe in &args.recipes {
        let stem = recipe
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        let out: PathBuf = args.out.join(&stem);
        eprintln!("training {} into {}", recipe.display(), out.display());
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .arg(recipe)
            .arg("--set")
            .arg(format!("output.dir={}", out.display()));
        for s in &args.sets {
            cmd.arg("--set").arg(s);
        }
        let status = cmd
            .status()
            .with_context(|| format!("running ft train {}", recipe.display()))?;
        anyhow::ensure!(
            status.success(),
            "ft train {} failed ({status})",
            recipe.display()
        );
        let path = out.join("summary.json");
        let summary: Summary = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not a run summary", path.display()))?;
        let task = std::fs::read_to_string(out.join("recipe.toml"))
            .ok()
            .and_then(|t| toml::from_str::<ft_trainer::recipe::Recipe>(&t).ok())
            .and_then(|r| r.data.task)
            .unwrap_or_else(|| "-".into());
        if let Some(peer) = &peer {
            let row = peer
                .run(recipe, &stem, &out, &summary)
                .with_context(|| format!("--vs-peft {}", recipe.display()))?;
            vs.push(row);
        }
        rows.push((stem, task, summary));
    }
    let mut table = render(&rows);
    if let Some(peer) = &peer {
        table.push('\n');
        table.push_str(&peer.table(vs));
    }
    print!("{table}");
    if let Some(file) = &args.record {
        record(file, "`ft bench train`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    Ok(())
}

fn render(rows: &[(String, String, Summary)]) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
    let f32_bytes = rows
        .iter()
        .find(|(_, _, s)| s.base_format == "f32")
        .map(|(_, _, s)| s.base_weight_bytes as f64);
    let mut t = String::from(
        "| recipe | task | base | base weights | vs f32 | peak RSS | optimizer state (device / host pages) | train tok/s | dequant share | steps | train loss | val loss | exact match before | after | wall |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, task, s) in rows {
        let vs = f32_bytes.map_or("-".into(), |f| {
            format!("{:.1}%", 100.0 * s.base_weight_bytes as f64 / f)
        });
        t.push_str(&format!(
            "| {name} | {task} | {} | {:.1} MiB | {vs} | {:.0} MiB | {:.1} / {:.1} MiB | {:.1} | {:.1}% | {} | {:.4} | {:.4} | {} | {} | {:.0} s |\n",
            s.base_format,
            mib(s.base_weight_bytes as f64),
            mib(s.peak_rss_bytes as f64),
            mib(s.optimizer_state.device as f64),
            mib(s.optimizer_state.host_paged as f64),
            s.train_tokens_per_s,
            100.0 * s.dequant_s / s.train_s.max(1e-9),
            s.steps,
            s.train_loss,
            s.val_loss,
            pct(s.exact_match_before),
            pct(s.exact_match_after),
            s.wall_s,
        ));
    }
    t
}
