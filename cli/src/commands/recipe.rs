//! `ft recipe check` and `ft recipe show`.

use crate::args::RecipeArgs;
use crate::error::UsageError;
use ft_trainer::recipe::LoadedRecipe;

/// Reads a recipe; its errors are usage errors (exit code 2).
pub fn load(args: &RecipeArgs) -> anyhow::Result<LoadedRecipe> {
    LoadedRecipe::load(&args.recipe, &args.sets).map_err(|e| UsageError(e.0).into())
}

/// `ft recipe check`: prints `ok` or fails with the first error.
pub fn check(args: RecipeArgs) -> anyhow::Result<()> {
    load(&args)?;
    println!("{}: ok", args.recipe.display());
    Ok(())
}

/// `ft recipe show`: the effective recipe as TOML.
pub fn show(args: RecipeArgs) -> anyhow::Result<()> {
    print!("{}", load(&args)?.recipe.to_toml());
    Ok(())
}
