//! `ft recipe check`, `ft recipe show`, `ft recipe plan` and `ft recipe export`.

use std::collections::BTreeMap;

use crate::args::{ExportArgs, PlanArgs, RecipeArgs};
use crate::device::DeviceSpec;
use crate::error::{usage, UsageError};
use ft_trainer::plan::Layout;
use ft_trainer::recipe::LoadedRecipe;

/// Reads a recipe; its errors are usage errors (exit code 2).
pub fn load(args: &RecipeArgs) -> anyhow::Result<LoadedRecipe> {
    LoadedRecipe::load(&args.recipe, &args.sets).map_err(|e| UsageError(e.0).into())
}

/// `ft recipe check`: prints `ok` (and what it could not check) or fails with the first
/// error; every failure is a usage error (exit 2), the recipe and its data being the input.
pub fn check(args: RecipeArgs) -> anyhow::Result<()> {
    let loaded = load(&args)?;
    let unchecked = ft_trainer::run::check(&loaded).map_err(|e| UsageError(e.to_string()))?;
    for line in unchecked {
        eprintln!("note: {line}");
    }
    println!("{}: ok", args.recipe.display());
    Ok(())
}

/// `ft recipe show`: the effective recipe as TOML.
pub fn show(args: RecipeArgs) -> anyhow::Result<()> {
    print!("{}", load(&args)?.recipe.to_toml());
    Ok(())
}

/// `ft recipe export`: the recipe as another trainer's config and data files; prints what
/// it wrote and what did not translate. A distillation recipe is a usage error.
pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let loaded = load(&args.recipe)?;
    let exported = ft_trainer::export::export(&loaded, args.to)?;
    let out = args.out.unwrap_or_else(|| {
        let stem = args.recipe.recipe.file_stem().unwrap_or_default();
        std::path::PathBuf::from(format!("{}.{}", stem.to_string_lossy(), args.to))
    });
    exported.write(&out)?;
    for (file, _) in &exported.files {
        println!("wrote {}", out.join(file).display());
    }
    println!("\nnot translated:");
    for line in &exported.untranslated {
        println!("- {line}");
    }
    Ok(())
}

/// `ft recipe plan`: the shapes of the run's micro-batches.
pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let mut loaded = load(&args.recipe)?;
    if let Some(device) = args.device {
        loaded.recipe.model.device = device.to_string();
    }
    let _: DeviceSpec = loaded
        .recipe
        .model
        .device
        .parse()
        .map_err(|e: String| usage("model.device", "cpu, cuda or cuda:N", e))?;
    let layout = ft_trainer::run::layout(&loaded)?;
    print!("{}", render(&layout));
    Ok(())
}

/// The plan as a table: the buckets, each half's batches, tokens and padding, then every
/// shape with its batches in each half.
fn render(l: &Layout) -> String {
    let buckets = if l.length_buckets.is_empty() {
        "none (each micro-batch is padded to its longest row)".to_string()
    } else {
        let lengths: Vec<String> = l.length_buckets.iter().map(usize::to_string).collect();
        lengths.join(" ")
    };
    let mut out = format!("length buckets: {buckets}\nsteps: {}\n\n", l.steps);
    out += &format!(
        "{:<12}{:>9}{:>8}{:>10}{:>10}\n",
        "", "batches", "shapes", "tokens", "padding"
    );
    for (name, s) in [("train", &l.train), ("validation", &l.validation)] {
        let slots = (s.tokens + s.padding).max(1) as f64;
        out += &format!(
            "{name:<12}{:>9}{:>8}{:>10}{:>9.1}%\n",
            s.batches,
            s.shapes.len(),
            s.tokens,
            100.0 * s.padding as f64 / slots
        );
    }
    let mut shapes: BTreeMap<[usize; 2], [usize; 2]> = BTreeMap::new();
    for (half, s) in [&l.train, &l.validation].into_iter().enumerate() {
        for c in &s.shapes {
            shapes.entry(c.shape).or_default()[half] += c.batches;
        }
    }
    out += &format!("\ndistinct shapes: {}\n", shapes.len());
    out += &format!("{:<12}{:>9}{:>12}\n", "[b, s]", "train", "validation");
    for ([b, s], [train, val]) in shapes {
        out += &format!("{:<12}{train:>9}{val:>12}\n", format!("[{b}, {s}]"));
    }
    out
}
