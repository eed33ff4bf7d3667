//! Writes GGUF v3 files: the inverse of [`super::gguf`], for exporting merged models and for
//! building test checkpoints. Written to a temporary file and renamed, so a crash never
//! leaves a half-written model behind.

use std::path::Path;

use crate::error::ModelError;
use crate::formats::gguf::GgufValue;

const ALIGNMENT: usize = 32;

/// A GGUF file under construction.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    /// (name, row-major shape, GGUF type id, raw bytes)
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of strings.
            out.extend(items.first().map_or(8, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key/value.
    pub fn metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor of row-major `shape` whose bytes are already in GGUF type `ty`.
    pub fn tensor(&mut self, name: &str, shape: Vec<usize>, ty: u32, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), shape, ty, bytes));
        self
    }

    /// Adds an f32 tensor.
    pub fn tensor_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, shape, 0, bytes)
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend(type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            shape
                .iter()
                .rev()
                .for_each(|d| out.extend((*d as u64).to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        }
        out
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        write_atomic(path, &self.to_bytes())
    }
}

/// Writes `bytes` to `path` atomically ([`ft_adapters::atomic::write_atomic`]), the error naming
/// the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    ft_adapters::atomic::write_atomic(path, bytes).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    #[test]
    fn every_value_type_round_trips() {
        let values = [
            ("u8", GgufValue::U8(200)),
            ("i8", GgufValue::I8(-5)),
            ("u16", GgufValue::U16(60_000)),
            ("i16", GgufValue::I16(-30_000)),
            ("u32", GgufValue::U32(4_000_000_000)),
            ("i32", GgufValue::I32(-2_000_000_000)),
            ("f32", GgufValue::F32(1.5)),
            ("bool", GgufValue::Bool(true)),
            ("string", GgufValue::String("héllo".into())),
            (
                "array",
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]),
            ),
            (
                "strings",
                GgufValue::Array(vec![GgufValue::String("a b".into())]),
            ),
            ("u64", GgufValue::U64(u64::MAX)),
            ("i64", GgufValue::I64(i64::MIN)),
            ("f64", GgufValue::F64(-0.25)),
        ];
        let mut w = GgufWriter::new();
        for (k, v) in &values {
            w.metadata(k, v.clone());
        }
        w.tensor_f32("t", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        w.write(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        for (k, v) in &values {
            assert_eq!(&f.metadata[*k], v, "{k}");
        }
        let t = f.tensor_f32("t").unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn truncation_and_bad_magic_are_errors_not_panics() {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("llama".into()));
        // 8 floats fill the 32-byte alignment, so every shorter prefix is truncated.
        w.tensor_f32("t", vec![8], &[1.0; 8]);
        let bytes = w.to_bytes();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = GgufFile::open(&path).unwrap_err().to_string();
            assert!(err.contains("x.gguf"), "cut {cut}: {err}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        assert!(GgufFile::open(&path)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file"));
    }
}
