//! `ft cascade fit` and `ft cascade eval`: a cascade's stages answer a task's development
//! split, the fit writes the stages and thresholds of highest accuracy within the budget, and
//! the evaluation draws held-out accuracy against cost at every budget.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ft_adapters::registry::parse_ref;
use ft_eval::cascade::collect::{collect, StageOutcomes, TOP_LOGPROBS};
use ft_eval::cascade::config::{Cascade, StageDecoding};
use ft_eval::cascade::{dev_split, plan};
use ft_eval::measure::Decoding;
use ft_eval::prompting::{self, few_shot};
use ft_eval::task::{self, EvalTask};
use ft_model::source::DEFAULT_MODEL;
use ft_model::QuantBackend;
use ft_serve::cascade as served;
use ft_serve::server::registry_adapter;

use crate::args::{BaseModelArgs, CascadeEvalArgs, CascadeFitArgs, CascadeModelArgs};
use crate::commands::eval::{cli_error, stored_as, task_error};
use crate::device::{dispatch, Job};
use crate::error::{usage, UsageError};

/// The task `spec` names, its errors as usage errors.
fn resolve_task(spec: &str, dirs: &[PathBuf]) -> anyhow::Result<EvalTask> {
    task::resolve(spec, dirs).map_err(|e| task_error("--task", e))
}

/// How `ft cascade eval` finds the task again: its name, or a task file's absolute path.
fn task_spec(spec: &str) -> String {
    let path = Path::new(spec);
    match path.extension().is_some_and(|x| x == "toml") {
        true => std::fs::canonicalize(path)
            .map_or_else(|_| spec.to_string(), |p| p.display().to_string()),
        false => spec.to_string(),
    }
}

/// Checks each stage's storage and few-shot examples against `task` before any stage runs,
/// an error naming the file and the stage.
fn check_stages(
    cascade: &Cascade,
    file: &Path,
    task: &EvalTask,
    model: &str,
    common: &CascadeModelArgs,
) -> anyhow::Result<()> {
    for s in &cascade.stages {
        let at = |field: &str, e: &dyn std::fmt::Display| {
            UsageError(format!(
                "{}: stage {}: {field}: {e}",
                file.display(),
                s.name
            ))
        };
        if let Some(q) = &s.quant {
            stored_as(model, common.device, q, "quant").map_err(|e| at("quant", &e))?;
        }
        few_shot(task, s.shots).map_err(|e| at("shots", &e))?;
        s.api_key()
            .map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    }
    Ok(())
}

/// Each stage's adapter folder: a PEFT folder as given, else a registry reference.
fn adapter_dirs(
    cascade: &Cascade,
    file: &Path,
    registry: Option<&Path>,
) -> anyhow::Result<Vec<Option<PathBuf>>> {
    cascade
        .stages
        .iter()
        .map(|s| {
            let Some(spec) = &s.adapter else {
                return Ok(None);
            };
            let bad = |why: String| UsageError(format!("{}: stage {}: adapter: {why}", file.display(), s.name));
            let dir = PathBuf::from(spec);
            if dir.join("adapter_config.json").is_file() {
                return Ok(Some(dir));
            }
            let Some(root) = registry else {
                return Err(bad(format!(
                    "{spec} is neither a PEFT adapter folder nor, without --registry, a registry name"
                ))
                .into());
            };
            parse_ref(spec).map_err(|e| bad(e.to_string()))?;
            registry_adapter(root, spec)
                .map(Some)
                .map_err(|e| bad(e.to_string()).into())
        })
        .collect()
}

/// Checks the flags every cascade command shares against `cascade`.
fn check_prices(cascade: &Cascade, file: &Path, common: &CascadeModelArgs) -> anyhow::Result<()> {
    if let Some(p) = common
        .price_per_hour
        .filter(|p| !(p.is_finite() && *p >= 0.0))
    {
        return Err(usage("--price-per-hour", "a price of 0 or more", p));
    }
    if common.price_per_hour.is_none() {
        if let Some(s) = cascade.stages.iter().find(|s| s.price.is_none()) {
            return Err(UsageError(format!(
                "{}: stage {} has no price: give it `price = {{ input = .., output = .. }}` \
                 (USD per 1M tokens) or pass --price-per-hour to price its machine time",
                file.display(),
                s.name
            ))
            .into());
        }
    }
    Ok(())
}

/// What `ft serve` needs to serve a cascade beside its base model.
pub(crate) struct ServeContext<'a> {
    /// The base as the server loads it (model and storage).
    pub base: &'a BaseModelArgs,
    /// The base's name in requests.
    pub model_id: &'a str,
    /// The adapter registry, for stages naming a registry adapter.
    pub registry: Option<&'a Path>,
    /// USD per hour, for stages without a price.
    pub price_per_hour: Option<f64>,
}

/// `ft serve --cascade NAME=FILE`: the fitted cascade's chain as the server runs it, and the
/// adapters its stages need registered (name and folder). Each stage on this server must use
/// the storage the server holds; one on another storage is served there and named by `url`.
pub(crate) fn served(
    spec: &str,
    ctx: &ServeContext<'_>,
) -> anyhow::Result<(served::Cascade, Vec<(String, PathBuf)>)> {
    let flag = format!("--cascade {spec}");
    let (name, file) = spec
        .split_once('=')
        .ok_or_else(|| UsageError(format!("{flag}: expected NAME=FILE")))?;
    ft_adapters::registry::validate_name(name).map_err(|e| UsageError(format!("{flag}: {e}")))?;
    if name == ctx.model_id {
        return Err(UsageError(format!("{flag}: {name:?} is the base model's name")).into());
    }
    let file = Path::new(file);
    let cascade = Cascade::read(file).map_err(cli_error)?;
    let Some(fit) = &cascade.fit else {
        return Err(UsageError(format!(
            "{}: not fitted: run `ft cascade fit` first",
            file.display()
        ))
        .into());
    };
    let at = |stage: &str, e: &dyn std::fmt::Display| {
        UsageError(format!("{}: stage {stage}: {e}", file.display()))
    };
    if fit.model != ctx.base.model {
        tracing::warn!(
            cascade = %file.display(), fitted = %fit.model, serving = %ctx.base.model,
            "the cascade was fitted with another base model: its scorers may not hold"
        );
    }
    let adapters = adapter_dirs(&cascade, file, ctx.registry)?;
    let storage = |b: &BaseModelArgs| (b.weights, b.quant, b.double_quant);
    let mut stages = Vec::new();
    let mut register = Vec::new();
    let mut task = None;
    for (l, stage_name) in fit.chain.iter().enumerate() {
        let i = cascade
            .stages
            .iter()
            .position(|s| &s.name == stage_name)
            .ok_or_else(|| at(stage_name, &"not in the file: fit again"))?;
        let s = &cascade.stages[i];
        let target = match (&s.url, &s.model) {
            (Some(url), Some(model)) => served::Target::Remote {
                url: url.clone(),
                model: model.clone(),
                api_key: s
                    .api_key()
                    .map_err(|e| UsageError(format!("{}: {e}", file.display())))?,
            },
            _ => {
                let wanted = match &s.quant {
                    Some(q) => stored_as(&ctx.base.model, ctx.base.device, q, "quant")
                        .map_err(|e| at(&s.name, &e))?,
                    None => BaseModelArgs {
                        model: ctx.base.model.clone(),
                        device: ctx.base.device,
                        quant: None,
                        weights: None,
                        double_quant: false,
                    },
                };
                if storage(&wanted) != storage(ctx.base) {
                    return Err(at(
                        &s.name,
                        &format!(
                            "quant: it runs on the base stored as {}, and this server holds                              another storage: serve it with that storage, or serve the stage                              elsewhere and give it `url` and `model`",
                            s.quant.as_deref().unwrap_or("the default")
                        ),
                    )
                    .into());
                }
                let model = match adapters.get(i).cloned().flatten() {
                    Some(dir) => {
                        let adapter = format!("{name}-{}", s.name);
                        ft_adapters::registry::validate_name(&adapter).map_err(|e| {
                            at(&s.name, &format!("name: as an adapter {adapter:?}: {e}"))
                        })?;
                        register.push((adapter.clone(), dir));
                        adapter
                    }
                    None => ctx.model_id.to_string(),
                };
                served::Target::Local { model }
            }
        };
        let context = if s.shots == 0 {
            String::new()
        } else {
            if task.is_none() {
                task = Some(
                    task::resolve(&fit.task, &[])
                        .map_err(|e| UsageError(format!("{}: fit: task: {e}", file.display())))?,
                );
            }
            let task = task.as_ref().ok_or_else(|| anyhow::anyhow!("no task"))?;
            prompting::context(task, s.shots).map_err(|e| at(&s.name, &format!("shots: {e}")))?
        };
        let (decoding, samples) = match s.decoding {
            StageDecoding::One(d) => (d, 1),
            StageDecoding::SelfConsistency(n) => (Decoding::Sample, n),
        };
        let fields = decoding.fields(0).as_object().cloned().unwrap_or_default();
        let last = l + 1 == fit.chain.len();
        let accept = match (last, &s.scorer, s.threshold) {
            (true, _, _) => None,
            (false, Some(scorer), Some(threshold)) => Some((scorer.clone(), threshold)),
            _ => return Err(at(&s.name, &"no scorer or threshold: fit again").into()),
        };
        let price = match (s.price, ctx.price_per_hour) {
            (Some(p), _) => served::Price::PerToken {
                input: p.input,
                output: p.output,
            },
            (None, Some(h)) if h.is_finite() && h >= 0.0 => served::Price::PerHour(h),
            (None, Some(h)) => return Err(usage("--price-per-hour", "a price of 0 or more", h)),
            (None, None) => {
                return Err(at(
                    &s.name,
                    &"price: none in the file: pass --price-per-hour to price its time",
                )
                .into())
            }
        };
        stages.push(served::Stage {
            name: s.name.clone(),
            target,
            context,
            fields,
            samples,
            logprobs: (!matches!(decoding, Decoding::Beam(_))).then_some(TOP_LOGPROBS),
            accept,
            price,
        });
    }
    Ok((
        served::Cascade {
            name: name.to_string(),
            stages,
        },
        register,
    ))
}

/// Where `ft cascade fit` leaves the development answers of the cascade it writes to `out`.
fn dev_file(out: &Path) -> PathBuf {
    out.with_extension("dev.json")
}

/// The stages' answers to `task`, each stage's base loaded in its storage.
struct Collect {
    cascade: Cascade,
    adapters: Vec<Option<PathBuf>>,
    task: EvalTask,
    model: String,
    common: CascadeModelArgs,
}

impl Job for Collect {
    type Output = Vec<StageOutcomes>;

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let (model, device_spec) = (self.model.clone(), self.common.device);
        let load = |quant: Option<&str>| -> anyhow::Result<_> {
            let base = match quant {
                Some(q) => stored_as(&model, device_spec, q, "stage quant")?,
                None => BaseModelArgs {
                    model: model.clone(),
                    device: device_spec,
                    quant: None,
                    weights: None,
                    double_quant: false,
                },
            };
            base.load::<B>(&device)
        };
        collect(
            &self.cascade,
            &self.adapters,
            &self.task,
            self.common.price_per_hour,
            Duration::from_secs(self.common.timeout),
            |q| {
                load(q)
                    .map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(format!("{e:#}")))
            },
            |s| {
                eprintln!(
                    "ft cascade: {} on {} examples: accuracy {:.3}, {:.4} USD / 1k requests",
                    s.stage,
                    s.outcomes.len(),
                    s.accuracy(),
                    s.mean_cost() * 1e3
                )
            },
        )
        .map_err(cli_error)
    }
}

/// Every stage's answers to `task`'s examples with the base `model` on `common.device`.
fn answers(
    cascade: &Cascade,
    file: &Path,
    task: EvalTask,
    model: String,
    common: CascadeModelArgs,
) -> anyhow::Result<Vec<StageOutcomes>> {
    let adapters = adapter_dirs(cascade, file, common.registry.as_deref())?;
    dispatch(
        common.device,
        Collect {
            cascade: cascade.clone(),
            adapters,
            task,
            model,
            common,
        },
    )
}

/// Runs `ft cascade fit`.
pub fn fit(args: CascadeFitArgs) -> anyhow::Result<()> {
    let cascade = Cascade::read(&args.cascade).map_err(cli_error)?;
    check_prices(&cascade, &args.cascade, &args.common)?;
    let budget = parse_budget(&args.budget)?;
    let task = resolve_task(&args.task, &args.common.task_dirs)?;
    let dev = dev_split(&task, args.dev_size as usize).map_err(cli_error)?;
    let model = args
        .common
        .model
        .clone()
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    check_stages(&cascade, &args.cascade, &dev, &model, &args.common)?;
    let outcomes = answers(&cascade, &args.cascade, dev, model.clone(), args.common)?;
    // Written first: a budget the stages cannot meet leaves the answers to fit again with.
    let dev_path = dev_file(&args.out);
    ft_adapters::atomic::write_atomic(&dev_path, serde_json::to_string(&outcomes)?.as_bytes())
        .with_context(|| format!("writing {}", dev_path.display()))?;
    let budget = match budget {
        Budget::PerK(usd) => usd / 1e3,
        Budget::ShareOfBest(share) => {
            let best = outcomes
                .iter()
                .min_by(|a, b| {
                    b.accuracy()
                        .total_cmp(&a.accuracy())
                        .then(a.mean_cost().total_cmp(&b.mean_cost()))
                })
                .map_or(0.0, StageOutcomes::mean_cost);
            best * share
        }
    };
    let fitted = plan::fit(&cascade, &model, &task_spec(&args.task), &outcomes, budget)
        .map_err(cli_error)?;
    fitted.write(&args.out).map_err(cli_error)?;
    if let Some(f) = &fitted.fit {
        println!(
            "fitted {} on {} development examples of {}: {} at {:.4} USD / 1k requests \
             (budget {:.4}), accuracy {:.3}",
            args.cascade.display(),
            f.dev_examples,
            f.task,
            f.chain.join(" > "),
            f.dev_cost_per_k,
            f.budget_per_k,
            f.dev_accuracy
        );
    }
    eprintln!(
        "ft cascade: wrote {} and {}",
        args.out.display(),
        dev_path.display()
    );
    Ok(())
}

/// Runs `ft cascade eval`.
pub fn eval(args: CascadeEvalArgs) -> anyhow::Result<()> {
    let cascade = Cascade::read(&args.cascade).map_err(cli_error)?;
    let Some(fit) = cascade.fit.clone() else {
        return Err(UsageError(format!(
            "{}: not fitted: run `ft cascade fit` first",
            args.cascade.display()
        ))
        .into());
    };
    check_prices(&cascade, &args.cascade, &args.common)?;
    if let Some(b) = args.budgets.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        return Err(usage(
            "--budgets",
            "USD per 1,000 requests, each above 0",
            b,
        ));
    }
    let dev_path = dev_file(&args.cascade);
    let dev: Vec<StageOutcomes> = serde_json::from_str(
        &std::fs::read_to_string(&dev_path)
            .with_context(|| format!("{} (written by `ft cascade fit`)", dev_path.display()))?,
    )
    .with_context(|| format!("{}", dev_path.display()))?;
    let answered: Vec<&str> = dev.iter().map(|s| s.stage.as_str()).collect();
    let stages: Vec<&str> = cascade.stages.iter().map(|s| s.name.as_str()).collect();
    if answered != stages {
        return Err(UsageError(format!(
            "{}: answers of the stages {}, the cascade's are {}: fit it again",
            dev_path.display(),
            answered.join(", "),
            stages.join(", ")
        ))
        .into());
    }
    let mut task = resolve_task(&fit.task, &args.common.task_dirs)?;
    if let Some(n) = args.limit {
        task.items.truncate(n as usize);
    }
    let model = args
        .common
        .model
        .clone()
        .unwrap_or_else(|| fit.model.clone());
    check_stages(&cascade, &args.cascade, &task, &model, &args.common)?;
    let test = answers(&cascade, &args.cascade, task, model, args.common)?;
    let budgets = if args.budgets.is_empty() {
        plan::budgets(&dev)
    } else {
        args.budgets.iter().map(|b| b / 1e3).collect()
    };
    let curve = plan::curve(&cascade, &fit, &dev, &test, &budgets);
    let files = curve.write(&args.out).map_err(cli_error)?;
    print!("{}", curve.markdown());
    eprintln!(
        "ft cascade: wrote {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// A `--budget`: USD per 1,000 requests, or a share of the most accurate stage's cost.
enum Budget {
    PerK(f64),
    ShareOfBest(f64),
}

fn parse_budget(s: &str) -> anyhow::Result<Budget> {
    let bad = || {
        usage(
            "--budget",
            "USD per 1,000 requests (above 0), or N% (above 0)",
            s,
        )
    };
    match s.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| p.is_finite() && *p > 0.0)
            .map(|p| Budget::ShareOfBest(p / 100.0))
            .ok_or_else(bad),
        None => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| p.is_finite() && *p > 0.0)
            .map(Budget::PerK)
            .ok_or_else(bad),
    }
}
