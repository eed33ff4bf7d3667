//! Checkpoints of a run: `checkpoints/step-NNNNNN/` in the output folder holds the trained
//! weights (the PEFT adapter; a distilled student trained in full as an HF folder `student/`),
//! the optimizer moments (`optimizer.safetensors`) and `trainer_state.json`
//! (step, data position, scheduler and RNG inputs, the losses so far). A checkpoint is written
//! into a temporary folder and renamed into place, so a run killed mid-write leaves the
//! previous checkpoints intact and never a partial one; the two newest are kept.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use ft_adapters::PeftAdapter;
use ft_model::LlamaForCausalLM;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, At, Result, TrainError};
use crate::optim::AdamW;

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const KEEP: usize = 2;

/// What a distillation run measured before training and counts along the way, kept in its
/// checkpoints so that a resumed run reports the same figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DistillState {
    /// The teacher's validation cross-entropy.
    pub teacher_val_loss: f64,
    /// Per `eval_texts` file: the teacher's perplexity and the student's before training.
    pub texts_before: Vec<(f64, f64)>,
    /// On-policy steps so far.
    pub on_policy_steps: usize,
    /// Seconds spent building the offline teacher cache.
    pub cache_build_s: f64,
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken; also the scheduler's position and the dropout seed's input.
    pub step: usize,
    /// Data epoch of the next micro-batch.
    pub epoch: usize,
    /// Row index of the next micro-batch within its epoch.
    pub position: usize,
    /// Adam's t.
    pub optimizer_t: u64,
    /// Parameters whose moments are paged.
    pub paged: Vec<String>,
    /// Training loss of every step so far.
    pub losses: Vec<f64>,
    /// Latest validation loss.
    pub val_loss: f64,
    /// Validation loss before training.
    pub val_loss_before: f64,
    /// Exact match before training.
    pub exact_match_before: Option<f64>,
    /// Seconds of training steps so far.
    pub train_s: f64,
    /// Non-padding tokens trained on so far.
    pub train_tokens: usize,
    /// Distillation runs: what was measured before training, and on-policy steps so far.
    #[serde(default)]
    pub distill: Option<DistillState>,
}

/// The checkpoint to resume from: `dir` itself when it is one, else the newest in
/// `dir/checkpoints`.
pub fn find(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let list = dir.join("checkpoints");
    finished(&list).last().cloned().ok_or_else(|| {
        TrainError::Invalid(format!(
            "train.resume: {} holds no checkpoint",
            dir.display()
        ))
    })
}

/// Finished checkpoints in `list`, oldest first.
fn finished(list: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = match std::fs::read_dir(list) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                    && p.join(STATE_FILE).is_file()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort();
    found
}

/// Removes `out/checkpoints`; returns whether there was one.
pub fn clear(out: &Path) -> Result<bool> {
    let list = out.join("checkpoints");
    if !list.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&list).map_err(|e| TrainError::io(&list, e))?;
    Ok(true)
}

/// Writes a checkpoint of `step` atomically under `out/checkpoints`: `write_weights` puts the
/// trained weights into the folder it is given, then come the optimizer and the state.
pub fn save<B: Backend>(
    out: &Path,
    write_weights: impl FnOnce(&Path) -> Result<()>,
    optimizer: &AdamW<B>,
    state: &TrainerState,
) -> Result<()> {
    let list = out.join("checkpoints");
    std::fs::create_dir_all(&list).map_err(|e| TrainError::io(&list, e))?;
    let name = format!("step-{:06}", state.step);
    let tmp = list.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write_weights(&tmp)?;

    let moments = optimizer.export();
    let bytes: Vec<(String, [usize; 2], Vec<u8>)> = moments
        .iter()
        .flat_map(|(n, shape, m, v)| {
            [("exp_avg", m), ("exp_avg_sq", v)].map(|(kind, x)| {
                (
                    format!("{kind}.{n}"),
                    *shape,
                    x.iter().flat_map(|f| f.to_le_bytes()).collect(),
                )
            })
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, b)| TensorView::new(Dtype::F32, shape.to_vec(), b).map(|v| (k.clone(), v)))
        .collect::<Result<Vec<_>, _>>()?;
    write_atomic(
        &tmp.join(OPTIMIZER_FILE),
        &safetensors::serialize(views, None)?,
    )?;
    let mut state = state.clone();
    state.optimizer_t = optimizer.t;
    state.paged = optimizer.paged_names();
    write_atomic(&tmp.join(STATE_FILE), &serde_json::to_vec_pretty(&state)?)?;

    let dest = list.join(&name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    ft_adapters::atomic::sync_dir(&list).map_err(|e| TrainError::io(&list, e))?;
    let all = finished(&list);
    for old in all.iter().take(all.len().saturating_sub(KEEP)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Restores the adapter weights and optimizer moments of checkpoint `dir`; returns its state.
pub fn load<B: AutodiffBackend>(
    dir: &Path,
    model: &mut LlamaForCausalLM<B>,
    optimizer: &mut AdamW<B::InnerBackend>,
    device: &B::Device,
) -> Result<TrainerState> {
    let state = load_state(dir)?;
    load_adapters(dir, model, device)?;
    load_optimizer(dir, optimizer, &state, device)?;
    Ok(state)
}

/// The trainer state of checkpoint `dir`.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_slice(&bytes).at_with(|| format!("{}: not a trainer state", path.display()))
}

/// Puts the adapter weights of checkpoint `dir` into the model's adapters (same modules).
pub fn load_adapters<B: Backend>(
    dir: &Path,
    model: &mut LlamaForCausalLM<B>,
    device: &B::Device,
) -> Result<()> {
    let adapter = PeftAdapter::read(dir)?;
    let mut loras = model.loras_mut();
    if loras.len() != adapter.modules.len() {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint adapts {} modules, the recipe {}",
            dir.display(),
            adapter.modules.len(),
            loras.len()
        )));
    }
    let c = &adapter.config;
    let saved_scale = if c.use_rslora {
        c.lora_alpha / (c.r as f64).sqrt()
    } else {
        c.lora_alpha / c.r as f64
    };
    for (name, lora) in loras.iter_mut() {
        let w = adapter.modules.get(name.as_str()).ok_or_else(|| {
            TrainError::Invalid(format!("{}: no weights for {name}", dir.display()))
        })?;
        // A resumed run continues the same adapters: a changed rank, scaling or shape is the
        // recipe's fault, not something to load around.
        let (a, b) = (lora.lora_a.dims(), lora.lora_b.dims());
        if w.a.shape != a || w.b.shape != b {
            return Err(TrainError::usage(
                "lora.r",
                &format!(
                    "the checkpoint's rank to resume {} (its {name} has A {:?} and B {:?})",
                    dir.display(),
                    w.a.shape,
                    w.b.shape
                ),
                format!("a recipe whose adapters have A {a:?} and B {b:?}"),
            ));
        }
        if (saved_scale - lora.scale).abs() > 1e-9 * saved_scale.abs().max(1.0) {
            return Err(TrainError::usage(
                "lora.alpha",
                &format!(
                    "the checkpoint's scaling to resume {} (lora_alpha {} at r = {}{})",
                    dir.display(),
                    c.lora_alpha,
                    c.r,
                    if c.use_rslora { ", rsLoRA" } else { "" }
                ),
                format!("a recipe whose scaling is {}", lora.scale),
            ));
        }
        let t = |m: &ft_adapters::peft::Matrix| {
            Tensor::<B, 2>::from_data(
                TensorData::new(m.data.clone(), m.shape).convert::<B::FloatElem>(),
                device,
            )
        };
        lora.lora_a = Param::from_tensor(t(&w.a));
        lora.lora_b = Param::from_tensor(t(&w.b));
    }
    Ok(())
}

/// Restores the optimizer moments of checkpoint `dir`.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    optimizer: &mut AdamW<B>,
    state: &TrainerState,
    device: &B::Device,
) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).at(path.display())?;
    let mut moments = Vec::new();
    for name in st.names() {
        let Some(param) = name.strip_prefix("exp_avg.") else {
            continue;
        };
        let read = |key: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st
                .tensor(key)
                .at_with(|| format!("{}: {key}", path.display()))?;
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), v))
        };
        let (shape, m) = read(name)?;
        let (_, v) = read(&format!("exp_avg_sq.{param}"))?;
        if shape.len() != 2 {
            return Err(TrainError::Invalid(format!(
                "{}: {name} is not a matrix",
                path.display()
            )));
        }
        moments.push((param.to_string(), [shape[0], shape[1]], m, v));
    }
    optimizer.import(state.optimizer_t, moments, &state.paged, device);
    Ok(())
}
