//! ft-tests: helpers for the end-to-end tests in `tests/e2e`, which run the `ft` binary in
//! temporary folders exactly as a user would and check its output, files and exit codes; and
//! the seeded mutation fuzzer ([`fuzz`]) that `tests/fuzz` runs over every parser.
#![warn(missing_docs)]

pub mod fuzz;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::backend::NdArray;
use ft_adapters::peft::{LoraWeights, Matrix, PeftConfig};
use ft_adapters::PeftAdapter;
use ft_model::tiny::{tiny_config, write_gguf, write_hf_folder};
use ft_model::{LlamaConfig, LlamaForCausalLM};

/// The `ft` binary next to this test executable (`target/<profile>/ft`), or `$FT_BIN`.
pub fn ft_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/ft
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(format!("ft{}", std::env::consts::EXE_SUFFIX)))
        .expect("target folder");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// The result of one `ft` run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "ft failed: {}", self.stderr);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts the exit code and that stderr mentions every one of `needles`.
    pub fn fails_with(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            self.code, code,
            "expected exit {code}; stderr: {}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks {n:?}: {}",
                self.stderr
            );
        }
        assert!(
            !self.stderr.contains("panicked"),
            "ft panicked: {}",
            self.stderr
        );
    }
}

/// Runs `ft` with `args`.
pub fn ft(args: &[&str]) -> Run {
    Command::new(ft_bin())
        .args(args)
        .output()
        .expect("spawn ft")
        .into()
}

/// Every line of a run's `metrics.jsonl`, parsed.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let path = run.join("metrics.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON metrics line"))
        .collect()
}

/// A file of the reference set in `fixtures/reference/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/reference")
        .join(name)
}

/// The reference JSON `name`.
pub fn fixture_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

/// Ids from a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

/// A tiny random model (seeded) with `config`, written both as an HF folder `dir/hf` and as a
/// GGUF file `dir/tiny.gguf`.
pub fn tiny_model(dir: &Path, config: &LlamaConfig) -> (PathBuf, PathBuf) {
    type B = NdArray<f32>;
    use burn::tensor::backend::Backend;
    B::seed(&Default::default(), 11);
    let model = LlamaForCausalLM::<B>::init_random(config, &Default::default());
    let folder = dir.join("hf");
    let gguf = dir.join("tiny.gguf");
    write_hf_folder(&model, config, &folder).expect("write folder");
    write_gguf(&model, config, &gguf).expect("write gguf");
    (folder, gguf)
}

/// The default tiny configuration.
pub fn tiny() -> LlamaConfig {
    tiny_config()
}

/// `$FT_HOME`, else `~/.cache/ft`, as ft finds it.
pub fn ft_home() -> PathBuf {
    match std::env::var_os("FT_HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ft"),
    }
}

/// A running `ft serve`, stopped when dropped.
pub struct Server {
    child: std::process::Child,
    /// `http://host:port`.
    pub url: String,
}

impl Server {
    /// Starts `ft serve --port 0 <args>` and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(ft_bin())
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ft serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        break rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string();
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                _ => {
                    let _ = child.kill();
                    panic!("ft serve exited before listening: {seen}");
                }
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, url }
    }

    /// POSTs `body` to `path`; the status and the JSON answer.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.post_with(path, body, None)
    }

    /// [`Self::post`] with a bearer key.
    pub fn post_with(
        &self,
        path: &str,
        body: &serde_json::Value,
        key: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = ureq::post(&format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let answer = req
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        let (status, resp) = match answer {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(e) => panic!("POST {path}: {e}"),
        };
        let text = resp.into_string().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// GETs `path` as text.
    pub fn get(&self, path: &str) -> String {
        ureq::get(&format!("{}{path}", self.url))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_string()
            .expect("body")
    }

    /// The value of an unlabelled metric in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rank-4 adapter on q_proj and v_proj of `layers` layers, for a model of hidden size
/// `hidden` and key/value width `kv`.
pub fn write_adapter(dir: &Path, layers: usize, hidden: usize, kv: usize, seed: usize) {
    let matrix = |shape: [usize; 2], s: usize| Matrix {
        shape,
        data: (0..shape[0] * shape[1])
            .map(|i| (((i * 31 + s * 17) % 23) as f32 - 11.0) * 0.01)
            .collect(),
    };
    let mut modules = BTreeMap::new();
    for i in 0..layers {
        for (m, out) in [("q_proj", hidden), ("v_proj", kv)] {
            modules.insert(
                format!("model.layers.{i}.self_attn.{m}"),
                LoraWeights {
                    a: matrix([4, hidden], seed + i),
                    b: matrix([out, 4], seed + i + 3),
                },
            );
        }
    }
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "bias": "none"
    }))
    .unwrap();
    PeftAdapter { config, modules }.write(dir).unwrap();
}
