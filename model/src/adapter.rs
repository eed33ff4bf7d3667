//! Applying PEFT LoRA adapters to a loaded model: each adapted module is found by its HF name
//! and its A/B shapes are checked against the base layer before anything is attached.

use std::path::Path;

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use ft_adapters::peft::{LoraWeights, Matrix, PeftAdapter, PeftConfig};
use ft_adapters::{AdapterError, Lora, LoraConfig};

use crate::error::ModelError;
use crate::forward::llama::{LlamaForCausalLM, LoraLinear};

impl<B: Backend> LlamaForCausalLM<B> {
    /// The block linear layers, mutable, with their HF names.
    fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            for (n, l) in layer.parts_mut().0 {
                out.push((format!("model.layers.{i}.{n}"), l));
            }
        }
        out
    }

    /// Attaches fresh adapters (PEFT init) to the modules named in `targets` (`q_proj`, ...,
    /// `down_proj`) of the chosen layers (all when `layers` is `None`), freezing their bases.
    /// Returns the adapted module names. An unknown target or layer is an error naming it.
    pub fn add_lora(
        &mut self,
        config: &LoraConfig,
        targets: &[String],
        layers: Option<&[usize]>,
    ) -> Result<Vec<String>, ModelError> {
        let n_layers = self.model.layers.len();
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(ModelError::Config(format!(
                    "lora target {t:?} is not a module of this model; expected one of {TARGETS:?}"
                )));
            }
        }
        if let Some(bad) = layers.and_then(|l| l.iter().find(|&&i| i >= n_layers)) {
            return Err(ModelError::Config(format!(
                "lora layer {bad} does not exist; the model has layers 0..{n_layers}"
            )));
        }
        let device = self.device();
        let mut adapted = Vec::new();
        for (name, layer) in self.linears_mut() {
            let (index, module) = split_name(&name);
            let chosen_layer = layers.is_none_or(|l| l.contains(&index));
            if chosen_layer && targets.iter().any(|t| t == module) {
                layer.attach_in_place(config.init(layer.base.shape(), &device));
                adapted.push(name);
            }
        }
        Ok(adapted)
    }

    /// The attached adapters with their module names, mutable (the optimizer updates them).
    pub fn loras_mut(&mut self) -> Vec<(String, &mut Lora<B>)> {
        self.linears_mut()
            .into_iter()
            .filter_map(|(name, l)| l.lora.as_mut().map(|lora| (name, lora)))
            .collect()
    }

    /// The PEFT config of the adapters attached with `lora`: the rank, the target modules and
    /// the layers come from the attached layers themselves (never from a recipe), so the file
    /// always describes its tensors; `layers_to_transform` is left out when every layer is
    /// adapted.
    pub fn peft_config(&self, lora: &LoraConfig, base_model: Option<String>) -> PeftConfig {
        let attached: Vec<(usize, String, usize)> = self
            .linears()
            .into_iter()
            .filter_map(|(name, l)| {
                let rank = l.lora.as_ref()?.lora_a.dims()[0];
                let (index, module) = split_name(&name);
                Some((index, module.to_string(), rank))
            })
            .collect();
        let mut targets: Vec<String> = attached.iter().map(|(_, m, _)| m.clone()).collect();
        targets.sort();
        targets.dedup();
        let mut layers: Vec<usize> = attached.iter().map(|&(i, _, _)| i).collect();
        layers.sort_unstable();
        layers.dedup();
        let every_layer = layers.len() == self.model.layers.len();
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: attached.first().map_or(lora.r, |&(_, _, rank)| rank),
            lora_alpha: lora.alpha,
            target_modules: targets,
            lora_dropout: lora.dropout,
            bias: "none".into(),
            use_rslora: lora.rslora,
            fan_in_fan_out: false,
            base_model_name_or_path: base_model,
            inference_mode: true,
            layers_to_transform: (!every_layer).then_some(layers),
        }
    }

    /// The attached adapters as a PEFT adapter (host f32 copies) with `config`.
    pub fn to_peft(&self, config: PeftConfig) -> PeftAdapter {
        let matrix = |t: Tensor<B, 2>| Matrix {
            shape: t.dims(),
            data: t
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap_or_default(),
        };
        let modules: BTreeMap<String, LoraWeights> = self
            .linears()
            .into_iter()
            .filter_map(|(name, l)| {
                let lora = l.lora.as_ref()?;
                let w = LoraWeights {
                    a: matrix(lora.lora_a.val()),
                    b: matrix(lora.lora_b.val()),
                };
                Some((name, w))
            })
            .collect();
        PeftAdapter { config, modules }
    }

    /// Folds every attached adapter into its base weight (packed bases become dense f32).
    pub fn merge_adapters(&mut self) {
        for (_, layer) in self.linears_mut() {
            layer.merge();
        }
    }

    /// Attaches the adapter read from `dir`; a module the base lacks, or a tensor whose shape
    /// does not fit its layer, is an error naming the tensor, and leaves the model unchanged.
    pub fn attach_adapter(&mut self, adapter: &PeftAdapter, dir: &Path) -> Result<(), ModelError> {
        let plan = self.plan_adapter(adapter, dir)?;
        let config = adapter.config.lora_config();
        let device = self.device();
        let mut layers = self.linears_mut();
        for (index, w) in plan {
            layers[index]
                .1
                .attach_in_place(lora_from(&config, w, &device));
        }
        Ok(())
    }

    /// Where each of `adapter`'s modules goes: its index in [`Self::linears`] (layer * 7 +
    /// module, in [`TARGETS`] order) with its weights, every shape checked against the base.
    pub(crate) fn plan_adapter<'a>(
        &self,
        adapter: &'a PeftAdapter,
        dir: &Path,
    ) -> Result<Vec<(usize, &'a LoraWeights)>, ModelError> {
        let mismatch = |what: String| {
            ModelError::Adapter(AdapterError::Mismatch {
                path: dir.to_path_buf(),
                what,
            })
        };
        let layers = self.linears();
        let config = &adapter.config;
        let config_path = dir.join(ft_adapters::peft::CONFIG_FILE);
        let bad_config = |what: String| {
            ModelError::Adapter(AdapterError::Mismatch {
                path: config_path.clone(),
                what,
            })
        };
        // PEFT's target_modules name modules by suffix (or "all-linear").
        for t in &config.target_modules {
            let known = t == "all-linear"
                || layers
                    .iter()
                    .any(|(name, _)| name == t || name.ends_with(&format!(".{t}")));
            if !known {
                return Err(bad_config(format!(
                    "target_modules names {t:?}, which the base model lacks; expected names \
                     such as {TARGETS:?}"
                )));
            }
        }
        let n_layers = self.model.layers.len();
        if let Some(bad) = config
            .layers_to_transform
            .iter()
            .flatten()
            .find(|&&i| i >= n_layers)
        {
            return Err(bad_config(format!(
                "layers_to_transform names layer {bad}; the base model has layers 0..{n_layers}"
            )));
        }
        let mut plan = Vec::with_capacity(adapter.modules.len());
        for (module, w) in &adapter.modules {
            let key = |half: &str| format!("base_model.model.{module}.{half}.weight");
            let index = layers
                .iter()
                .position(|(name, _)| name == module)
                .ok_or_else(|| {
                    mismatch(format!(
                        "{} targets {module}, which the base model lacks",
                        key("lora_A")
                    ))
                })?;
            let [n_out, n_in] = layers[index].1.base.shape();
            if w.a.shape[1] != n_in {
                return Err(mismatch(format!(
                    "{} has shape {:?}; the base layer takes {n_in} inputs",
                    key("lora_A"),
                    w.a.shape
                )));
            }
            if w.b.shape[0] != n_out {
                return Err(mismatch(format!(
                    "{} has shape {:?}; the base layer has {n_out} outputs",
                    key("lora_B"),
                    w.b.shape
                )));
            }
            plan.push((index, w));
        }
        Ok(plan)
    }
}

/// A LoRA layer on `device` from host weights.
fn lora_from<B: Backend>(config: &LoraConfig, w: &LoraWeights, device: &B::Device) -> Lora<B> {
    let tensor = |m: &Matrix| {
        Tensor::<B, 2>::from_data(
            TensorData::new(m.data.clone(), m.shape).convert::<B::FloatElem>(),
            device,
        )
    };
    config.with_weights(tensor(&w.a), tensor(&w.b))
}

/// The module names LoRA can target, as PEFT's `target_modules` spells them.
pub use ft_adapters::lora::TARGETS;

/// `model.layers.{i}.self_attn.q_proj` -> (i, "q_proj").
fn split_name(name: &str) -> (usize, &str) {
    let mut parts = name.split('.');
    let index = parts
        .nth(2)
        .and_then(|i| i.parse().ok())
        .unwrap_or(usize::MAX);
    (index, name.rsplit('.').next().unwrap_or(name))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use burn::backend::NdArray;
    use burn::tensor::{Int, Tolerance};
    use ft_adapters::peft::{LoraWeights, PeftConfig};

    use super::*;
    use crate::tiny::{tiny_config, write_hf_folder};
    use crate::Pretrained;

    type B = NdArray<f32>;

    fn matrix(shape: [usize; 2], seed: usize) -> Matrix {
        let data = (0..shape[0] * shape[1])
            .map(|i| (((i + seed) * 7919 % 97) as f32 - 48.0) * 0.002)
            .collect();
        Matrix { shape, data }
    }

    /// A rank-4 adapter on q_proj and down_proj of every layer of the tiny model.
    fn random_adapter() -> PeftAdapter {
        let c = tiny_config();
        let mut modules = BTreeMap::new();
        for i in 0..c.num_hidden_layers {
            modules.insert(
                format!("model.layers.{i}.self_attn.q_proj"),
                LoraWeights {
                    a: matrix([4, 32], i),
                    b: matrix([32, 4], i + 1),
                },
            );
            modules.insert(
                format!("model.layers.{i}.mlp.down_proj"),
                LoraWeights {
                    a: matrix([4, 48], i + 2),
                    b: matrix([32, 4], i + 3),
                },
            );
        }
        let config: PeftConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "down_proj"], "bias": "none"
        }))
        .unwrap();
        PeftAdapter { config, modules }
    }

    #[test]
    fn an_adapted_model_equals_the_merged_weights() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let base = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let adapter = random_adapter();
        // Merge by hand: W + (alpha / r) B A.
        let mut tensors = base.named_tensors();
        for (name, t) in tensors.iter_mut() {
            let Some(w) = name
                .strip_suffix(".weight")
                .and_then(|m| adapter.modules.get(m))
            else {
                continue;
            };
            let (r, n_in, n_out) = (4, w.a.shape[1], w.b.shape[0]);
            for o in 0..n_out {
                for i in 0..n_in {
                    let delta: f32 = (0..r)
                        .map(|k| w.b.data[o * r + k] * w.a.data[k * n_in + i])
                        .sum();
                    t.data[o * n_in + i] += 2.0 * delta;
                }
            }
        }
        let merged_dir = dir.path().join("merged");
        write_hf_folder(&base, &c, &merged_dir).unwrap();
        crate::formats::hf_export::write_safetensors(
            &merged_dir.join("model.safetensors"),
            &tensors,
        )
        .unwrap();
        let merged = Pretrained::<B>::load(&merged_dir, None, &Default::default()).unwrap();

        let mut adapted = base;
        adapted.attach_adapter(&adapter, dir.path()).unwrap();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![5i64, 80, 257, 33], [1, 4]),
            &Default::default(),
        );
        adapted
            .forward(ids.clone(), None)
            .into_data()
            .assert_approx_eq::<f32>(
                &merged.model.forward(ids, None).into_data(),
                Tolerance::absolute(1e-5),
            );
    }

    #[test]
    fn modules_the_base_lacks_and_misfit_shapes_name_the_tensor() {
        let c = tiny_config();
        let mut model = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let mut adapter = random_adapter();
        adapter.modules.insert(
            "model.layers.9.self_attn.q_proj".into(),
            LoraWeights {
                a: matrix([4, 32], 0),
                b: matrix([32, 4], 0),
            },
        );
        let err = model
            .attach_adapter(&adapter, Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight targets model.layers.9.self_attn.q_proj, which the base model lacks"), "{err}");
        assert!(
            model.linears().iter().all(|(_, l)| l.lora.is_none()),
            "nothing attached"
        );

        let mut adapter = random_adapter();
        adapter
            .modules
            .get_mut("model.layers.0.mlp.down_proj")
            .unwrap()
            .a = matrix([4, 32], 0);
        let err = model
            .attach_adapter(&adapter, Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.layers.0.mlp.down_proj.lora_A.weight has shape [4, 32]; the base layer takes 48 inputs"), "{err}");
    }

    #[test]
    fn unknown_target_modules_and_layers_past_the_model_are_refused() {
        let c = tiny_config();
        let mut model = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let mut adapter = random_adapter();
        adapter.config.target_modules.push("qkv_proj".into());
        let err = model
            .attach_adapter(&adapter, Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("target_modules names \"qkv_proj\""), "{err}");
        let mut adapter = random_adapter();
        adapter.config.layers_to_transform = Some(vec![0, 40]);
        let err = model
            .attach_adapter(&adapter, Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers_to_transform names layer 40"), "{err}");
        assert!(model.linears().iter().all(|(_, l)| l.lora.is_none()));
    }
}
