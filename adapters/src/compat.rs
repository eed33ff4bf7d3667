//! Whether vLLM, LoRAX or TGI will load a PEFT LoRA adapter for a Llama-family base, and why
//! not, as their loaders check it (vLLM 0.11; LoRAX and TGI at their heads of late 2026). vLLM
//! refuses what it does not support; LoRAX and TGI load it and silently leave out what they do
//! not read, so the adapter serves but computes something else than it does in PEFT or ft.

use std::fmt;
use std::str::FromStr;

use safetensors::SafeTensors;

use crate::lora::TARGETS;
use serde_json::Value;

/// A server that loads PEFT LoRA adapters beside a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// vLLM (`--enable-lora`, `--lora-modules`).
    Vllm,
    /// LoRAX.
    Lorax,
    /// Hugging Face text-generation-inference (`LORA_ADAPTERS`).
    Tgi,
}

impl Server {
    /// All three, in the order reports list them.
    pub const ALL: [Server; 3] = [Server::Vllm, Server::Lorax, Server::Tgi];
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Server::Vllm => "vllm",
            Server::Lorax => "lorax",
            Server::Tgi => "tgi",
        })
    }
}

impl FromStr for Server {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vllm" => Ok(Server::Vllm),
            "lorax" => Ok(Server::Lorax),
            "tgi" => Ok(Server::Tgi),
            other => Err(format!("{other:?}: expected vllm, lorax or tgi")),
        }
    }
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The server loads it only when started with a flag.
    NeedsFlag,
    /// The server loads it but leaves this out: its outputs differ from PEFT's.
    Ignored,
    /// The server refuses the adapter.
    Refused,
}

/// One rule an adapter meets only in part, and what follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// How much it matters.
    pub level: Level,
    /// What the server does, and about which field or tensor.
    pub what: String,
}

/// A server's answer for one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The server.
    pub server: Server,
    /// Every rule the adapter does not simply meet, most serious first.
    pub findings: Vec<Finding>,
}

impl Verdict {
    /// Whether the server loads the adapter (with the flags findings name).
    pub fn loads(&self) -> bool {
        self.findings.iter().all(|f| f.level != Level::Refused)
    }

    /// Whether it loads and computes what PEFT computes.
    pub fn faithful(&self) -> bool {
        self.findings.iter().all(|f| f.level == Level::NeedsFlag)
    }

    /// One line: `vllm: loads` / `loads with ...` / `refused: ...` / `loads but ...`.
    pub fn summary(&self) -> String {
        let list = |level: Level| -> Vec<&str> {
            self.findings
                .iter()
                .filter(|f| f.level == level)
                .map(|f| f.what.as_str())
                .collect()
        };
        let (refused, ignored, flags) = (
            list(Level::Refused),
            list(Level::Ignored),
            list(Level::NeedsFlag),
        );
        let mut line = format!("{}: ", self.server);
        if !refused.is_empty() {
            line += &format!("refused: {}", refused.join("; "));
            return line;
        }
        line += "loads";
        if !flags.is_empty() {
            line += &format!(" with {}", flags.join(", "));
        }
        if !ignored.is_empty() {
            line += &format!(", but {}", ignored.join("; "));
        }
        line
    }
}

/// vLLM's `--max-lora-rank` values (`vllm/config/lora.py`); the default is 16.
const VLLM_RANKS: [u64; 8] = [8, 16, 32, 64, 128, 256, 320, 512];

/// Checks an adapter's `adapter_config.json` text and its safetensors file against `server`.
/// Errors are for files that are not a config or a safetensors file at all.
pub fn check(config: &[u8], weights: &[u8], server: Server) -> Result<Verdict, String> {
    let config: Value =
        serde_json::from_slice(config).map_err(|e| format!("adapter_config.json: {e}"))?;
    let (_, metadata) = SafeTensors::read_metadata(weights)
        .map_err(|e| format!("adapter_model.safetensors: {e}"))?;
    let mut names: Vec<String> = metadata.tensors().keys().cloned().collect();
    names.sort();
    let mut findings = Vec::new();
    let mut add = |level, what: String| findings.push(Finding { level, what });
    let set = |key: &str| match &config[key] {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    };
    let r = config["r"].as_u64();
    let bias = config["bias"].as_str().unwrap_or("none");
    // The modules the tensors adapt, from `...layers.N.self_attn.q_proj.lora_A.weight`.
    let modules: std::collections::BTreeSet<String> = names
        .iter()
        .filter_map(|n| {
            let stem = n
                .strip_suffix(".lora_A.weight")
                .or_else(|| n.strip_suffix(".lora_B.weight"))
                .or_else(|| n.strip_suffix(".lora_embedding_A"))
                .or_else(|| n.strip_suffix(".lora_embedding_B"))?;
            stem.rsplit('.').next().map(str::to_string)
        })
        .collect();
    match server {
        Server::Vllm => {
            for key in ["r", "lora_alpha", "target_modules"] {
                if config[key].is_null() {
                    add(Level::Refused, format!("{key} is missing from the config"));
                }
            }
            if set("modules_to_save") {
                add(Level::Refused, "modules_to_save must be empty".into());
            }
            if config["use_dora"] == Value::Bool(true) {
                add(Level::Refused, "DoRA (use_dora) is not supported".into());
            }
            if bias != "none" {
                add(
                    Level::Refused,
                    format!("bias {bias:?}: only \"none\" is loaded"),
                );
            }
            match r {
                Some(r) if r > 512 => add(
                    Level::Refused,
                    format!("r = {r} is above the largest --max-lora-rank, 512"),
                ),
                Some(r) if r > 16 => {
                    let rank = VLLM_RANKS.iter().find(|&&v| v >= r).copied().unwrap_or(512);
                    add(Level::NeedsFlag, format!("--max-lora-rank {rank}"));
                }
                _ => {}
            }
            for n in &names {
                let known = [".lora_A.weight", ".lora_B.weight", ".bias"]
                    .iter()
                    .any(|s| n.ends_with(s))
                    || n.ends_with(".lora_embedding_A")
                    || n.ends_with(".lora_embedding_B");
                if !known {
                    add(
                        Level::Refused,
                        format!("tensor {n} is no LoRA weight vLLM reads"),
                    );
                }
            }
            for m in &modules {
                let supported =
                    TARGETS.contains(&m.as_str()) || m == "embed_tokens" || m == "lm_head";
                if !supported {
                    add(
                        Level::Refused,
                        format!("module {m} is not one vLLM adapts in Llama"),
                    );
                }
            }
            for key in ["rank_pattern", "alpha_pattern"] {
                if set(key) {
                    add(
                        Level::Ignored,
                        format!("{key} is dropped (every module gets lora_alpha / r)"),
                    );
                }
            }
        }
        Server::Lorax | Server::Tgi => {
            let name = server.to_string();
            for n in &names {
                let expected = n.starts_with("base_model.model.")
                    && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"));
                if !expected && !n.contains("lora_embedding") {
                    add(
                        Level::Refused,
                        format!("tensor {n}: {name} reads base_model.model.<module>.lora_A.weight and lora_B.weight"),
                    );
                }
            }
            for m in &modules {
                let applied =
                    TARGETS.contains(&m.as_str()) || (server == Server::Lorax && m == "lm_head");
                if !applied {
                    add(Level::Ignored, format!("the {m} adapter is left out"));
                }
            }
            for (key, what) in [
                ("modules_to_save", "modules_to_save is left out"),
                ("rank_pattern", "rank_pattern is left out"),
                ("alpha_pattern", "alpha_pattern is left out"),
                (
                    "layers_to_transform",
                    "layers_to_transform drops each adapted module type that some layer lacks",
                ),
            ] {
                if set(key) {
                    add(Level::Ignored, what.into());
                }
            }
            if config["use_dora"] == Value::Bool(true) {
                add(Level::Ignored, "DoRA's magnitudes are left out".into());
            }
            if bias != "none" {
                add(Level::Ignored, format!("bias {bias:?} is left out"));
            }
            if server == Server::Lorax && config["use_rslora"] == Value::Bool(true) {
                add(
                    Level::Ignored,
                    "use_rslora is not read (it scales by alpha / r, not alpha / sqrt(r))".into(),
                );
            }
            if server == Server::Tgi {
                add(Level::NeedsFlag, "LORA_ADAPTERS=NAME=DIR at launch".into());
            }
        }
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(Verdict { server, findings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{LoraWeights, Matrix, PeftAdapter, PeftConfig};
    use std::collections::BTreeMap;

    /// The files of an adapter of rank `r` on q_proj and `extra` modules, with `config` keys
    /// added to its config.
    fn files(r: usize, extra: &[&str], config: Value) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let m = |shape: [usize; 2]| Matrix {
            shape,
            data: vec![0.5; shape[0] * shape[1]],
        };
        let mut modules = BTreeMap::new();
        for name in std::iter::once("self_attn.q_proj").chain(extra.iter().copied()) {
            modules.insert(
                format!("model.layers.0.{name}"),
                LoraWeights {
                    a: m([r, 8]),
                    b: m([8, r]),
                },
            );
        }
        let c: PeftConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"],
        }))
        .unwrap();
        PeftAdapter { config: c, modules }
            .write(dir.path())
            .unwrap();
        let mut text: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
                .unwrap();
        for (k, v) in config.as_object().unwrap() {
            text[k] = v.clone();
        }
        (
            serde_json::to_vec(&text).unwrap(),
            std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap(),
        )
    }

    fn summary(f: &(Vec<u8>, Vec<u8>), server: Server) -> String {
        check(&f.0, &f.1, server).unwrap().summary()
    }

    #[test]
    fn a_plain_adapter_loads_everywhere() {
        let f = files(8, &["mlp.down_proj"], serde_json::json!({}));
        assert_eq!(summary(&f, Server::Vllm), "vllm: loads");
        assert_eq!(summary(&f, Server::Lorax), "lorax: loads");
        assert_eq!(
            summary(&f, Server::Tgi),
            "tgi: loads with LORA_ADAPTERS=NAME=DIR at launch"
        );
        assert!(Server::ALL
            .iter()
            .all(|&s| check(&f.0, &f.1, s).unwrap().faithful()));
    }

    #[test]
    fn vllm_needs_a_rank_flag_above_16_and_refuses_what_it_does_not_support() {
        let f = files(24, &[], serde_json::json!({}));
        assert_eq!(
            summary(&f, Server::Vllm),
            "vllm: loads with --max-lora-rank 32"
        );
        let f = files(600, &[], serde_json::json!({}));
        assert!(summary(&f, Server::Vllm).contains("refused: r = 600"));
        let f = files(
            8,
            &[],
            serde_json::json!({"modules_to_save": ["lm_head"], "use_dora": true}),
        );
        let v = check(&f.0, &f.1, Server::Vllm).unwrap();
        assert!(!v.loads());
        assert!(
            v.summary().contains("modules_to_save") && v.summary().contains("DoRA"),
            "{}",
            v.summary()
        );
        // LoRAX and TGI load the same files and leave both out.
        let l = check(&f.0, &f.1, Server::Lorax).unwrap();
        assert!(l.loads() && !l.faithful(), "{}", l.summary());
    }

    #[test]
    fn lorax_and_tgi_leave_out_what_they_do_not_read() {
        let f = files(
            8,
            &["embed_tokens"],
            serde_json::json!({"use_rslora": true}),
        );
        let lorax = summary(&f, Server::Lorax);
        assert!(
            lorax.contains("embed_tokens adapter is left out") && lorax.contains("use_rslora"),
            "{lorax}"
        );
        let tgi = summary(&f, Server::Tgi);
        assert!(
            tgi.contains("embed_tokens") && !tgi.contains("use_rslora"),
            "{tgi}"
        );
        let vllm = summary(&f, Server::Vllm);
        assert_eq!(
            vllm, "vllm: loads",
            "vLLM adapts embed_tokens and honours rsLoRA"
        );
    }
}
