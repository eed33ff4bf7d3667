//! `ft scaling sweep`, `ft scaling fit` (with its figures) and `ft scaling plan`.

use ft_trainer::scaling::fit::{self, Options};
use ft_trainer::scaling::sweep;
use ft_trainer::scaling::{Law, CHINCHILLA, EPOCH};

use crate::args::{ScalingFitArgs, ScalingPlanArgs, ScalingSweepArgs};
use crate::error::{usage, UsageError};

/// `ft scaling sweep`: trains the runs not yet finished, then prints every run's row. A bad
/// sweep file is a usage error; a run that fails stops the sweep (finished runs stay).
pub fn sweep(args: ScalingSweepArgs) -> anyhow::Result<()> {
    let plan = sweep::plan(&args.sweep, args.out.as_deref())
        .and_then(|plan| sweep::check(&plan).map(|()| plan))
        .map_err(|e| UsageError(e.to_string()))?;
    if args.dry_run {
        println!(
            "| run | width | layers | heads | kv heads | MLP | tokens | lr | fitted |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for run in &plan.runs {
            let (m, t) = (&run.recipe.model, &run.recipe.train);
            let a = m
                .architecture()
                .ok_or_else(|| anyhow::anyhow!("no architecture"))?;
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.3e} | {} |",
                run.name,
                a.hidden_size,
                a.num_hidden_layers,
                a.num_attention_heads,
                a.num_key_value_heads,
                a.intermediate_size,
                t.max_tokens.unwrap_or_default(),
                t.lr,
                if run.held_out { "no (held out)" } else { "yes" }
            );
        }
        println!("\n{} runs into {}", plan.runs.len(), plan.out.display());
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let rows = sweep::run(&plan, &exe)?;
    println!(
        "| run | params | non-embedding | tokens | FLOPs (counted) | FLOPs (6ND) | held-out loss | \
         fitted |\n|---|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        let s = &r.summary;
        println!(
            "| {} | {} | {} | {} | {:.3e} | {:.3e} | {:.4} | {} |",
            r.name,
            s.params,
            s.non_embedding_params,
            s.tokens,
            s.flops,
            s.flops_6nd,
            s.val_loss,
            if r.held_out { "no (held out)" } else { "yes" }
        );
    }
    let csv = plan.out.join("runs.csv");
    println!(
        "\n{} runs in {}; fit them with `ft scaling fit {}`",
        rows.len(),
        csv.display(),
        csv.display()
    );
    Ok(())
}

/// `ft scaling fit`: the law with its intervals, the tokens per parameter at the optimum and
/// the residuals, as a table or JSON. A bad file is a usage error.
pub fn fit(args: ScalingFitArgs) -> anyhow::Result<()> {
    let runs = fit::read_csv(&args.runs).map_err(|e| UsageError(e.to_string()))?;
    let options = Options {
        bootstrap: args.bootstrap,
        seed: args.seed,
        ..Options::default()
    };
    let mut f = fit::fit(&runs.fitted, options)
        .map_err(|e| UsageError(format!("{}: {e}", args.runs.display())))?;
    f.predict(&runs.fitted, &runs.held_out);
    if let Some(dir) = &args.plot {
        ft_trainer::scaling::plot::save(&f, &runs, dir)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
        return Ok(());
    }
    let l = f.law;
    println!(
        "L(N, D) = E + A / N^alpha + B / D^beta, fitted to {} runs\n",
        f.points
    );
    println!("| parameter | value | 95% interval |\n|---|---|---|");
    for (name, value) in [
        ("E", l.e),
        ("A", l.a),
        ("B", l.b),
        ("alpha", l.alpha),
        ("beta", l.beta),
    ] {
        let interval = f
            .intervals
            .iter()
            .find(|(n, _)| n == name)
            .map_or_else(|| "-".into(), |(_, i)| format!("{:.4} - {:.4}", i.lo, i.hi));
        println!("| {name} | {value:.4} | {interval} |");
    }
    println!(
        "\ntokens per parameter at the optimum (the runs' largest compute): {:.1}\n\
         log-loss residuals: RMS {:.4}, largest {:.4}",
        f.tokens_per_param, f.rms_log_residual, f.max_log_residual
    );
    if let Some(fr) = f.frontier {
        println!(
            "\napproach 1 ({} runs on the efficient frontier): N_opt = {:.3e} C^{:.3}, \
             D_opt = {:.3e} C^{:.3}",
            fr.runs,
            fr.params.coefficient,
            fr.params.exponent,
            fr.tokens.coefficient,
            fr.tokens.exponent
        );
    }
    if let Some(k) = f.kaplan {
        println!(
            "Kaplan: L(N) = ({:.3e} / N)^{:.4} over {} sizes, L(D) = ({:.3e} / D)^{:.4} over {} \
             budgets",
            k.params.scale,
            k.params.exponent,
            k.params.groups,
            k.tokens.scale,
            k.tokens.exponent,
            k.tokens.groups
        );
    }
    if !f.held_out.is_empty() {
        println!(
            "\nheld-out runs (not fitted):\n\n| params | tokens | compute / largest fitted | \
             observed loss | predicted loss | error |\n|---|---|---|---|---|---|"
        );
        for p in &f.held_out {
            println!(
                "| {:.3e} | {:.3e} | {:.2}x | {:.4} | {:.4} | {:+.2}% |",
                p.params,
                p.tokens,
                p.compute_ratio,
                p.observed,
                p.predicted,
                100.0 * p.relative_error
            );
        }
    }
    Ok(())
}

/// `ft scaling plan`: the compute-optimal size and tokens under a law.
pub fn plan(args: ScalingPlanArgs) -> anyhow::Result<()> {
    let law = match args.law.as_str() {
        "chinchilla" => CHINCHILLA,
        "epoch" => EPOCH,
        file => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                usage(
                    "--law",
                    "chinchilla, epoch or a JSON file of `ft scaling fit --json`",
                    format!("{file}: {e}"),
                )
            })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| UsageError(format!("--law {file}: {e}")))?;
            serde_json::from_value::<Law>(json.get("law").cloned().unwrap_or(json))
                .map_err(|e| UsageError(format!("--law {file}: not a fitted law: {e}")))?
        }
    };
    let positive = |flag: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(usage(flag, "a positive number", v))
        }
    };
    let a = match (args.compute, args.params, args.tokens) {
        (Some(c), _, _) => law.optimum(positive("--compute", c)?),
        (_, Some(n), _) => law.optimum_for_params(positive("--params", n)?),
        (_, _, Some(d)) => law.optimum_for_tokens(positive("--tokens", d)?),
        (None, None, None) => {
            return Err(usage(
                "--compute",
                "one of --compute, --params and --tokens",
                "none",
            ))
        }
    };
    let gpu_flops = positive("--gpu-flops", args.gpu_flops)?;
    let price = positive("--price-per-gpu-hour", args.price_per_gpu_hour)?;
    let served = match args.inference_tokens {
        Some(t) if t.is_finite() && t >= 0.0 => t,
        Some(t) => return Err(usage("--inference-tokens", "a number of tokens", t)),
        None => 0.0,
    };
    let mut rows = vec![("compute-optimal", a)];
    if args.inference_tokens.is_some() {
        let lean = law
            .optimum_with_inference(a.loss, served)
            .ok_or_else(|| UsageError(format!("the loss {} is below the law's E", a.loss)))?;
        rows.push(("least training + inference", lean));
    }
    println!(
        "| run | params | tokens | tokens/param | training FLOPs | inference FLOPs | GPU-hours | \
         cost | predicted loss |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r) in rows {
        let inference = 2.0 * r.params * served;
        let hours = (r.flops + inference) / gpu_flops / 3600.0;
        println!(
            "| {name} | {:.3e} | {:.3e} | {:.1} | {:.3e} | {:.3e} | {:.3e} | {:.3e} | {:.4} |",
            r.params,
            r.tokens,
            r.tokens / r.params,
            r.flops,
            inference,
            hours,
            hours * price,
            r.loss
        );
    }
    println!(
        "\nGPU-hours at {gpu_flops:.3e} FLOP/s a GPU, cost at {price} a GPU-hour; inference at 2N \
         FLOPs a token for {served:.3e} tokens."
    );
    Ok(())
}
