//! The routes around generation: models, adapter load and unload, health and metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use ft_adapters::peft::{read_bounded, CONFIG_FILE, MAX_WEIGHTS_BYTES, WEIGHTS_FILE};
use ft_adapters::registry::{parse_ref, safe_relative, sha256_hex, Registry};
use ft_adapters::AdapterError;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::completions::parse;
use super::worker::Command;
use super::{ApiError, AppState};

/// `GET /health`.
pub(super) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics`.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let live = state.live.lock().map(|l| *l).unwrap_or_default();
    let text = state
        .metrics
        .lock()
        .map(|m| m.render(&live, state.cache.as_deref()))
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// `GET /v1/models`: the base, then each adapter with the base as its parent.
pub(super) async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let (reply, names) = oneshot::channel();
    state.send(Command::Adapters { reply })?;
    let names = names
        .await
        .map_err(|_| ApiError::internal("the engine has stopped"))?;
    let base = &state.config.model_id;
    let entry = |id: &str, parent: Option<&str>| json!({"id": id, "object": "model", "created": 0, "owned_by": "ft", "root": base, "parent": parent});
    let mut data = vec![entry(base, None)];
    data.extend(names.iter().map(|n| entry(n, Some(base))));
    data.extend(state.config.cascades.iter().map(|c| entry(&c.name, None)));
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Deserialize)]
struct LoadAdapter {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadAdapter {
    lora_name: String,
}

/// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`: a folder inside an allowed
/// folder, or `registry:NAME[:VERSION]` from the registry.
pub(super) async fn load_adapter(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: LoadAdapter = parse(&body)?;
    ft_adapters::registry::validate_name(&req.lora_name)
        .map_err(|e| ApiError::bad_request(format!("lora_name: {e}")))?;
    if req.lora_name == state.config.model_id {
        return Err(ApiError::bad_request(
            "lora_name: that is the base model's name",
        ));
    }
    let dir = resolve(&state, &req.lora_path)?;
    let (reply, done) = oneshot::channel();
    state.send(Command::Load {
        name: req.lora_name.clone(),
        dir,
        reply,
    })?;
    done.await
        .map_err(|_| ApiError::internal("the engine has stopped"))??;
    Ok(Json(json!({"loaded": req.lora_name})))
}

/// `POST /v1/unload_lora_adapter` `{"lora_name"}`.
pub(super) async fn unload_adapter(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UnloadAdapter = parse(&body)?;
    let (reply, done) = oneshot::channel();
    state.send(Command::Unload {
        name: req.lora_name.clone(),
        reply,
    })?;
    done.await
        .map_err(|_| ApiError::internal("the engine has stopped"))??;
    Ok(Json(json!({"unloaded": req.lora_name})))
}

/// The folder `lora_path` names, if the server may load it.
fn resolve(state: &AppState, lora_path: &str) -> Result<PathBuf, ApiError> {
    if let Some(reference) = lora_path.strip_prefix("registry:") {
        let root = state.config.registry.as_deref().ok_or_else(|| {
            ApiError::bad_request("lora_path: this server was started without --registry")
        })?;
        return registry_adapter(root, reference)
            .map_err(|e| ApiError::bad_request(format!("lora_path: {e}")));
    }
    // A missing path and a disallowed one get the same answer, so the server tells a client
    // nothing about files outside the folders it allows.
    let refused = || {
        ApiError::bad_request(format!(
            "lora_path: {lora_path} is not an existing folder inside a folder the server allows \
             (--allowed-adapter-dir), nor registry:NAME"
        ))
    };
    let allowed: Vec<PathBuf> = state
        .config
        .allowed_adapter_dirs
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let inside = |p: &Path| allowed.iter().any(|d| p.starts_with(d));
    let path = Path::new(lora_path).canonicalize().map_err(|_| refused())?;
    if !inside(&path) {
        return Err(refused());
    }
    // The files too: a link inside an allowed folder to a file outside it is refused.
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        if let Ok(target) = path.join(file).canonicalize() {
            if !inside(&target) {
                return Err(refused());
            }
        }
    }
    Ok(path)
}

/// The PEFT folder of registry adapter `reference` (`NAME[:VERSION]`) under the registry's
/// `served/` folder. The folder is named by the version's content (the sha256 of its files'
/// hashes), so no other content is ever served under its name, and its files are checked
/// against the registry's hashes each time it is resolved: a changed or missing file is
/// exported again.
pub fn registry_adapter(root: &Path, reference: &str) -> Result<PathBuf, AdapterError> {
    let (name, version) = parse_ref(reference)?;
    let registry = Registry::open(root)?;
    let record = registry.get(&name, version)?;
    let listing: String = record
        .files
        .iter()
        .map(|(file, hex)| format!("{file} {hex}\n"))
        .collect();
    let dir = root.join("served").join(sha256_hex(listing.as_bytes()));
    let mut intact = true;
    for (file, hex) in &record.files {
        let path = dir.join(safe_relative(file)?);
        // Read as the engine will read it: a regular file of bounded size.
        intact &= read_bounded(&path, MAX_WEIGHTS_BYTES).is_ok_and(|b| sha256_hex(&b) == *hex);
    }
    if !intact {
        registry.export(&record, &dir)?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ft_adapters::peft::{LoraWeights, Matrix, PeftAdapter, PeftConfig, WEIGHTS_FILE};
    use ft_adapters::registry::AddInfo;

    use super::*;

    fn adapter(dir: &Path, seed: f32) {
        let config: PeftConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]
        }))
        .expect("a valid config");
        let m = |shape: [usize; 2]| Matrix {
            shape,
            data: (0..shape[0] * shape[1]).map(|i| i as f32 * seed).collect(),
        };
        let w = LoraWeights {
            a: m([1, 4]),
            b: m([4, 1]),
        };
        let modules = BTreeMap::from([("model.layers.0.self_attn.q_proj".to_string(), w)]);
        PeftAdapter { config, modules }.write(dir).expect("written");
    }

    #[test]
    fn a_served_folder_is_its_content_and_is_checked_each_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b, root) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("reg"),
        );
        adapter(&a, 0.5);
        adapter(&b, 0.25);
        let mut registry = Registry::open(&root).expect("registry");
        registry.add(&a, "x", AddInfo::default()).expect("added");
        let served = registry_adapter(&root, "x").expect("resolved");
        let read = |d: &Path| PeftAdapter::read(d).expect("readable");
        assert_eq!(read(&served), read(&a));
        // Bytes changed in the served folder are put back.
        let weights = served.join(WEIGHTS_FILE);
        let mut bytes = std::fs::read(&weights).expect("weights");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&weights, bytes).expect("tampered");
        assert_eq!(registry_adapter(&root, "x").expect("resolved"), served);
        assert_eq!(read(&served), read(&a));
        // Removed and added again with other weights: another folder, the new weights.
        registry.remove("x", None).expect("removed");
        registry.add(&b, "x", AddInfo::default()).expect("added");
        let again = registry_adapter(&root, "x").expect("resolved");
        assert_ne!(again, served);
        assert_eq!(read(&again), read(&b));
    }
}
