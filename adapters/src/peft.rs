//! The Hugging Face PEFT LoRA format: a folder with `adapter_config.json` and
//! `adapter_model.safetensors`, whose keys are
//! `base_model.model.{module}.lora_A[.{adapter name}].weight` ([r, in]) and `...lora_B...`
//! ([out, r]) in f32, f16 or bf16. The only renames between PEFT and ft are that prefix and the
//! `lora_A`/`lora_B` spelling, kept in this file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use ft_quant::GgmlType;

use crate::lora::LoraConfig;
use crate::AdapterError;

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The largest adapter config read (a config is a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The largest adapter weights file read.
pub const MAX_WEIGHTS_BYTES: u64 = 16 << 30;

/// The largest rank read.
const MAX_RANK: usize = 65_536;

/// The two files of the PEFT folder `dir` as bytes, each read as [`PeftAdapter::read`] reads
/// it (regular files, bounded sizes), without parsing: (config, weights).
pub fn read_files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), AdapterError> {
    Ok((
        read_bounded(&dir.join(CONFIG_FILE), MAX_CONFIG_BYTES)?,
        read_bounded(&dir.join(WEIGHTS_FILE), MAX_WEIGHTS_BYTES)?,
    ))
}

/// The bytes of `path`, which must be a regular file (not a FIFO, which would block, nor a
/// device such as `/dev/zero`, which never ends) of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, AdapterError> {
    let meta = std::fs::metadata(path).map_err(|e| AdapterError::io(path, e))?;
    if !meta.is_file() {
        return Err(fault(path, "is not a regular file"));
    }
    if meta.len() > limit {
        return Err(fault(
            path,
            format!(
                "is {} bytes, more than the {limit} an adapter may have",
                meta.len()
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| AdapterError::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, limit + 1), &mut bytes)
        .map_err(|e| AdapterError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(fault(
            path,
            format!("is more than the {limit} bytes an adapter may have"),
        ));
    }
    Ok(bytes)
}
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// `adapter_config.json`: the fields ft reads and writes (others are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Must be `"LORA"`.
    pub peft_type: String,
    /// `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Module names the adapter targets (`q_proj`, ...).
    #[serde(default, deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Bias handling; ft supports `"none"`.
    #[serde(default = "none")]
    pub bias: String,
    /// alpha / sqrt(r) scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Conv1D-style transposed base weights (PEFT forces false for `nn.Linear`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The base model, as a source string or hub id.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
    /// The layers adapted, when not all are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
}

fn none() -> String {
    "none".into()
}

/// PEFT accepts `target_modules` as a list or as one string.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

impl PeftConfig {
    /// The layer hyperparameters.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig::new(self.r, self.lora_alpha)
            .with_dropout(self.lora_dropout)
            .with_rslora(self.use_rslora)
    }
}

/// A host-side f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// [rows, cols]
    pub shape: [usize; 2],
    /// Row-major values.
    pub data: Vec<f32>,
}

/// The A and B matrices of one adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    /// [r, in]
    pub a: Matrix,
    /// [out, r]
    pub b: Matrix,
}

/// An adapter read from or written to a PEFT folder.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// Its configuration.
    pub config: PeftConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) -> weights.
    pub modules: BTreeMap<String, LoraWeights>,
}

fn fault(path: &Path, what: impl Into<String>) -> AdapterError {
    AdapterError::Format {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Splits a PEFT key into (module path, "A" or "B").
fn parse_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix(PREFIX)?.strip_suffix(".weight")?;
    for (marker, which) in [(".lora_A", 'A'), (".lora_B", 'B')] {
        if let Some(pos) = rest.rfind(marker) {
            let after = &rest[pos + marker.len()..];
            // Either nothing or ".{adapter name}" follows.
            if after.is_empty() || (after.starts_with('.') && !after[1..].contains('.')) {
                return Some((rest[..pos].to_string(), which));
            }
        }
    }
    None
}

fn to_f32(path: &Path, key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, AdapterError> {
    let ty = match dtype {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::Bf16,
        other => {
            return Err(fault(
                path,
                format!("tensor {key} has dtype {other:?}; PEFT adapters are f32, f16 or bf16"),
            ))
        }
    };
    let n = bytes.len() / ty.block_bytes();
    ft_quant::dequantize(ty, bytes, n).map_err(|e| fault(path, format!("tensor {key}: {e}")))
}

impl PeftAdapter {
    /// Reads a PEFT LoRA folder.
    pub fn read(dir: &Path) -> Result<Self, AdapterError> {
        Ok(Self::read_fingerprinted(dir)?.0)
    }

    /// Reads a PEFT LoRA folder, with the sha256 of the bytes it read (config, then
    /// weights): a reader that loads the folder again can tell whether it changed.
    pub fn read_fingerprinted(dir: &Path) -> Result<(Self, [u8; 32]), AdapterError> {
        use sha2::{Digest, Sha256};
        let config_path = dir.join(CONFIG_FILE);
        let config_bytes = read_bounded(&config_path, MAX_CONFIG_BYTES)?;
        let mut fingerprint = Sha256::new();
        fingerprint.update((config_bytes.len() as u64).to_le_bytes());
        fingerprint.update(&config_bytes);
        let text =
            String::from_utf8(config_bytes).map_err(|_| fault(&config_path, "not UTF-8 text"))?;
        let config: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| fault(&config_path, format!("invalid adapter config: {e}")))?;
        if config.peft_type != "LORA" {
            return Err(fault(
                &config_path,
                format!("peft_type {:?}: ft reads LORA adapters", config.peft_type),
            ));
        }
        if config.bias != "none" {
            return Err(fault(
                &config_path,
                format!("bias {:?}: ft supports \"none\"", config.bias),
            ));
        }
        if config.r == 0 || config.r > MAX_RANK {
            return Err(fault(
                &config_path,
                format!("r must be from 1 to {MAX_RANK}, got {}", config.r),
            ));
        }
        if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0 && config.lora_alpha <= 1e6) {
            return Err(fault(
                &config_path,
                format!(
                    "lora_alpha must be a number in (0, 1e6], got {}",
                    config.lora_alpha
                ),
            ));
        }
        if !(0.0..1.0).contains(&config.lora_dropout) {
            return Err(fault(
                &config_path,
                format!(
                    "lora_dropout must be in [0, 1), got {}",
                    config.lora_dropout
                ),
            ));
        }
        // Features that change the math: refuse rather than apply the adapter wrongly.
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        for key in ["rank_pattern", "alpha_pattern"] {
            if raw[key].as_object().is_some_and(|m| !m.is_empty()) {
                return Err(fault(
                    &config_path,
                    format!("{key} gives modules their own r or alpha; ft reads adapters with one r and alpha"),
                ));
            }
        }
        if raw["use_dora"].as_bool() == Some(true) {
            return Err(fault(
                &config_path,
                "use_dora: ft reads plain LoRA, not DoRA",
            ));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = read_bounded(&weights_path, MAX_WEIGHTS_BYTES)?;
        fingerprint.update(&bytes);
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| fault(&weights_path, format!("not a valid safetensors file: {e}")))?;
        let mut halves: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
        // In name order, so that the first error reported is always the same one.
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, view) in tensors {
            let (module, which) = parse_key(&key).ok_or_else(|| {
                fault(
                    &weights_path,
                    format!("unexpected tensor {key} in a LoRA adapter"),
                )
            })?;
            let [rows, cols] = view.shape()[..] else {
                return Err(fault(
                    &weights_path,
                    format!("tensor {key} has shape {:?}, expected 2-D", view.shape()),
                ));
            };
            let m = Matrix {
                shape: [rows, cols],
                data: to_f32(&weights_path, &key, view.dtype(), view.data())?,
            };
            if m.data.iter().any(|v| !v.is_finite()) {
                return Err(fault(
                    &weights_path,
                    format!("tensor {key} holds NaN or infinite values"),
                ));
            }
            let expected_r = if which == 'A' { rows } else { cols };
            if expected_r != config.r {
                return Err(fault(
                    &weights_path,
                    format!(
                        "tensor {key} has shape {:?}, but r is {}",
                        m.shape, config.r
                    ),
                ));
            }
            let entry = halves.entry(module).or_default();
            if which == 'A' {
                entry.0 = Some(m);
            } else {
                entry.1 = Some(m);
            }
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in halves {
            match (a, b) {
                (Some(a), Some(b)) => {
                    modules.insert(module, LoraWeights { a, b });
                }
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(fault(
                        &weights_path,
                        format!("{PREFIX}{module}.{missing}.weight is missing"),
                    ));
                }
            }
        }
        if modules.is_empty() {
            return Err(fault(&weights_path, "holds no LoRA tensors"));
        }
        Ok((Self { config, modules }, fingerprint.finalize().into()))
    }

    /// Writes the folder: `adapter_config.json` and `adapter_model.safetensors` (f32), each
    /// through a temporary file and a rename.
    pub fn write(&self, dir: &Path) -> Result<(), AdapterError> {
        std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let entries: Vec<(String, [usize; 2], Vec<u8>)> = self
            .modules
            .iter()
            .flat_map(|(module, w)| {
                [("lora_A", &w.a), ("lora_B", &w.b)].map(|(name, m)| {
                    let bytes = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (format!("{PREFIX}{module}.{name}.weight"), m.shape, bytes)
                })
            })
            .collect();
        let views = entries
            .iter()
            .map(|(k, shape, bytes)| {
                TensorView::new(Dtype::F32, shape.to_vec(), bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| fault(&weights_path, format!("tensor {k}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = safetensors::serialize(
            views,
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )
        .map_err(|e| fault(&weights_path, e.to_string()))?;
        write_atomic(&weights_path, &bytes)?;
        let config =
            serde_json::to_string_pretty(&self.config).map_err(|e| fault(dir, e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    crate::atomic::write_atomic(path, bytes).map_err(|e| AdapterError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_and_without_an_adapter_name() {
        let m = "model.layers.3.self_attn.q_proj".to_string();
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((m.clone(), 'A'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight"),
            Some((m, 'B'))
        );
        assert_eq!(
            parse_key("model.layers.3.self_attn.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.weight"),
            None
        );
    }

    fn adapter() -> PeftAdapter {
        let config = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: 2,
            lora_alpha: 4.0,
            target_modules: vec!["q_proj".into()],
            lora_dropout: 0.0,
            bias: "none".into(),
            use_rslora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: Some("smollm2-135m-instruct".into()),
            inference_mode: true,
            layers_to_transform: None,
        };
        let w = LoraWeights {
            a: Matrix {
                shape: [2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
            b: Matrix {
                shape: [4, 2],
                data: (0..8).map(|v| v as f32).collect(),
            },
        };
        PeftAdapter {
            config,
            modules: BTreeMap::from([("model.layers.0.self_attn.q_proj".into(), w)]),
        }
    }

    #[test]
    fn configs_and_weights_outside_what_peft_means_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |edit: &dyn Fn(&mut PeftAdapter), needle: &str| {
            let mut a = adapter();
            edit(&mut a);
            a.write(dir.path()).unwrap();
            let err = PeftAdapter::read(dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        };
        refused(&|a| a.config.lora_dropout = 2.0, "lora_dropout");
        for alpha in [0.0, -1.0, 1e308] {
            refused(&|a| a.config.lora_alpha = alpha, "lora_alpha");
        }
        refused(&|a| a.config.r = 100_000_000_000, "r must be");
        for bad in [f32::NAN, f32::INFINITY] {
            refused(
                &|a| {
                    if let Some(w) = a.modules.values_mut().next() {
                        w.b.data[3] = bad;
                    }
                },
                "NaN or infinite",
            );
        }
        refused(&|a| a.modules.clear(), "no LoRA tensors");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_a_device_in_place_of_the_weights_is_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        adapter().write(dir.path()).unwrap();
        let weights = dir.path().join(WEIGHTS_FILE);
        std::fs::remove_file(&weights).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
        let err = PeftAdapter::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&weights).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&weights).status();
        if made.is_ok_and(|s| s.success()) {
            // Opening a FIFO with no writer would block forever; it is refused first.
            let err = PeftAdapter::read(dir.path()).unwrap_err().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn write_then_read_is_identity_with_peft_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter();
        a.write(dir.path()).unwrap();
        assert_eq!(PeftAdapter::read(dir.path()).unwrap(), a);
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
            ]
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["task_type"], "CAUSAL_LM");
        assert_eq!(config["lora_alpha"], 4.0);
        assert_eq!(config["bias"], "none");
    }

    #[test]
    fn half_precision_tensors_and_a_string_target_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": "q_proj", "bias": "none", "revision": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false, "fan_in_fan_out": true}"#,
        )
        .unwrap();
        let a: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let views = vec![
            (
                "base_model.model.m.q_proj.lora_A.default.weight".to_string(),
                TensorView::new(Dtype::BF16, vec![1, 2], &a).unwrap(),
            ),
            (
                "base_model.model.m.q_proj.lora_B.default.weight".to_string(),
                TensorView::new(Dtype::F16, vec![2, 1], &b).unwrap(),
            ),
        ];
        std::fs::write(
            dir.path().join(WEIGHTS_FILE),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        let read = PeftAdapter::read(dir.path()).unwrap();
        assert_eq!(read.config.target_modules, vec!["q_proj"]);
        let w = &read.modules["m.q_proj"];
        assert_eq!(
            (w.a.data.clone(), w.b.data.clone()),
            (vec![1.5, -2.0], vec![0.25, 3.0])
        );
        // Per-module ranks or DoRA would change the math: refused, naming the key.
        for (extra, key) in [
            (r#""rank_pattern": {"q_proj": 4}"#, "rank_pattern"),
            (r#""use_dora": true"#, "use_dora"),
        ] {
            std::fs::write(
                dir.path().join(CONFIG_FILE),
                format!(r#"{{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": "q_proj", {extra}}}"#),
            )
            .unwrap();
            let e = PeftAdapter::read(dir.path()).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn a_missing_half_or_a_wrong_rank_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = adapter();
        a.config.r = 3;
        a.write(dir.path()).unwrap();
        let err = PeftAdapter::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("q_proj.lora_A.weight has shape [2, 3], but r is 3"),
            "{err}"
        );
    }
}
