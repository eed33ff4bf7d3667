//! What `ft recipe check` checks beyond the recipe's own fields: what `ft train` reads before
//! its first step, short of loading weights. The data files must be there, not empty, and
//! every record well-formed; when the model is already here (no fetching), `lora.layers` and
//! `lora.r` must fit its shape (a fine-tune's; a distillation's student is built at train
//! time) and every example must go through its tokenizer and chat template.

use ft_model::pretrained::TextSide;

use crate::error::{At, Result};
use crate::recipe::LoadedRecipe;
use crate::run::setup::{check_lora_shape, read_sources, tokenize_data};

/// What a check could not cover, one line each (empty when it covered everything).
pub fn check(loaded: &LoadedRecipe) -> Result<Vec<String>> {
    let r = &loaded.recipe;
    let Some(path) = ft_model::source::resolve_local(&r.model.source) else {
        // No tokenizer to hand: the data is read and parsed only.
        read_sources(loaded)?;
        return Ok(vec![format!(
            "model.source {} is not fetched yet: lora.layers, lora.r and the examples' \
             tokens are checked when `ft train` fetches it",
            r.model.source
        )]);
    };
    let at = || format!("model.source {}", r.model.source);
    let text = TextSide::load(&path).at_with(at)?;
    let c = &text.config;
    // A distillation's adapters go on the student, whose shape is known once it is built.
    if r.distill.is_none() {
        check_lora_shape(r, c)?;
    }
    tokenize_data(
        loaded,
        &text.tokenizer,
        text.chat_template.as_ref(),
        c.max_position_embeddings,
    )?;
    Ok(Vec::new())
}
