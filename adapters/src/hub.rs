//! Publishing adapters to the Hugging Face Hub and pulling them back, through the Hub's HTTP
//! API as `huggingface_hub` uses it:
//!
//! 1. `POST /api/repos/create` (`{"type": "model", "name", "organization", "private"}`); 409
//!    means the repository exists, which is fine;
//! 2. `POST /api/models/{repo}/preupload/{revision}` with each file's path, size and a base64
//!    sample; the Hub answers which files go through LFS;
//! 3. for LFS files, `POST /{repo}.git/info/lfs/objects/batch` (git-lfs batch API, sha256
//!    oids), then `PUT` each object the answer asks for and `POST` its verify action;
//! 4. `POST /api/models/{repo}/commit/{revision}` as NDJSON: a header, regular files inline in
//!    base64, LFS files by oid.
//!
//! Pulling reads `GET /{repo}/resolve/{revision}/{file}`. The token (from `HF_TOKEN` or the
//! token file) goes in the `Authorization` header only and never into an error message.

use std::io::Read;
use std::path::PathBuf;

use base64::Engine;
use serde_json::{json, Value};

use crate::registry::{safe_relative, sha256_hex, validate_name};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Errors of Hub calls; none contains the token.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The Hub refused the token (401/403).
    #[error("{what}: the Hub refused the token (HTTP {status}); set HF_TOKEN to a token with write access")]
    Unauthorized {
        /// Which call.
        what: String,
        /// 401 or 403.
        status: u16,
    },
    /// The Hub answered with another error status.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// Which call.
        what: String,
        /// The status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The connection failed or was cut.
    #[error("{what}: {message}")]
    Transport {
        /// Which call.
        what: String,
        /// What went wrong (no headers).
        message: String,
    },
    /// The Hub's answer did not have the expected shape.
    #[error("{what}: unexpected answer: {message}")]
    Protocol {
        /// Which call.
        what: String,
        /// What was wrong.
        message: String,
    },
    /// A repository id or file path that is not allowed.
    #[error("{0}")]
    BadName(String),
}

/// The token of the usual places: `HF_TOKEN`, else `$HF_HOME/token`, else
/// `~/.cache/huggingface/token`.
pub fn token_from_env() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        return Some(t.trim().to_string());
    }
    let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface"))
    })?;
    std::fs::read_to_string(home.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Checks `OWNER/NAME`.
pub fn validate_repo(repo: &str) -> Result<(&str, &str), HubError> {
    let bad = || HubError::BadName(format!("repository {repo:?}: expected OWNER/NAME"));
    let (owner, name) = repo.split_once('/').ok_or_else(bad)?;
    validate_name(owner).map_err(|_| bad())?;
    validate_name(name).map_err(|_| bad())?;
    Ok((owner, name))
}

/// A Hub client for one endpoint and token.
pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// One file to upload.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Path in the repository.
    pub path: String,
    /// Content.
    pub bytes: Vec<u8>,
}

impl HubClient {
    /// A client for `endpoint` (no trailing slash needed).
    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(std::time::Duration::from_secs(30))
                .timeout_read(std::time::Duration::from_secs(300))
                .build(),
        }
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let req = self.agent.request(method, url);
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Sends a JSON body; returns the JSON answer.
    fn json_call(
        &self,
        what: &str,
        method: &str,
        url: &str,
        body: &Value,
    ) -> Result<Value, HubError> {
        let resp = self
            .request(method, url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        read_json(what, resp)
    }

    /// Uploads `files` to `repo` (created if missing) in one commit; returns the commit URL
    /// (or oid) the Hub reports.
    pub fn upload(
        &self,
        repo: &str,
        private: bool,
        files: &[UploadFile],
        message: &str,
    ) -> Result<String, HubError> {
        let (owner, name) = validate_repo(repo)?;
        for f in files {
            safe_relative(&f.path).map_err(|e| HubError::BadName(e.to_string()))?;
        }
        let ep = &self.endpoint;
        let create = self.json_call(
            "create repository",
            "POST",
            &format!("{ep}/api/repos/create"),
            &json!({"type": "model", "name": name, "organization": owner, "private": private}),
        );
        match create {
            Ok(_) | Err(HubError::Status { status: 409, .. }) => {}
            Err(e) => return Err(e),
        }

        let engine = base64::engine::general_purpose::STANDARD;
        let listing: Vec<Value> = files
            .iter()
            .map(|f| {
                let sample = &f.bytes[..f.bytes.len().min(512)];
                json!({"path": f.path, "size": f.bytes.len(), "sample": engine.encode(sample)})
            })
            .collect();
        let modes = self.json_call(
            "preupload",
            "POST",
            &format!("{ep}/api/models/{repo}/preupload/main"),
            &json!({ "files": listing }),
        )?;
        let is_lfs = |path: &str| {
            modes["files"].as_array().into_iter().flatten().any(|m| {
                m["path"].as_str() == Some(path) && m["uploadMode"].as_str() == Some("lfs")
            })
        };

        let lfs: Vec<&UploadFile> = files.iter().filter(|f| is_lfs(&f.path)).collect();
        if !lfs.is_empty() {
            self.upload_lfs(repo, &lfs)?;
        }

        let mut ndjson =
            json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string();
        for f in files {
            let line = if is_lfs(&f.path) {
                json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": sha256_hex(&f.bytes), "size": f.bytes.len()}})
            } else {
                json!({"key": "file", "value": {"path": f.path, "encoding": "base64", "content": engine.encode(&f.bytes)}})
            };
            ndjson.push('\n');
            ndjson.push_str(&line.to_string());
        }
        let resp = self
            .request("POST", &format!("{ep}/api/models/{repo}/commit/main"))
            .set("Content-Type", "application/x-ndjson")
            .send_string(&ndjson);
        let answer = read_json("commit", resp)?;
        Ok(answer["commitUrl"]
            .as_str()
            .or_else(|| answer["commitOid"].as_str())
            .unwrap_or("")
            .to_string())
    }

    /// The git-lfs batch negotiation, then the uploads and verifications it asks for.
    fn upload_lfs(&self, repo: &str, files: &[&UploadFile]) -> Result<(), HubError> {
        let objects: Vec<Value> = files
            .iter()
            .map(|f| json!({"oid": sha256_hex(&f.bytes), "size": f.bytes.len()}))
            .collect();
        let resp = self
            .request("POST", &format!("{}/{repo}.git/info/lfs/objects/batch", self.endpoint))
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(
                &json!({"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256"})
                    .to_string(),
            );
        let batch = read_json("lfs batch", resp)?;
        let answered = batch["objects"]
            .as_array()
            .ok_or_else(|| HubError::Protocol {
                what: "lfs batch".into(),
                message: "no objects".into(),
            })?;
        for obj in answered {
            let oid = obj["oid"].as_str().unwrap_or_default();
            let Some(file) = files.iter().find(|f| sha256_hex(&f.bytes) == oid) else {
                return Err(HubError::Protocol {
                    what: "lfs batch".into(),
                    message: format!("object {oid} was not asked for"),
                });
            };
            if let Some(err) = obj.get("error") {
                return Err(HubError::Protocol {
                    what: format!("lfs upload of {}", file.path),
                    message: err.to_string(),
                });
            }
            let Some(upload) = obj["actions"].get("upload") else {
                continue; // the Hub has it already
            };
            let href = upload["href"].as_str().ok_or_else(|| HubError::Protocol {
                what: "lfs batch".into(),
                message: "upload action without href".into(),
            })?;
            let mut req = self.agent.request("PUT", href);
            for (k, v) in upload["header"].as_object().into_iter().flatten() {
                req = req.set(k, v.as_str().unwrap_or_default());
            }
            let what = format!("lfs upload of {}", file.path);
            read_body(&what, req.send_bytes(&file.bytes))?;
            if let Some(href) = obj["actions"]["verify"]["href"].as_str() {
                let resp = self
                    .request("POST", href)
                    .set("Content-Type", "application/vnd.git-lfs+json")
                    .send_string(&json!({"oid": oid, "size": file.bytes.len()}).to_string());
                read_body(&format!("lfs verify of {}", file.path), resp)?;
            }
        }
        Ok(())
    }

    /// The bytes of `file` in `repo` at `revision`.
    pub fn download(&self, repo: &str, file: &str, revision: &str) -> Result<Vec<u8>, HubError> {
        validate_repo(repo)?;
        safe_relative(file).map_err(|e| HubError::BadName(e.to_string()))?;
        let url = format!("{}/{repo}/resolve/{revision}/{file}", self.endpoint);
        read_body(
            &format!("download {repo}/{file}"),
            self.request("GET", &url).call(),
        )
    }
}

fn transport(what: &str, e: ureq::Transport) -> HubError {
    HubError::Transport {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The body of a successful answer, or the error its status means.
fn read_body(what: &str, resp: Result<ureq::Response, ureq::Error>) -> Result<Vec<u8>, HubError> {
    match resp {
        Ok(r) => {
            let mut bytes = Vec::new();
            r.into_reader()
                .read_to_end(&mut bytes)
                .map_err(|e| HubError::Transport {
                    what: what.to_string(),
                    message: e.to_string(),
                })?;
            Ok(bytes)
        }
        Err(ureq::Error::Status(status, r)) => {
            let body: String = r
                .into_string()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            Err(if status == 401 || status == 403 {
                HubError::Unauthorized {
                    what: what.to_string(),
                    status,
                }
            } else {
                HubError::Status {
                    what: what.to_string(),
                    status,
                    body,
                }
            })
        }
        Err(ureq::Error::Transport(t)) => Err(transport(what, t)),
    }
}

fn read_json(what: &str, resp: Result<ureq::Response, ureq::Error>) -> Result<Value, HubError> {
    let bytes = read_body(what, resp)?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| HubError::Protocol {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// `s` as a YAML scalar: plain where it is made of characters that cannot start or end a
/// YAML construct, else double-quoted with JSON's escapes (which YAML reads), so no value can
/// add keys or lines to the front matter.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
        && !s.starts_with(['-', '.']);
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
    }
}

/// The model card: YAML front matter the Hub reads, then what the adapter is, its metrics, the
/// recipe that trained it, how to load it with PEFT, and `serving`: one line per server on
/// whether it loads the adapter ([`crate::compat::Verdict::summary`]).
pub fn model_card(
    record: &crate::registry::AdapterRecord,
    repo: &str,
    license: &str,
    serving: &[String],
) -> String {
    let base = record.base_model.as_deref().unwrap_or("unknown");
    let mut tags = vec!["ft".to_string(), "lora".into(), "peft".into()];
    if let Some(t) = &record.task {
        tags.push(t.clone());
    }
    let tags: String = tags
        .iter()
        .map(|t| format!("- {}\n", yaml_scalar(t)))
        .collect();
    let (yaml_base, yaml_license) = (yaml_scalar(base), yaml_scalar(license));
    let python_base = serde_json::to_string(base).unwrap_or_default();
    let python_repo = serde_json::to_string(repo).unwrap_or_default();
    let metrics = serde_json::to_string_pretty(&record.metrics).unwrap_or_default();
    let recipe = record.recipe.as_deref().map_or(String::new(), |r| {
        format!("\n## Recipe\n\n```toml\n{}\n```\n", r.trim_end())
    });
    format!(
        "---\nbase_model: {yaml_base}\nlibrary_name: peft\nlicense: {yaml_license}\ntags:\n{tags}pipeline_tag: text-generation\n---\n\n\
         # {name} (version {version})\n\n\
         A LoRA adapter (r = {r}, alpha = {alpha}, target modules: {targets}) for `{base}`{task}, \
         trained with ft and stored in the PEFT format.\n\n\
         ## Metrics\n\n```json\n{metrics}\n```\n{recipe}\n\
         ## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n\
         base = AutoModelForCausalLM.from_pretrained({python_base})\nmodel = PeftModel.from_pretrained(base, {python_repo})\n```\n{serving}",
        name = record.name,
        version = record.version,
        r = record.r,
        alpha = record.alpha,
        targets = record.target_modules.join(", "),
        task = record
            .task
            .as_deref()
            .map_or(String::new(), |t| format!(" on the task `{t}`")),
        serving = if serving.is_empty() {
            String::new()
        } else {
            let lines: String = serving.iter().map(|l| format!("- {l}\n")).collect();
            format!("\n## Other servers\n\nAs `ft adapters check` found when it was published:\n\n{lines}")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::AdapterRecord;

    #[test]
    fn values_cannot_add_keys_to_the_model_cards_front_matter() {
        let record = AdapterRecord {
            name: "dates".into(),
            version: 1,
            task: Some("dates\ninjected: yes".into()),
            base_model: Some("org/base\nlicense: stolen".into()),
            base_sha256: None,
            r: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into()],
            recipe: None,
            metrics: serde_json::json!({}),
            created_at: "2026-12-05T00:00:00Z".into(),
            files: Default::default(),
            published: Vec::new(),
        };
        let card = model_card(&record, "me/dates", "apache-2.0", &[]);
        let front = card.split("---").nth(1).expect("front matter");
        let keys: Vec<&str> = front
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(['-', ' ']))
            .map(|l| l.split(':').next().unwrap_or(l))
            .collect();
        assert_eq!(
            keys,
            [
                "base_model",
                "library_name",
                "license",
                "tags",
                "pipeline_tag"
            ]
        );
        assert!(front.contains("license: apache-2.0"), "{front}");
        assert!(
            front.contains(r#"base_model: "org/base\nlicense: stolen""#),
            "{front}"
        );
        // A plain base stays plain, as the Hub's examples write it.
        let plain = AdapterRecord {
            base_model: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
            ..record
        };
        let card = model_card(&plain, "me/dates", "mit", &["vllm: loads".into()]);
        assert!(card.contains("base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"));
        assert!(
            card.contains("## Other servers") && card.contains("\n- vllm: loads\n"),
            "{card}"
        );
    }
}
