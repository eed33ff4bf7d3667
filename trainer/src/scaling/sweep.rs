//! `ft scaling sweep SWEEP.toml`: models trained from scratch over a grid of sizes and token
//! budgets (or IsoFLOP profiles: for each compute budget, every size with the tokens that
//! budget buys it), each in its own `ft train` process, then `[[held_out]]` runs that the fit
//! leaves out to test its predictions. Each run's N, D, C and held-out loss go into
//! `runs.csv` as it finishes (the file `ft scaling fit` reads). A sweep started again skips
//! every finished run and resumes an unfinished one from its latest checkpoint.
//!
//! ```toml
//! out = "runs/scaling"             # relative to the current folder, as a recipe's output.dir
//! tokens = [16384, 32768, 65536]  # or flops = [1e12, 3e12]
//! lr_base_width = 64               # optional: train.lr at width 64, scaled as 1 / width
//!
//! [recipe]                         # what every run shares, as in a recipe file
//! model.source = "data/tokenizers/bytes"   # the tokenizer
//! data.train = "../data/text/kjv-train.jsonl"   # relative to this file
//!
//! [[size]]
//! name = "d64"
//! hidden_size = 64
//! num_hidden_layers = 2
//! num_attention_heads = 2
//! intermediate_size = 192
//!
//! [[held_out]]
//! name = "d192"
//! hidden_size = 192
//! num_hidden_layers = 4
//! num_attention_heads = 6
//! intermediate_size = 512
//! tokens = 196608
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ft_model::pretrained::TextSide;
use serde::Deserialize;

use super::count;
use crate::checkpoint;
use crate::error::{write_atomic, At, Result, TrainError};
use crate::recipe::{self, Architecture, LoadedRecipe, Recipe};
use crate::run::from_scratch::{self, PretrainSummary};
use crate::run::setup::source_path;

/// The most runs one sweep plans: each is a process of its own that trains a model.
pub const MAX_RUNS: usize = 1000;

/// A sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    out: Option<PathBuf>,
    recipe: toml::Table,
    #[serde(rename = "size", default)]
    sizes: Vec<Size>,
    #[serde(default)]
    tokens: Vec<usize>,
    #[serde(default)]
    flops: Vec<f64>,
    #[serde(default)]
    held_out: Vec<HeldOut>,
    /// When given, each run's learning rate is the recipe's `train.lr` times this width over
    /// the run's `hidden_size`: a 1 / width rule after muP (Yang et al. 2022, where Adam's best
    /// rate for hidden weights falls as 1 / width), applied here to every weight, so that one
    /// rate tuned at this width carries roughly to the other sizes.
    lr_base_width: Option<usize>,
}

/// A `[[size]]`: a named architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Size {
    name: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
}

/// A `[[held_out]]`: an architecture and its token budget, trained but never fitted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeldOut {
    name: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    tokens: usize,
}

impl Size {
    fn architecture(&self) -> Architecture {
        Architecture {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            intermediate_size: self.intermediate_size,
        }
    }
}

/// One run of a sweep: its effective recipe and whether the fit leaves it out.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// `SIZE-TOKENS`: its output folder under the sweep's `out`, and its row in `runs.csv`.
    pub name: String,
    /// The recipe its process trains (written as `out/NAME.toml`).
    pub recipe: Recipe,
    /// A `[[held_out]]` run.
    pub held_out: bool,
}

/// A sweep read and planned.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Where the runs, their recipes and logs, and `runs.csv` go.
    pub out: PathBuf,
    /// Every run in order: the grid, then the held-out runs.
    pub runs: Vec<PlannedRun>,
}

/// A finished run: a row of `runs.csv`.
#[derive(Debug, Clone)]
pub struct Row {
    /// The run's name.
    pub name: String,
    /// Whether the fit leaves it out.
    pub held_out: bool,
    /// What the run reported.
    pub summary: PretrainSummary,
}

/// Reads a sweep file and plans its runs; `out` replaces the file's `out`.
pub fn plan(path: &Path, out: Option<&Path>) -> Result<Sweep> {
    let file = path.display().to_string();
    let text = recipe::read_recipe(path)?;
    let sweep: SweepFile =
        toml::from_str(&text).map_err(|e| TrainError::Invalid(format!("{file}: {e}")))?;
    // Absolute, so that the runs' recipes, written elsewhere, name the same data.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let base_dir = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))
        .map_err(|e| TrainError::io(path, e))?;
    let Some(out) = out.map(Path::to_path_buf).or_else(|| sweep.out.clone()) else {
        return Err(TrainError::Invalid(format!(
            "{file}: out: expected the folder of the runs (or --out), got none"
        )));
    };
    let fail = |what: String| Err(TrainError::Invalid(format!("{file}: {what}")));
    if sweep.sizes.is_empty() {
        return fail("no [[size]]: a sweep needs at least one model size".into());
    }
    match (sweep.tokens.is_empty(), sweep.flops.is_empty()) {
        (true, true) => {
            return fail("tokens or flops: give the token budgets or the compute budgets".into())
        }
        (false, false) => return fail("tokens or flops: give one, not both".into()),
        _ => {}
    }
    let budgets = sweep.tokens.len().max(sweep.flops.len());
    let count = sweep
        .sizes
        .len()
        .saturating_mul(budgets)
        .saturating_add(sweep.held_out.len());
    if count > MAX_RUNS {
        return fail(format!(
            "{count} runs: a sweep trains at most {MAX_RUNS} (sizes x budgets, and the held-out \
             runs)"
        ));
    }
    if let Some(bad) = sweep.tokens.iter().find(|&&t| t == 0) {
        return fail(format!("tokens: expected positive budgets, got {bad}"));
    }
    if let Some(bad) = sweep.flops.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return fail(format!("flops: expected positive budgets, got {bad}"));
    }
    if sweep.lr_base_width == Some(0) {
        return fail("lr_base_width: expected a width of at least 1, got 0".into());
    }
    let recipe_text = toml::to_string(&sweep.recipe)
        .map_err(|e| TrainError::Invalid(format!("{file}: [recipe]: {e}")))?;
    let base = recipe::parse(&recipe_text, &[], &format!("{file} [recipe]"))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    if base.train.resume.is_some() {
        return fail(
            "recipe.train.resume: each run resumes from its own folder; leave it out".into(),
        );
    }
    let loaded = LoadedRecipe {
        recipe: base,
        base_dir,
    };

    let mut planned: Vec<(String, Architecture, usize, bool)> = Vec::new();
    if sweep.flops.is_empty() {
        for size in &sweep.sizes {
            for &tokens in &sweep.tokens {
                planned.push((
                    format!("{}-{tokens}", size.name),
                    size.architecture(),
                    tokens,
                    false,
                ));
            }
        }
    } else {
        // The tokens a compute budget buys each size: C / (6 N), N counted with the
        // vocabulary of the recipe's tokenizer.
        let source = &loaded.recipe.model.source;
        let text = ft_model::source::resolve(source)
            .and_then(|p| TextSide::load(&p))
            .at_with(|| format!("{file}: recipe.model.source {source}"))?;
        for &flops in &sweep.flops {
            for size in &sweep.sizes {
                let config = from_scratch::config(
                    &size.architecture(),
                    &text.config,
                    loaded.recipe.data.max_seq_len,
                );
                let n = count::params(&config).total as f64;
                let tokens = (flops / (6.0 * n)).round().max(1.0) as usize;
                planned.push((
                    format!("{}-c{flops:e}", size.name),
                    size.architecture(),
                    tokens,
                    false,
                ));
            }
        }
    }
    for h in &sweep.held_out {
        let size = Size {
            name: h.name.clone(),
            hidden_size: h.hidden_size,
            num_hidden_layers: h.num_hidden_layers,
            num_attention_heads: h.num_attention_heads,
            num_key_value_heads: h.num_key_value_heads,
            intermediate_size: h.intermediate_size,
        };
        planned.push((
            format!("{}-{}", h.name, h.tokens),
            size.architecture(),
            h.tokens,
            true,
        ));
    }

    let mut runs: Vec<PlannedRun> = Vec::new();
    for (name, arch, tokens, held_out) in planned {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            return fail(format!(
                "size name {name:?}: expected letters, digits, '-', '_', '.' or '+' (it names a \
                 folder)"
            ));
        }
        if runs.iter().any(|r| r.name == name) {
            return fail(format!(
                "two runs are named {name:?}: size names, and the budgets of a size, must differ"
            ));
        }
        let lr = sweep.lr_base_width.map_or(loaded.recipe.train.lr, |w| {
            loaded.recipe.train.lr * w as f64 / arch.hidden_size as f64
        });
        let recipe = run_recipe(&loaded, &arch, tokens, lr, &out.join(&name))
            .map_err(|e| TrainError::Invalid(format!("{file}: run {name}: {e}")))?;
        runs.push(PlannedRun {
            name,
            recipe,
            held_out,
        });
    }
    Ok(Sweep { out, runs })
}

/// The recipe of one run: the shared one with the architecture, the token budget, the
/// learning rate and the output folder set, and its data paths made absolute (the run's
/// recipe file lives elsewhere).
fn run_recipe(
    loaded: &LoadedRecipe,
    a: &Architecture,
    tokens: usize,
    lr: f64,
    dir: &Path,
) -> Result<Recipe> {
    let mut r = loaded.recipe.clone();
    r.train.lr = lr;
    let absolute = |p: &Path| source_path(loaded, p);
    r.data.train = r.data.train.as_deref().map(absolute);
    r.data.val = r.data.val.as_deref().map(absolute);
    for m in &mut r.data.mix {
        m.train = absolute(&m.train);
        m.val = m.val.as_deref().map(absolute);
    }
    let sets = [
        "model.init=\"random\"".to_string(),
        format!("model.hidden_size={}", a.hidden_size),
        format!("model.num_hidden_layers={}", a.num_hidden_layers),
        format!("model.num_attention_heads={}", a.num_attention_heads),
        format!("model.num_key_value_heads={}", a.num_key_value_heads),
        format!("model.intermediate_size={}", a.intermediate_size),
        format!("train.max_tokens={tokens}"),
        format!("output.dir={:?}", dir.display().to_string()),
    ];
    recipe::parse(&r.to_toml(), &sets, "the run's recipe")
        .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Runs every planned run not yet finished, each as `exe train OUT/NAME.toml` with its output
/// in `OUT/NAME.log` (resumed from its latest checkpoint when an earlier sweep left one),
/// rewriting `OUT/runs.csv` after each. Returns every row, in the sweep's order.
pub fn run(sweep: &Sweep, exe: &Path) -> Result<Vec<Row>> {
    std::fs::create_dir_all(&sweep.out)
        .map_err(|e| TrainError::io(&sweep.out, e))
        .at("out")?;
    check(sweep)?;
    let _lock = Lock::take(&sweep.out)?;
    let mut finished: Vec<Option<PretrainSummary>> =
        sweep.runs.iter().map(|r| finished(&sweep.out, r)).collect();
    let done = finished.iter().filter(|s| s.is_some()).count();
    if done > 0 {
        tracing::info!("{done} of {} runs already finished", sweep.runs.len());
    }
    let bar = indicatif::ProgressBar::new(sweep.runs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "run {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    // Every finished run is in runs.csv from the start, whichever run fails later.
    let csv = sweep.out.join("runs.csv");
    write_csv(&csv, &rows(sweep, &finished))?;
    for (i, planned) in sweep.runs.iter().enumerate() {
        if finished[i].is_some() {
            continue;
        }
        bar.set_message(planned.name.clone());
        finished[i] = Some(train(&sweep.out, planned, exe)?);
        bar.inc(1);
        write_csv(&csv, &rows(sweep, &finished))?;
    }
    bar.finish_and_clear();
    Ok(rows(sweep, &finished))
}

/// The finished runs' rows, in the sweep's order.
fn rows(sweep: &Sweep, finished: &[Option<PretrainSummary>]) -> Vec<Row> {
    sweep
        .runs
        .iter()
        .zip(finished)
        .filter_map(|(planned, summary)| {
            Some(Row {
                name: planned.name.clone(),
                held_out: planned.held_out,
                summary: summary.clone()?,
            })
        })
        .collect()
}

/// `OUT/.sweep.lock`, held while a sweep runs: two sweeps on one folder would train the same
/// run into it at once. It names the holder's process; a lock whose process is gone (a sweep
/// that was killed) is taken over.
struct Lock(PathBuf);

impl Lock {
    fn take(out: &Path) -> Result<Self> {
        let path = out.join(".sweep.lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    write!(file, "{}", std::process::id()).map_err(|e| TrainError::io(&path, e))?;
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
                    if alive {
                        return Err(TrainError::Invalid(format!(
                            "{}: another sweep (process {}) is running in this folder",
                            out.display(),
                            holder.trim()
                        )));
                    }
                    tracing::info!(
                        "taking over the lock of a sweep that is gone ({})",
                        path.display()
                    );
                    std::fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
                }
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        }
        Err(TrainError::Invalid(format!(
            "{}: could not take the sweep's lock",
            path.display()
        )))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Refuses a sweep whose run folders an earlier sweep filled from other recipes (the sweep
/// file was changed since): their summaries or checkpoints would otherwise stand for its runs.
pub fn check(sweep: &Sweep) -> Result<()> {
    sweep.runs.iter().try_for_each(same_recipe)
}

fn same_recipe(planned: &PlannedRun) -> Result<()> {
    let dir = &planned.recipe.output.dir;
    let path = dir.join("recipe.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut recorded = recipe::parse(&text, &[], &path.display().to_string())?;
    // A resumed run records where it resumed from; the folder is the run's, however named.
    recorded.train.resume = None;
    recorded.output.dir.clone_from(dir);
    if recorded != planned.recipe {
        return Err(TrainError::Invalid(format!(
            "run {}: {} was trained from another recipe than the sweep's now; remove that \
             folder to train the run again, or give the sweep another --out",
            planned.name,
            dir.display()
        )));
    }
    Ok(())
}

/// The summary of a run that finished (`summary.json` in its folder).
fn finished(out: &Path, run: &PlannedRun) -> Option<PretrainSummary> {
    let text = std::fs::read_to_string(out.join(&run.name).join("summary.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Trains one run in its own process.
fn train(out: &Path, planned: &PlannedRun, exe: &Path) -> Result<PretrainSummary> {
    let recipe_path = out.join(format!("{}.toml", planned.name));
    write_atomic(&recipe_path, planned.recipe.to_toml().as_bytes())?;
    let log_path = out.join(format!("{}.log", planned.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| TrainError::io(&log_path, e))?;
    let err_log = log.try_clone().map_err(|e| TrainError::io(&log_path, e))?;
    let dir = &planned.recipe.output.dir;
    let mut command = Command::new(exe);
    command.arg("train").arg(&recipe_path);
    if checkpoint::find(dir).is_ok() {
        tracing::info!("{}: resuming from its latest checkpoint", planned.name);
        command.arg("--resume").arg(dir);
    }
    let status = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .status()
        .map_err(|e| TrainError::io(exe, e))?;
    if !status.success() {
        return Err(TrainError::Run {
            name: planned.name.clone(),
            status: status.to_string(),
            log: log_path,
            usage: status.code() == Some(2),
        });
    }
    finished(out, planned).ok_or_else(|| {
        TrainError::Invalid(format!(
            "run {} finished without a summary.json in {}",
            planned.name,
            dir.display()
        ))
    })
}

/// Writes `runs.csv`: name, params, non_embedding_params, tokens, flops (counted), flops_6nd,
/// loss (held-out), held_out.
fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut text =
        String::from("name,params,non_embedding_params,tokens,flops,flops_6nd,loss,held_out\n");
    for r in rows {
        let s = &r.summary;
        text.push_str(&format!(
            "{},{},{},{},{:e},{:e},{},{}\n",
            r.name,
            s.params,
            s.non_embedding_params,
            s.tokens,
            s.flops,
            s.flops_6nd,
            s.val_loss,
            r.held_out
        ));
    }
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, tiny_model, write_hf_folder};

    use super::*;

    /// An IsoFLOP profile gives each size the tokens its compute budget buys (C = 6ND, N
    /// counted with the tokenizer's vocabulary), named by the budget; held-out runs come last.
    #[test]
    fn isoflop_profiles_give_each_size_the_tokens_its_budget_buys() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config();
        let model = tiny_model::<NdArray<f32>>(&config, 1);
        write_hf_folder(&model, &config, &dir.path().join("tok")).unwrap();
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"a b c\"}\n").unwrap();
        let size = |name: &str, d: usize| {
            format!(
                "name = \"{name}\"\nhidden_size = {d}\nnum_hidden_layers = 2\n\
                 num_attention_heads = 2\nintermediate_size = {}\n",
                3 * d
            )
        };
        let text = format!(
            "out = \"unused\"\nflops = [1e9, 4e9]\nlr_base_width = 16\n[recipe]\n\
             model.source = {:?}\ndata.train = \"train.jsonl\"\ndata.format = \"text\"\n\
             train.lr = 0.004\n[[size]]\n{}[[size]]\n{}[[held_out]]\n{}tokens = 777\n",
            dir.path().join("tok"),
            size("s", 16),
            size("m", 32),
            size("l", 64),
        );
        let path = dir.path().join("sweep.toml");
        std::fs::write(&path, text).unwrap();
        let sweep = plan(&path, Some(&dir.path().join("runs"))).unwrap();
        let names: Vec<&str> = sweep.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["s-c1e9", "m-c1e9", "s-c4e9", "m-c4e9", "l-777"]);
        for run in &sweep.runs[..4] {
            let r = &run.recipe;
            let a = r.model.architecture().unwrap();
            let c = from_scratch::config(&a, &config, r.data.max_seq_len);
            let n = count::params(&c).total as f64;
            let budget = if run.name.ends_with("c1e9") { 1e9 } else { 4e9 };
            let tokens = r.train.max_tokens.unwrap() as f64;
            assert!(
                (6.0 * n * tokens / budget - 1.0).abs() < 1e-3,
                "{}",
                run.name
            );
            assert!(!run.held_out);
            assert_eq!(r.train.lr, 0.004 * 16.0 / a.hidden_size as f64);
            assert!(r.data.train.as_ref().unwrap().is_absolute());
            assert_eq!(r.output.dir, dir.path().join("runs").join(&run.name));
        }
        let last = &sweep.runs[4];
        assert!(last.held_out);
        assert_eq!(last.recipe.train.max_tokens, Some(777));
    }
}
