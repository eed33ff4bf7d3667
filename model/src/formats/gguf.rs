//! GGUF v3 reader: typed metadata and memory-mapped tensors.
//!
//! Layout (ggml's `docs/gguf.md`): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/values, the tensor infos (name, dims stored innermost first, type,
//! offset), padding to `general.alignment` (default 32), then the tensor data. Every read is
//! bounds-checked, so a truncated or corrupted file is an error naming the file, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ft_quant::packed::PackedData;
use ft_quant::{GgmlType, PackedWeight};
use memmap2::Mmap;

use crate::error::ModelError;
use crate::weights::{HostTensor, TensorSource};

/// One metadata value of any GGUF type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: values of one element type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is any integer type holding one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric. An f32 becomes the f64 of its shortest decimal
    /// form (1e-5 stays 1e-5, not 9.99999974e-6), the value the converter was given.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.to_string().parse().unwrap_or(v.into())),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// Dimensions in row-major order (outermost first), i.e. reversed from the file.
    pub shape: Vec<usize>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

/// An opened GGUF file: parsed metadata and tensor index over a memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Metadata key/values in key order.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor index by GGUF name (`blk.0.attn_q.weight`).
    pub tensors: BTreeMap<String, GgufTensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, {} tensors)",
            self.path.display(),
            self.tensors.len()
        )
    }
}

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bound on counts and string lengths read from the header, so that a corrupted length
/// fails as "corrupted" instead of trying to allocate terabytes.
const MAX_ITEMS: u64 = 1 << 28;

/// Memory the metadata may take in all: four times the file's length and 64 MiB. A value
/// takes more memory than file (an array item of one byte becomes a 32-byte value), so a
/// crafted file of byte arrays could otherwise ask for 32 times its length.
fn metadata_budget(file_len: usize) -> usize {
    file_len.saturating_mul(4).saturating_add(64 << 20)
}

/// A bounds-checked little-endian cursor over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Memory the metadata parsed so far takes.
    spent: usize,
}

impl<'a> Cursor<'a> {
    fn fault(&self, what: String) -> ModelError {
        ModelError::Format {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            self.fault(format!(
                "truncated: {what} needs {n} bytes at offset {}, file has {}",
                self.pos,
                self.bytes.len()
            ))
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// Bytes not read yet.
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64, ModelError> {
        let n = self.u64(what)?;
        if n > MAX_ITEMS {
            return Err(self.fault(format!("corrupted: {what} is {n}")));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.count(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.fault(format!("corrupted: {what} is not UTF-8")))
    }

    /// Counts `bytes` more of the metadata's memory against [`metadata_budget`].
    fn spend(&mut self, bytes: usize, key: &str) -> Result<(), ModelError> {
        self.spent = self.spent.saturating_add(bytes);
        let budget = metadata_budget(self.bytes.len());
        if self.spent > budget {
            return Err(self.fault(format!(
                "corrupted: the metadata up to {key} would take more than {budget} bytes of \
                 memory for a file of {} bytes",
                self.bytes.len()
            )));
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue, ModelError> {
        self.spend(std::mem::size_of::<GgufValue>(), key)?;
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.fault(format!("corrupted: bool {key} has byte {b}"))),
            },
            8 => {
                let s = self.string(key)?;
                self.spend(s.len(), key)?;
                GgufValue::String(s)
            }
            9 => {
                let elem = self.u32(key)?;
                if elem == 9 {
                    return Err(self.fault(format!("nested arrays in {key} are not supported")));
                }
                let n = self.count(key)?;
                // Every item takes at least a byte of the file, and a value's memory of the
                // budget: reserve no more than either allows.
                let left = metadata_budget(self.bytes.len()).saturating_sub(self.spent)
                    / std::mem::size_of::<GgufValue>();
                let cap = n.min(self.remaining() as u64).min(left as u64);
                let mut items = Vec::with_capacity(cap as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.fault(format!("corrupted: {key} has unknown value type {other}")))
            }
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; ft never writes to a model file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
            spent: 0,
        };
        let magic = c.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(c.fault(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.fault(format!(
                "unsupported GGUF version {version} (ft reads 2 and 3)"
            )));
        }
        let n_tensors = c.count("tensor count")?;
        let n_kv = c.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| c.fault(format!("general.alignment {v:?} is not a power of two")))?,
            None => DEFAULT_ALIGNMENT,
        };
        // A tensor's entry takes at least 24 bytes (name length, dimensions, type, offset).
        let mut infos = Vec::with_capacity(n_tensors.min(c.remaining() as u64 / 24) as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.fault(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                shape.push(c.count(&name)? as usize);
            }
            shape.reverse();
            let ty_id = c.u32(&name)?;
            let ty = GgmlType::from_id(ty_id).map_err(|_| ModelError::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                ty: ty_id,
            })?;
            let offset = c.u64(&name)?;
            infos.push((name, shape, ty, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, ty, offset) in infos {
            let elements = shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                // No type packs more than 8 elements in a byte: a tensor the file cannot
                // hold is refused before its size is computed in bytes.
                .filter(|&n| n / 8 <= mmap.len())
                .ok_or_else(|| {
                    c.fault(format!(
                        "corrupted: tensor {name} has shape {shape:?}, more than the file holds"
                    ))
                })?;
            let len = ty
                .bytes_for(elements)
                .map_err(|e| c.fault(format!("tensor {name}: {e}")))?;
            let start = data_start
                .checked_add(offset)
                .and_then(|s| usize::try_from(s).ok())
                .filter(|s| s.checked_add(len).is_some_and(|end| end <= mmap.len()))
                .ok_or_else(|| {
                    c.fault(format!(
                        "truncated: tensor {name} ({len} bytes at data offset {offset}) ends past the end of the file ({} bytes)",
                        mmap.len()
                    ))
                })?;
            tensors.insert(
                name,
                GgufTensorInfo {
                    shape,
                    ty,
                    start,
                    len,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&GgufValue, ModelError> {
        self.metadata.get(key).ok_or_else(|| ModelError::Format {
            path: self.path.clone(),
            what: format!("metadata key {key} is missing"),
        })
    }

    /// An integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, ModelError> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.bad_type(key, "an integer", v))
    }

    /// A float metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| self.bad_type(key, "a number", v))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, ModelError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| self.bad_type(key, "a string", v))
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue], ModelError> {
        let v = self.get(key)?;
        v.as_array()
            .ok_or_else(|| self.bad_type(key, "an array", v))
    }

    fn bad_type(&self, key: &str, expected: &str, v: &GgufValue) -> ModelError {
        let found = format!("{v:?}");
        let found: String = found.chars().take(60).collect();
        ModelError::Format {
            path: self.path.clone(),
            what: format!("metadata key {key} should be {expected}, found {found}"),
        }
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// Dequantizes the tensor `name` (GGUF name) to f32 in row-major order.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor, ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let elements = info.shape.iter().product();
        let data =
            ft_quant::dequantize(info.ty, self.tensor_bytes(info), elements).map_err(|e| {
                ModelError::Format {
                    path: self.path.clone(),
                    what: format!("tensor {name}: {e}"),
                }
            })?;
        Ok(HostTensor::new(info.shape.clone(), data))
    }
}

/// Maps GGUF tensor names of llama-family models to HF checkpoint names, and undoes
/// llama.cpp's q/k row permutation so that HF RoPE and PEFT adapters apply unchanged.
pub struct GgufTensors {
    file: GgufFile,
    /// (query heads, key/value heads) when q/k rows are stored permuted (arch `llama`).
    permuted_heads: Option<(usize, usize)>,
    /// HF name -> GGUF name.
    names: BTreeMap<String, String>,
}

impl GgufTensors {
    /// Wraps an opened file. `permuted_heads` is (query heads, key/value heads) for files whose
    /// q/k rows llama.cpp's converter permuted (the `llama` architecture; not `qwen2`).
    pub fn new(file: GgufFile, permuted_heads: Option<(usize, usize)>) -> Result<Self, ModelError> {
        let mut names = BTreeMap::new();
        for gguf in file.tensors.keys() {
            let hf = hf_name(gguf).ok_or_else(|| ModelError::Format {
                path: file.path.clone(),
                what: format!("unexpected tensor {gguf} for a llama-family model"),
            })?;
            names.insert(hf, gguf.clone());
        }
        Ok(Self {
            file,
            permuted_heads,
            names,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The head count of `name` when its rows are stored permuted: llama.cpp's convert script
    /// permutes q/k (weights and biases) into interleaved pairs.
    fn q_k_heads(&self, name: &str) -> Option<usize> {
        self.permuted_heads.and_then(|(n_head, n_kv_head)| {
            if name.contains("self_attn.q_proj.") {
                Some(n_head)
            } else if name.contains("self_attn.k_proj.") {
                Some(n_kv_head)
            } else {
                None
            }
        })
    }
}

impl TensorSource for GgufTensors {
    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn location(&self) -> &Path {
        self.file.path()
    }

    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let gguf = self
            .names
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.file.path.clone(),
                tensor: name.to_string(),
            })?;
        let tensor = self.file.tensor_f32(gguf)?;
        Ok(match self.q_k_heads(name) {
            Some(h) => unpermute_rows(tensor, h),
            None => tensor,
        })
    }

    fn blocks(&self, name: &str) -> Result<Option<PackedWeight>, ModelError> {
        let Some(info) = self.names.get(name).and_then(|g| self.file.tensors.get(g)) else {
            return Ok(None);
        };
        let &[rows, cols] = info.shape.as_slice() else {
            return Ok(None);
        };
        // Rows must be whole blocks for the kernels (and for moving q/k rows as bytes).
        if !ft_quant::matvec::supports(info.ty) || !cols.is_multiple_of(ft_quant::matvec::BLOCK) {
            return Ok(None);
        }
        let bytes = self.file.tensor_bytes(info);
        let expected = info
            .ty
            .bytes_for(rows * cols)
            .map_err(|e| ModelError::Format {
                path: self.file.path.clone(),
                what: format!("tensor {name}: {e}"),
            })?;
        if bytes.len() != expected {
            return Err(ModelError::Format {
                path: self.file.path.clone(),
                what: format!("tensor {name}: {} bytes, expected {expected}", bytes.len()),
            });
        }
        let bytes = match self.q_k_heads(name) {
            Some(h) => reorder(bytes, rows, h, |hf, gguf| (hf, gguf)),
            None => bytes.to_vec(),
        };
        Ok(Some(PackedWeight {
            shape: [rows, cols],
            data: PackedData::Blocks {
                ty: info.ty,
                bytes,
                tiles: Default::default(),
            },
        }))
    }
}

/// GGUF module names of a decoder layer and their HF names.
const LAYER_MODULES: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// GGUF and HF names of the tensors outside the layers.
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF checkpoint name of a GGUF tensor of a llama-family model.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_TENSORS.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, hf) = LAYER_MODULES.iter().find(|(g, _)| *g == module)?;
    (kind == "weight" || kind == "bias").then(|| format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The GGUF name of an HF checkpoint tensor of a llama-family model.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (g, _) = LAYER_MODULES.iter().find(|(_, h)| *h == module)?;
    (kind == "weight" || kind == "bias").then(|| format!("blk.{layer}.{g}.{kind}"))
}

/// Puts q/k rows from HF's half-split order into llama.cpp's interleaved order (what
/// `convert_hf_to_gguf.py` does): GGUF row 2i = HF row i, GGUF row 2i + 1 = HF row i + d/2.
pub fn permute_rows(t: HostTensor, heads: usize) -> HostTensor {
    reorder_rows(t, heads, |hf, gguf| (gguf, hf))
}

/// [`permute_rows`] on a matrix of `rows` rows stored as ggml blocks (`bytes`, rows in
/// order): the blocks of a row move with it.
pub fn permute_block_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    reorder(bytes, rows, heads, |hf, gguf| (gguf, hf))
}

/// Puts q/k rows from llama.cpp's interleaved order back into HF's half-split order:
/// within each head of d rows, HF row i = GGUF row 2i and HF row i + d/2 = GGUF row 2i + 1.
pub fn unpermute_rows(t: HostTensor, heads: usize) -> HostTensor {
    reorder_rows(t, heads, |hf, gguf| (hf, gguf))
}

/// Copies rows within each head: `pick(hf_row, gguf_row)` returns (destination, source).
fn reorder_rows(
    t: HostTensor,
    heads: usize,
    pick: impl Fn(usize, usize) -> (usize, usize),
) -> HostTensor {
    let data = reorder(&t.data, t.shape[0], heads, pick);
    HostTensor::new(t.shape, data)
}

/// `data` as `rows` equal rows, reordered within each head as [`reorder_rows`] does; rows may
/// be f32 values or the bytes of ggml blocks.
fn reorder<T: Copy + Default>(
    data: &[T],
    rows: usize,
    heads: usize,
    pick: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<T> {
    let cols = data.len() / rows.max(1);
    let d = rows / heads;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for (hf_row, gguf_row) in [(i, 2 * i), (i + d / 2, 2 * i + 1)] {
                let (dst_row, src_row) = pick(hf_row, gguf_row);
                let src = (h * d + src_row) * cols;
                let dst = (h * d + dst_row) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: the header's counts, then `body` (metadata and tensor entries).
    fn crafted(n_tensors: u64, n_kv: u64, body: &[u8]) -> tempfile::NamedTempFile {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(n_tensors.to_le_bytes());
        bytes.extend(n_kv.to_le_bytes());
        bytes.extend(body);
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), bytes).expect("written");
        file
    }

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    }

    fn refused(file: &tempfile::NamedTempFile, needle: &str) {
        let err = GgufFile::open(file.path())
            .err()
            .unwrap_or_else(|| panic!("accepted; expected {needle}"))
            .to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn crafted_counts_and_sizes_are_errors_not_panics_or_huge_allocations() {
        // A tensor of 2^54 elements, and one of four dimensions of 2^27 whose product
        // overflows.
        let mut body = string("w");
        body.extend(2u32.to_le_bytes());
        body.extend((1u64 << 27).to_le_bytes());
        body.extend((1u64 << 27).to_le_bytes());
        body.extend(0u32.to_le_bytes()); // f32
        body.extend(0u64.to_le_bytes());
        let mut four = string("w");
        four.extend(4u32.to_le_bytes());
        for _ in 0..4 {
            four.extend((1u64 << 27).to_le_bytes());
        }
        four.extend(0u32.to_le_bytes());
        four.extend(0u64.to_le_bytes());
        refused(&crafted(1, 0, &body), "more than the file holds");
        refused(&crafted(1, 0, &four), "more than the file holds");
        // Absurd tensor and metadata counts in a file of a few bytes: refused at once.
        refused(&crafted(1 << 27, 0, &[]), "truncated");
        refused(&crafted(0, 1 << 27, &[]), "truncated");
        // A metadata array claiming 2^27 items with none present.
        let mut array = string("tokenizer.ggml.tokens");
        array.extend(9u32.to_le_bytes());
        array.extend(8u32.to_le_bytes());
        array.extend((1u64 << 27).to_le_bytes());
        refused(&crafted(0, 1, &array), "truncated");
        // 3 million one-byte items, all present: 96 MB as values, over the budget of a 3 MB
        // file (76 MB), refused before it is spent.
        let n = 3_000_000u64;
        let mut bytes = string("general.bytes");
        bytes.extend(9u32.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(n.to_le_bytes());
        bytes.resize(bytes.len() + n as usize, 7);
        refused(&crafted(0, 1, &bytes), "bytes of memory");
    }

    #[test]
    fn unpermute_matches_hf_order() {
        // One head of 4 rows: GGUF order [r0 r2 r1 r3] in HF terms means HF row 0 = GGUF 0,
        // HF 1 = GGUF 2, HF 2 = GGUF 1, HF 3 = GGUF 3.
        let t = HostTensor::new(vec![4, 1], vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(unpermute_rows(t.clone(), 1).data, vec![0.0, 2.0, 1.0, 3.0]);
        let two_heads = HostTensor::new(vec![8, 2], (0..16).map(|v| v as f32).collect());
        assert_eq!(
            unpermute_rows(permute_rows(two_heads.clone(), 2), 2),
            two_heads
        );
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        for hf in [
            "model.layers.3.self_attn.o_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(hf).unwrap()).as_deref(), Some(hf));
        }
    }
}
