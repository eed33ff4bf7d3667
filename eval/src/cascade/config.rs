//! A cascade as written (`cascade.toml`) and as fitted (the same file with each kept stage's
//! scorer and threshold, and what the fit chose):
//!
//! ```toml
//! [[stage]]
//! name = "base"          # how reports and responses name it
//! shots = 4              # optional: solved examples before each prompt (default 0)
//! [[stage]]
//! name = "adapter-q4"
//! adapter = "units"      # optional: a registry name (NAME[:VERSION]) or a PEFT folder
//! quant = "q4"           # optional: the base's storage, as `ft eval --quant` names it
//! decoding = "sc5"       # greedy (default), sample, beamN, or scN: N samples, majority vote
//! price = { input = 0.05, output = 0.20 }   # optional: USD per 1M tokens; else measured
//! [[stage]]
//! name = "remote"
//! url = "http://10.0.0.2:8000"   # optional: another OpenAI-compatible server answers
//! model = "big"                  # the model it answers with (with `url` only)
//! api_key_env = "BIG_KEY"        # optional: the variable holding its API key
//! ```
//!
//! A stage without a price costs the machine time it took at `--price-per-hour`.

use std::path::Path;
use std::str::FromStr;

use ft_serve::cascade::features::NAMES;
use ft_serve::cascade::scorer::Logistic;
use serde::{Deserialize, Serialize};

use crate::error::EvalError;
use crate::measure::Decoding;

/// The most stages a cascade holds: the search tries every ordered subset of them.
pub const MAX_STAGES: usize = 6;

/// How a stage decodes: one request, or several sampled ones and their majority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageDecoding {
    /// One request decoded this way.
    One(Decoding),
    /// Self-consistency (Wang et al. 2023): N sampled answers, the most common kept.
    SelfConsistency(usize),
}

impl FromStr for StageDecoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(n) = s.strip_prefix("sc") {
            return n
                .parse()
                .ok()
                .filter(|n| (2..=16).contains(n))
                .map(Self::SelfConsistency)
                .ok_or_else(|| format!("expected scN with N in 2..=16, got {s:?}"));
        }
        s.parse::<Decoding>()
            .map(Self::One)
            .map_err(|e| format!("{e}, or scN (N samples, majority vote)"))
    }
}

impl std::fmt::Display for StageDecoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::One(d) => d.fmt(f),
            Self::SelfConsistency(n) => write!(f, "sc{n}"),
        }
    }
}

impl Serialize for StageDecoding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StageDecoding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A stage's price per token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// USD per million prompt tokens.
    pub input: f64,
    /// USD per million generated tokens.
    pub output: f64,
}

impl Price {
    /// What `prompt` and `output` tokens cost, USD.
    pub fn cost(&self, prompt: usize, output: usize) -> f64 {
        (self.input * prompt as f64 + self.output * output as f64) / 1e6
    }
}

fn greedy() -> StageDecoding {
    StageDecoding::One(Decoding::Greedy)
}

/// One stage: a model the in-process server answers with, how, and at what price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Its name.
    pub name: String,
    /// The adapter: a registry name (NAME[:VERSION]) or a PEFT folder; none for the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The base weights' storage (`ft eval --quant` names); none for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// Another OpenAI-compatible server (`http://host:port`) that answers instead of ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The model the server at `url` answers with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The environment variable holding the API key of the server at `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// How it decodes.
    #[serde(default = "greedy")]
    pub decoding: StageDecoding,
    /// Solved examples before each prompt.
    #[serde(default)]
    pub shots: usize,
    /// Its price; none to price the machine time it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// Fitted: accept this stage's answer when its scorer gives at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Fitted: the probability that this stage's answer is right, from its features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scorer: Option<Logistic>,
}

impl Stage {
    /// The API key of this stage's server, from its `api_key_env`; an error names the
    /// variable when it is unset.
    pub fn api_key(&self) -> Result<Option<String>, String> {
        self.api_key_env
            .as_ref()
            .map(|var| {
                std::env::var(var)
                    .map_err(|_| format!("stage {}: api_key_env: ${var} is not set", self.name))
            })
            .transpose()
    }
}

/// What a fit chose, and on what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fit {
    /// The base model the stages answered with.
    pub model: String,
    /// The task fitted on.
    pub task: String,
    /// Examples of its development split.
    pub dev_examples: usize,
    /// The budget, USD per 1,000 requests.
    pub budget_per_k: f64,
    /// The stages kept, in order (the rest are never asked).
    pub chain: Vec<String>,
    /// Accuracy on the development split.
    pub dev_accuracy: f64,
    /// Mean cost on the development split, USD per 1,000 requests.
    pub dev_cost_per_k: f64,
}

/// A cascade: its stages, cheapest first, and once fitted what the fit chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cascade {
    /// The stages.
    #[serde(rename = "stage", default)]
    pub stages: Vec<Stage>,
    /// The fit, once `ft cascade fit` ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<Fit>,
}

impl Cascade {
    /// Reads and checks a cascade file; an error names the file and the field at fault.
    pub fn read(path: &Path) -> Result<Self, EvalError> {
        let at = |m: String| EvalError::Cascade {
            path: path.to_path_buf(),
            message: m,
        };
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let c: Cascade = toml::from_str(&text).map_err(|e| at(e.to_string()))?;
        if c.stages.is_empty() || c.stages.len() > MAX_STAGES {
            return Err(at(format!(
                "stage: a cascade has 1 to {MAX_STAGES} [[stage]] tables, not {}",
                c.stages.len()
            )));
        }
        if let Some(name) = c
            .fit
            .iter()
            .flat_map(|f| &f.chain)
            .find(|n| !c.stages.iter().any(|s| &&s.name == n))
        {
            return Err(at(format!(
                "fit: chain: no stage is called {name:?}: fit again"
            )));
        }
        for (i, s) in c.stages.iter().enumerate() {
            if s.name.is_empty() || c.stages[..i].iter().any(|o| o.name == s.name) {
                return Err(at(format!(
                    "stage {}: name: {:?} must be non-empty and unique",
                    i + 1,
                    s.name
                )));
            }
            if s.scorer.as_ref().is_some_and(|sc| sc.features != NAMES) {
                return Err(at(format!(
                    "stage {}: scorer: its features are not {}: fit again",
                    s.name,
                    NAMES.join(", ")
                )));
            }
            let remote = s.url.is_some();
            match &s.url {
                Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                    return Err(at(format!(
                        "stage {}: url: expected http://HOST:PORT, got {url:?}",
                        s.name
                    )));
                }
                Some(_) if s.model.is_none() => {
                    return Err(at(format!(
                        "stage {}: model: a stage with a url names the model its server answers with",
                        s.name
                    )));
                }
                None if s.model.is_some() || s.api_key_env.is_some() => {
                    return Err(at(format!(
                        "stage {}: url: `model` and `api_key_env` go with a url (another server); \
                         on this one a stage names its `adapter`",
                        s.name
                    )));
                }
                _ => {}
            }
            if remote && (s.adapter.is_some() || s.quant.is_some()) {
                return Err(at(format!(
                    "stage {}: url: a stage on another server has no `adapter` or `quant` here: \
                     its `model` is what that server answers with",
                    s.name
                )));
            }
            if let Some(p) = s.price {
                if !(p.input >= 0.0
                    && p.output >= 0.0
                    && p.input.is_finite()
                    && p.output.is_finite())
                {
                    return Err(at(format!(
                        "stage {}: price: input and output are USD per 1M tokens, 0 or more",
                        s.name
                    )));
                }
            }
        }
        Ok(c)
    }

    /// Writes the cascade as TOML, atomically.
    pub fn write(&self, path: &Path) -> Result<(), EvalError> {
        let text = toml::to_string_pretty(self).map_err(|e| EvalError::Cascade {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::error::write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cascade_reads_checks_and_writes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[stage]]\nname = \"a\"\nshots = 2\n\n[[stage]]\nname = \"b\"\nadapter = \"units\"\nquant = \"q8\"\ndecoding = \"sc3\"\nprice = { input = 0.1, output = 0.4 }\n",
        )
        .unwrap();
        let c = Cascade::read(&path).unwrap();
        assert_eq!(c.stages[0].decoding, StageDecoding::One(Decoding::Greedy));
        assert_eq!(c.stages[1].decoding, StageDecoding::SelfConsistency(3));
        assert_eq!(c.stages[1].price.unwrap().cost(1_000_000, 500_000), 0.3);
        let out = dir.path().join("d.toml");
        c.write(&out).unwrap();
        assert_eq!(Cascade::read(&out).unwrap(), c);

        for (text, needle) in [
            ("", "1 to 6"),
            (
                "[[stage]]\nname = \"a\"\n[fit]\nmodel = \"m\"\ntask = \"t\"\ndev_examples = 1\nbudget_per_k = 1.0\nchain = [\"b\"]\ndev_accuracy = 1.0\ndev_cost_per_k = 1.0\n",
                "no stage is called \"b\"",
            ),
            (
                "[[stage]]\nname = \"a\"\n[[stage]]\nname = \"a\"\n",
                "unique",
            ),
            ("[[stage]]\nname = \"a\"\ndecoding = \"sc1\"\n", "scN"),
            ("[[stage]]\nname = \"a\"\nmodel = \"x\"\n", "go with a url"),
            ("[[stage]]\nname = \"a\"\nurl = \"http://h:1\"\n", "model: a stage with a url"),
            (
                "[[stage]]\nname = \"a\"\nurl = \"h:1\"\nmodel = \"m\"\n",
                "expected http://HOST:PORT",
            ),
            (
                "[[stage]]\nname = \"a\"\nurl = \"http://h:1\"\nmodel = \"m\"\nquant = \"q8\"\n",
                "no `adapter` or `quant`",
            ),
            ("[[stage]]\nname = \"a\"\nmystery = 1\n", "mystery"),
            (
                "[[stage]]\nname = \"a\"\nprice = { input = -1, output = 0 }\n",
                "price",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Cascade::read(&path).unwrap_err().to_string();
            assert!(
                err.contains("c.toml") && err.contains(needle),
                "{text:?}: {err}"
            );
        }
    }
}
