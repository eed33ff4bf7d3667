//! `ft train RECIPE`: runs the training loop on the recipe's device.

use burn::backend::Autodiff;
use ft_model::QuantBackend;

use crate::args::{RecipeArgs, TrainArgs};
use crate::device::{dispatch, DeviceSpec, Job};
use crate::error::usage;
use ft_trainer::recipe::{LoadedRecipe, ModelInit};

/// Runs `ft train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut loaded = super::recipe::load(&RecipeArgs {
        recipe: args.recipe.clone(),
        sets: args.sets.clone(),
    })?;
    if let Some(dir) = args.resume {
        loaded.recipe.train.resume = Some(dir);
    }
    if let Some(device) = args.device {
        loaded.recipe.model.device = device.to_string();
    }
    let device: DeviceSpec = loaded
        .recipe
        .model
        .device
        .parse()
        .map_err(|e: String| usage("model.device", "cpu, cuda or cuda:N", e))?;
    let out = loaded.recipe.output.dir.clone();
    let (distill, scratch) = (
        loaded.recipe.distill.is_some(),
        loaded.recipe.model.init == ModelInit::Random,
    );
    let summary = dispatch(device, TrainJob(loaded))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if distill {
        println!("distillation run written to {}", out.display());
    } else if scratch {
        println!("model written to {}", out.join("model").display());
    } else {
        println!("adapter written to {}", out.display());
    }
    Ok(())
}

struct TrainJob(LoadedRecipe);

impl Job for TrainJob {
    /// The run's summary as JSON (a training or a distillation summary).
    type Output = serde_json::Value;

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        Ok(if self.0.recipe.model.init == ModelInit::Random {
            serde_json::to_value(ft_trainer::run::pretrain::<Autodiff<B>>(&self.0, &device)?)?
        } else if self.0.recipe.distill.is_some() {
            serde_json::to_value(ft_trainer::run::distill::<Autodiff<B>>(&self.0, &device)?)?
        } else {
            serde_json::to_value(ft_trainer::run::train::<Autodiff<B>>(&self.0, &device)?.summary)?
        })
    }
}
