//! The offline teacher: its top-k logits at every trained position of every example, computed
//! once and reused across epochs instead of running the teacher per batch.
//!
//! The file is safetensors: `ids` `[positions, k]` (U32) and `logits` `[positions, k]` (F32,
//! raw, before temperature) in position order, and `offsets` `[examples + 1]` (U64) where
//! example i owns positions `offsets[i]..offsets[i + 1]`. The metadata records `k`, the vocab
//! size and the teacher's source, so a cache made by another teacher is refused. Writes go
//! through a temporary file and a rename.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Cache errors name the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct CacheError {
    /// The cache file.
    pub path: String,
    /// What is wrong.
    pub what: String,
}

/// Top-k teacher logits for a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKCache {
    /// Logits kept per position.
    pub k: usize,
    /// Vocabulary size of the teacher.
    pub vocab: usize,
    /// The teacher's source string.
    pub teacher: String,
    offsets: Vec<u64>,
    ids: Vec<u32>,
    logits: Vec<f32>,
}

/// The `k` largest values of `row` as `(ids, values)`, largest first (ties: lower id first).
pub fn top_k(row: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    let values = idx.iter().map(|&i| row[i as usize]).collect();
    (idx, values)
}

impl TopKCache {
    /// An empty cache.
    pub fn new(k: usize, vocab: usize, teacher: &str) -> Self {
        Self {
            k,
            vocab,
            teacher: teacher.to_string(),
            offsets: vec![0],
            ids: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// Appends one example: its positions' full logits, row-major `[positions, vocab]`.
    pub fn push_example(&mut self, logits: &[f32]) {
        for row in logits.chunks(self.vocab) {
            let (ids, values) = top_k(row, self.k);
            self.ids.extend(ids);
            self.logits.extend(values);
        }
        let positions = (self.ids.len() / self.k) as u64;
        self.offsets.push(positions);
    }

    /// Examples held.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether no example is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`: its ids and logits, each `[positions * k]` row-major.
    pub fn example(&self, i: usize) -> Option<(&[u32], &[f32])> {
        let (a, b) = (
            *self.offsets.get(i)? as usize,
            *self.offsets.get(i + 1)? as usize,
        );
        Some((
            &self.ids[a * self.k..b * self.k],
            &self.logits[a * self.k..b * self.k],
        ))
    }

    /// Writes the cache to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), CacheError> {
        let err = |what: String| CacheError {
            path: path.display().to_string(),
            what,
        };
        let positions = self.ids.len() / self.k.max(1);
        let ids: Vec<u8> = self.ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        let logits: Vec<u8> = self.logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let offsets: Vec<u8> = self.offsets.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            ("ids", Dtype::U32, vec![positions, self.k], &ids),
            ("logits", Dtype::F32, vec![positions, self.k], &logits),
            ("offsets", Dtype::U64, vec![self.offsets.len()], &offsets),
        ]
        .into_iter()
        .map(|(n, d, s, b)| TensorView::new(d, s, b).map(|v| (n.to_string(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
        let meta: HashMap<String, String> = [
            ("k".to_string(), self.k.to_string()),
            ("vocab".to_string(), self.vocab.to_string()),
            ("teacher".to_string(), self.teacher.clone()),
        ]
        .into();
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
        ft_adapters::atomic::write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
    }

    /// Reads a cache, refusing one made by another teacher or vocabulary than expected.
    pub fn read(path: &Path, teacher: &str, vocab: usize) -> Result<Self, CacheError> {
        let err = |what: String| CacheError {
            path: path.display().to_string(),
            what,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| err(format!("no {k} in the metadata")))
        };
        let k: usize = field("k")?
            .parse()
            .map_err(|_| err("k is not a number".into()))?;
        let file_vocab: usize = field("vocab")?
            .parse()
            .map_err(|_| err("vocab is not a number".into()))?;
        let file_teacher = field("teacher")?;
        if file_teacher != teacher || file_vocab != vocab {
            return Err(err(format!(
                "made by teacher {file_teacher:?} (vocab {file_vocab}), not {teacher:?} (vocab {vocab}); delete it to rebuild"
            )));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let raw = |name: &str, dtype: Dtype| -> Result<Vec<u8>, CacheError> {
            let t = st.tensor(name).map_err(|e| err(e.to_string()))?;
            if t.dtype() != dtype {
                return Err(err(format!(
                    "{name} is {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            Ok(t.data().to_vec())
        };
        let ids = raw("ids", Dtype::U32)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>();
        let logits = raw("logits", Dtype::F32)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>();
        let offsets: Vec<u64> = raw("offsets", Dtype::U64)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let positions = ids.len() / k.max(1);
        let ordered = offsets.first() == Some(&0) && offsets.windows(2).all(|w| w[0] <= w[1]);
        if !ordered
            || offsets.last().copied() != Some(positions as u64)
            || logits.len() != ids.len()
        {
            return Err(err("offsets, ids and logits do not agree".into()));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(err(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(Self {
            k,
            vocab,
            teacher: file_teacher,
            offsets,
            ids,
            logits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_in_order() {
        let (ids, values) = top_k(&[0.5, 3.0, -1.0, 3.0, 2.0], 3);
        assert_eq!(ids, vec![1, 3, 4]);
        assert_eq!(values, vec![3.0, 3.0, 2.0]);
        assert_eq!(top_k(&[1.0, 2.0], 5).0, vec![1, 0]);
    }

    #[test]
    fn a_cache_round_trips_and_refuses_another_teacher() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teacher.topk.safetensors");
        let mut cache = TopKCache::new(2, 4, "smollm2-135m-instruct");
        cache.push_example(&[0.1, 0.9, 0.3, 0.2, 5.0, 1.0, 2.0, 3.0]); // 2 positions
        cache.push_example(&[]); // an example with no trained position
        cache.push_example(&[1.0, 0.0, 0.0, 2.0]);
        cache.write(&path).unwrap();
        let read = TopKCache::read(&path, "smollm2-135m-instruct", 4).unwrap();
        assert_eq!(read, cache);
        assert_eq!(read.len(), 3);
        assert_eq!(
            read.example(0).unwrap(),
            (&[1u32, 2, 0, 3][..], &[0.9f32, 0.3, 5.0, 3.0][..])
        );
        assert_eq!(read.example(1).unwrap().0.len(), 0);
        assert_eq!(read.example(2).unwrap().0, &[3, 0]);
        let e = TopKCache::read(&path, "other", 4).unwrap_err().to_string();
        assert!(
            e.contains("made by teacher \"smollm2-135m-instruct\" (vocab 4), not \"other\""),
            "{e}"
        );
    }
}
