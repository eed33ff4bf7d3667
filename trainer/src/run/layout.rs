//! The shapes of a run's micro-batches without running it (`ft recipe plan`): the data
//! tokenized with the model's text side alone (no weights) and laid out by the run's plan.

use ft_model::pretrained::TextSide;

use super::setup::tokenize_data;
use crate::error::{At, Result};
use crate::plan::{Layout, Plan};
use crate::recipe::LoadedRecipe;

/// The shapes of every training micro-batch the recipe's run draws and of its validation
/// batches, as the run on `model.device` pads them (`train.length_buckets`).
pub fn layout(loaded: &LoadedRecipe) -> Result<Layout> {
    let r = &loaded.recipe;
    let at = || format!("model.source {}", r.model.source);
    let path = ft_model::source::resolve(&r.model.source).at_with(at)?;
    let text = TextSide::load(&path).at_with(at)?;
    let data = tokenize_data(
        loaded,
        &text.tokenizer,
        text.chat_template.as_ref(),
        text.config.max_position_embeddings,
    )?;
    let pad = text.tokenizer.eos_ids.first().copied().unwrap_or(0);
    Ok(Plan::new(r, &data.train).layout(&data.train, &data.val, pad))
}
