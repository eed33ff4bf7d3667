//! `ft scaling fit` and `ft scaling plan`.

use ft_trainer::scaling::fit::{self, Options};
use ft_trainer::scaling::{Law, CHINCHILLA, EPOCH};

use crate::args::{ScalingFitArgs, ScalingPlanArgs};
use crate::error::{usage, UsageError};

/// `ft scaling fit`: the law with its intervals, the tokens per parameter at the optimum and
/// the residuals, as a table or JSON. A bad file is a usage error.
pub fn fit(args: ScalingFitArgs) -> anyhow::Result<()> {
    let runs = fit::read_csv(&args.runs).map_err(|e| UsageError(e.to_string()))?;
    let options = Options {
        bootstrap: args.bootstrap,
        seed: args.seed,
        ..Options::default()
    };
    let f = fit::fit(&runs, options)
        .map_err(|e| UsageError(format!("{}: {e}", args.runs.display())))?;
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
    println!("| params | tokens | tokens/param | compute (FLOPs) | predicted loss |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.3e} | {:.3e} | {:.1} | {:.3e} | {:.4} |",
        a.params,
        a.tokens,
        a.tokens / a.params,
        a.flops,
        a.loss
    );
    Ok(())
}
