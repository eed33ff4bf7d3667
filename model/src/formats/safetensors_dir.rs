//! Reads HF checkpoints: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, in f32, f16 or bf16 (converted to f32 on load).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use ft_quant::{GgmlType, PackedWeight};

use crate::error::ModelError;
use crate::formats::bnb_read::{is_part, read_packed};
use crate::weights::{HostTensor, TensorSource};

/// Memory-mapped safetensors files of one checkpoint, indexed by tensor name.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens every `*.safetensors` file of the folder `dir` and checks their headers.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::format(
                dir,
                "no *.safetensors file in the folder",
            ));
        }
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint that ft does not modify while it is open.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::format(&path, format!("not a valid safetensors file: {e}"))
            })?;
            for name in st.names() {
                if index.insert(name.to_string(), files.len()).is_some() {
                    return Err(ModelError::format(
                        &path,
                        format!("tensor {name} appears in two shards"),
                    ));
                }
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }
}

impl TensorSource for SafetensorsDir {
    fn names(&self) -> Vec<String> {
        self.index.keys().filter(|n| !is_part(n)).cloned().collect()
    }

    fn packed(&self, name: &str) -> Result<Option<PackedWeight>, ModelError> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
        read_packed(&st, name, path)
    }

    fn location(&self) -> &Path {
        &self.dir
    }

    fn load(&self, name: &str) -> Result<HostTensor, ModelError> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::format(path, format!("not a valid safetensors file: {e}")))?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::format(path, format!("tensor {name}: {e}")))?;
        let bytes = view.data();
        let ty = match view.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::Bf16,
            other => {
                return Err(ModelError::format(
                    path,
                    format!("tensor {name} has dtype {other:?}; ft reads F32, F16 and BF16"),
                ))
            }
        };
        let elements = bytes.len() / ty.block_bytes();
        let data = ft_quant::dequantize(ty, bytes, elements)
            .map_err(|e| ModelError::format(path, format!("tensor {name}: {e}")))?;
        Ok(HostTensor::new(view.shape().to_vec(), data))
    }
}
