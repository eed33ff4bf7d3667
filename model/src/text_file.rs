//! The JSON files beside a model's weights (`config.json`, `tokenizer.json`, a shard index),
//! read only as bounded regular files: a FIFO in their place would block forever, a link to
//! `/dev/zero` would never end, and a crafted file of gigabytes would be read whole.

use std::io::Read;
use std::path::Path;

use crate::error::ModelError;

/// The most a model's `config.json`, `tokenizer_config.json` or shard index may hold.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The most a `tokenizer.json` may hold (the largest vocabularies take tens of MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// The text of `path`, a regular file of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<String, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::format(path, "is not a regular file"));
    }
    let too_big = || ModelError::format(path, format!("is more than the {limit} bytes ft reads"));
    if meta.len() > limit {
        return Err(too_big());
    }
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut text = String::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| ModelError::io(path, e))?;
    if text.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("config.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(read(&small, 2).unwrap(), "{}");
        let err = read(&small, 1).unwrap_err().to_string();
        assert!(err.contains("more than the 1 bytes"), "{err}");
        let err = read(dir.path(), 10).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        #[cfg(unix)]
        {
            let zero = dir.path().join("zero.json");
            std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
            let err = read(&zero, 10).unwrap_err().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
    }
}
