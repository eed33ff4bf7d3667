//! Datasets on the Hugging Face Hub as training data: `hf:datasets/OWNER/NAME[@REVISION][#SPLIT]`
//! names the Parquet files of one split (default `train`) in the layouts the `datasets`
//! library writes and the Hub's Parquet conversion serves (`data/train-00000-of-00002.parquet`,
//! `default/train/0000.parquet`, `train.parquet`). Files come from the local Hugging Face cache
//! (`$HF_HOME/hub`, as models do), fetched into it first when the revision is not there.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use super::DataError;

/// The prefix of a Hub dataset source.
pub const PREFIX: &str = "hf:datasets/";

/// A dataset source, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDataset {
    /// `OWNER/NAME`.
    pub id: String,
    /// A branch, tag or commit.
    pub revision: String,
    /// The split whose files are read.
    pub split: String,
}

impl HubDataset {
    /// Parses `hf:datasets/OWNER/NAME[@REVISION][#SPLIT]`; `None` when `source` is not one.
    pub fn parse(source: &str) -> Option<Result<Self, DataError>> {
        let spec = source.strip_prefix(PREFIX)?;
        let (spec, split) = spec.split_once('#').unwrap_or((spec, "train"));
        let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let parts: Vec<&str> = id.split('/').collect();
        let ok = parts.len() == 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && *p != "." && *p != "..")
            && !revision.is_empty()
            && !split.is_empty()
            && !split.contains(['/', '\\']);
        Some(if ok {
            Ok(Self {
                id: id.into(),
                revision: revision.into(),
                split: split.into(),
            })
        } else {
            Err(DataError(format!(
                "{source}: expected hf:datasets/OWNER/NAME, optionally @REVISION and #SPLIT"
            )))
        })
    }

    /// The split's Parquet files, in order, from the cache (fetched into it when missing).
    pub fn files(&self) -> Result<Vec<PathBuf>, DataError> {
        let cache = Cache::from_env();
        if let Some(snapshot) = self.snapshot(cache.path()) {
            let files = split_files(&snapshot, &self.split)?;
            if !files.is_empty() {
                return Ok(files);
            }
        }
        self.fetch()?;
        let snapshot = self.snapshot(cache.path()).ok_or_else(|| {
            DataError(format!(
                "{self}: fetched, but not found in {}",
                cache.path().display()
            ))
        })?;
        let files = split_files(&snapshot, &self.split)?;
        if files.is_empty() {
            return Err(DataError(format!(
                "{self}: no Parquet files of the split {:?} in {}",
                self.split,
                snapshot.display()
            )));
        }
        Ok(files)
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.id.clone(), RepoType::Dataset, self.revision.clone())
    }

    /// The cached snapshot of the revision: the commit its ref names, or the commit itself.
    fn snapshot(&self, cache: &Path) -> Option<PathBuf> {
        let folder = cache.join(self.repo().folder_name());
        let commit = match std::fs::read_to_string(folder.join("refs").join(&self.revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) => self.revision.clone(),
        };
        let snapshot = folder.join("snapshots").join(commit);
        snapshot.is_dir().then_some(snapshot)
    }

    /// Downloads the split's Parquet files into the cache.
    fn fetch(&self) -> Result<(), DataError> {
        let hub = |e: hf_hub::api::sync::ApiError| {
            DataError(format!(
                "{self}: not in the local Hugging Face cache, and fetching it failed ({e}); \
                 check the name, HF_TOKEN and network, or give a local file"
            ))
        };
        let api = ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(hub)?;
        let repo = api.repo(self.repo());
        let info = repo.info().map_err(hub)?;
        for sibling in info
            .siblings
            .iter()
            .filter(|s| in_split(Path::new(&s.rfilename), &self.split))
        {
            repo.get(&sibling.rfilename).map_err(hub)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for HubDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}@{}#{}", self.id, self.revision, self.split)
    }
}

/// Whether a Parquet file at `rel` (in the dataset) belongs to `split`: a folder of that name
/// on its path, or a file name that is the split or starts with it and a dash.
fn in_split(rel: &Path, split: &str) -> bool {
    let parquet = rel.extension().is_some_and(|x| x == "parquet");
    let stem = rel.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let folder = rel
        .parent()
        .is_some_and(|p| p.components().any(|c| c.as_os_str() == split));
    parquet && (folder || stem == split || stem.starts_with(&format!("{split}-")))
}

/// The Parquet files of `split` under `snapshot`, sorted by path.
fn split_files(snapshot: &Path, split: &str) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![snapshot.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| DataError(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(|e| DataError(format!("{}: {e}", dir.display())))?
                .path();
            if path.is_dir() {
                stack.push(path);
            } else if in_split(path.strip_prefix(snapshot).unwrap_or(&path), split) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_their_defaults() {
        let d = HubDataset::parse("hf:datasets/me/dates").unwrap().unwrap();
        assert_eq!(
            (d.id.as_str(), d.revision.as_str(), d.split.as_str()),
            ("me/dates", "main", "train")
        );
        let d = HubDataset::parse("hf:datasets/me/dates@v1#validation")
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.revision.as_str(), d.split.as_str()),
            ("v1", "validation")
        );
        assert!(HubDataset::parse("data/train.jsonl").is_none());
        for bad in [
            "hf:datasets/me",
            "hf:datasets/me/../x",
            "hf:datasets/a/b#",
            "hf:datasets/a/b#x/y",
        ] {
            let err = HubDataset::parse(bad).unwrap().unwrap_err().to_string();
            assert!(
                err.contains("expected hf:datasets/OWNER/NAME"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_datasets_layouts_pick_their_split() {
        for (path, split, yes) in [
            ("data/train-00000-of-00002.parquet", "train", true),
            ("data/test-00000-of-00001.parquet", "train", false),
            ("default/train/0000.parquet", "train", true),
            ("default/validation/0000.parquet", "train", false),
            ("train.parquet", "train", true),
            ("data/train-00000-of-00001.arrow", "train", false),
            ("trainer-00000.parquet", "train", false),
        ] {
            assert_eq!(in_split(Path::new(path), split), yes, "{path}");
        }
    }
}
