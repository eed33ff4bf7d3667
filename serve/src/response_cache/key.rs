//! Cache keys: the sha256 of everything that changes an answer, and the fingerprint of a
//! model's files.

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The sha256 a cached answer is stored under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Lowercase hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a key is made of.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// The route, e.g. `/v1/completions`.
    pub route: &'a str,
    /// The base model's fingerprint.
    pub model: &'a [u8; 32],
    /// The adapter's files' sha256, or `None` for the base.
    pub adapter: Option<&'a [u8; 32]>,
    /// Tokens a request may hold (prompt and output): a chat request without `max_tokens`
    /// generates up to it.
    pub context: usize,
    /// The request body, parsed.
    pub body: &'a Value,
}

impl KeyParts<'_> {
    /// The key: the same for the same parts whatever the order of the body's fields.
    pub fn key(&self) -> Key {
        let mut h = Sha256::new();
        // Another version of ft may answer or format differently.
        h.update(b"ft response cache 1 ");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update([0]);
        h.update(self.route.as_bytes());
        h.update([0]);
        h.update(self.model);
        match self.adapter {
            Some(a) => {
                h.update([1]);
                h.update(a);
            }
            None => h.update([0]),
        }
        h.update((self.context as u64).to_le_bytes());
        canonical(self.body, &mut h);
        Key(h.finalize().into())
    }
}

/// Feeds `v` to `h` with object fields in sorted order, each value tagged by its type so
/// that no two documents feed the same bytes.
fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            let text = n.to_string();
            h.update(b"#");
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        Value::String(s) => {
            h.update(b"s");
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                canonical(item, h);
            }
        }
        Value::Object(fields) => {
            let mut sorted: Vec<(&String, &Value)> = fields.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            h.update(b"{");
            h.update((sorted.len() as u64).to_le_bytes());
            for (name, value) in sorted {
                h.update((name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
                canonical(value, h);
            }
        }
    }
}

/// The sha256 of a model's files (a file, or the files directly inside a folder, by name,
/// links followed: a Hub download is a folder of links) and of `serving`, which says how
/// they are served (storage, device): the same weights served as q4 and as f32 answer
/// differently. A folder with no file is an error.
pub fn file_fingerprint(path: &Path, serving: &str) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(serving.as_bytes());
    h.update([0]);
    let files = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} holds no file",
                path.display()
            )));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut buf = vec![0u8; 1 << 20];
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        h.update(name.unwrap_or_default().as_bytes());
        h.update([0]);
        let mut f = std::fs::File::open(&file)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(route: &str, adapter: Option<&[u8; 32]>, body: Value) -> Key {
        KeyParts {
            route,
            model: &[7; 32],
            adapter,
            context: 2048,
            body: &body,
        }
        .key()
    }

    #[test]
    fn field_order_does_not_change_the_key_and_every_field_does() {
        let a = key("/v1/completions", None, json!({"prompt": "hi", "seed": 1}));
        let b = key("/v1/completions", None, json!({"seed": 1, "prompt": "hi"}));
        assert_eq!(a, b);
        for other in [
            key("/v1/completions", None, json!({"prompt": "hi", "seed": 2})),
            key(
                "/v1/completions",
                None,
                json!({"prompt": "hi", "seed": "1"}),
            ),
            key("/v1/completions", None, json!({"prompt": "hi!", "seed": 1})),
            key(
                "/v1/completions",
                None,
                json!({"prompt": "hi", "seed": 1, "max_tokens": 4}),
            ),
            key(
                "/v1/chat/completions",
                None,
                json!({"prompt": "hi", "seed": 1}),
            ),
            key(
                "/v1/completions",
                Some(&[1; 32]),
                json!({"prompt": "hi", "seed": 1}),
            ),
        ] {
            assert_ne!(a, other);
        }
        let model = KeyParts {
            route: "/v1/completions",
            model: &[8; 32],
            adapter: None,
            context: 2048,
            body: &json!({"prompt": "hi", "seed": 1}),
        };
        assert_ne!(model.key(), a, "another model");
        let context = KeyParts {
            model: &[7; 32],
            context: 1024,
            ..model
        };
        assert_ne!(context.key(), a, "another context");
        assert_ne!(
            key("/v1/completions", Some(&[1; 32]), json!({})),
            key("/v1/completions", Some(&[2; 32]), json!({})),
            "another adapter version"
        );
    }

    #[test]
    fn nesting_cannot_alias_two_bodies() {
        let a = key("/", None, json!({"a": ["b", "c"]}));
        let b = key("/", None, json!({"a": ["bc"]}));
        let c = key("/", None, json!({"a": "bc"}));
        assert_ne!(a, b);
        assert_ne!(b, c);
    }

    #[test]
    fn the_fingerprint_follows_the_bytes_and_the_serving() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.gguf");
        std::fs::write(&file, b"weights").unwrap();
        let a = file_fingerprint(&file, "q4").unwrap();
        assert_eq!(a, file_fingerprint(&file, "q4").unwrap());
        assert_ne!(a, file_fingerprint(&file, "f32").unwrap());
        std::fs::write(&file, b"weightz").unwrap();
        assert_ne!(a, file_fingerprint(&file, "q4").unwrap());
        let folder = file_fingerprint(dir.path(), "q4").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        assert_ne!(folder, file_fingerprint(dir.path(), "q4").unwrap());

        // A folder of links (as a Hub download is) hashes what they point at.
        let blobs = tempfile::tempdir().unwrap();
        let links = tempfile::tempdir().unwrap();
        std::fs::write(blobs.path().join("blob"), b"weights one").unwrap();
        std::os::unix::fs::symlink(blobs.path().join("blob"), links.path().join("model.gguf"))
            .unwrap();
        let one = file_fingerprint(links.path(), "q4").unwrap();
        std::fs::write(blobs.path().join("blob"), b"weights two").unwrap();
        assert_ne!(one, file_fingerprint(links.path(), "q4").unwrap());
        let empty = tempfile::tempdir().unwrap();
        assert!(file_fingerprint(empty.path(), "q4").is_err());
    }
}
