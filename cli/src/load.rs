//! Loading what the flags name: the flags of [`crate::args`] are plain values, and this is
//! where they meet the file system (model sources resolved, checkpoints read, adapters
//! attached).

use std::path::Path;

use burn::tensor::backend::Backend;
use ft_model::{Pretrained, QuantFormat, QuantSpec};

use crate::args::{BaseModelArgs, ModelArgs};

impl ModelArgs {
    /// Loads the model as these flags say, with the adapter attached if one is given.
    pub fn load<B: Backend>(&self, device: &B::Device) -> anyhow::Result<Pretrained<B>> {
        let mut p = self.base.load::<B>(device)?;
        if let Some(dir) = &self.adapter {
            p.attach_adapter(dir)?;
        }
        Ok(p)
    }
}

impl BaseModelArgs {
    /// Loads the base model as these flags say.
    pub fn load<B: Backend>(&self, device: &B::Device) -> anyhow::Result<Pretrained<B>> {
        let path = ft_model::source::resolve(&self.model)?;
        let quant = self.storage_for(&path)?;
        let mut p = Pretrained::<B>::load(&path, quant, device)?;
        // bf16 inference weights read the head through the bf16 kernel too.
        if self.quant.is_none() && quant.is_some_and(|q| q.format == QuantFormat::Bf16) {
            p.model.pack_head(QuantFormat::Bf16);
        }
        Ok(p)
    }

    /// The storage of the block linears for the checkpoint at `path`: what the flags ask,
    /// else the default inference weights for it.
    pub fn storage_for(&self, path: &Path) -> anyhow::Result<Option<QuantSpec>> {
        if let Some(q) = self.quant() {
            return Ok(Some(q));
        }
        let default = ft_model::pretrained::default_inference_format(path)?;
        Ok(default.map(|format| QuantSpec {
            format,
            double_quant: false,
        }))
    }
}
