//! The adapters a server knows by name, and the few it holds in memory: loaded on first use,
//! evicted least recently used when more than the maximum would be held (S-LoRA keeps all
//! adapters on the host and a working set on the device; here the working set is the cache).
//! An adapter that a running request uses is never evicted, and one loaded again after its
//! eviction must be the same bytes that were registered.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use ft_adapters::PeftAdapter;
use ft_model::forward::ragged::ServedAdapter;
use ft_model::LlamaForCausalLM;

use crate::error::EngineError;

/// One loaded adapter.
#[derive(Debug)]
struct Loaded<B: Backend> {
    weights: ServedAdapter<B>,
    last_used: u64,
    in_use: usize,
}

/// Known adapters (name -> folder) and the loaded ones.
#[derive(Debug)]
pub struct AdapterCache<B: Backend> {
    /// Folder, registration number and the sha256 of the files registered, of each known
    /// adapter.
    known: BTreeMap<String, (PathBuf, u64, [u8; 32])>,
    registrations: u64,
    loaded: BTreeMap<String, Loaded<B>>,
    max_loaded: usize,
    clock: u64,
    loads: u64,
}

impl<B: Backend> AdapterCache<B> {
    /// An empty cache holding at most `max_loaded` adapters in memory (at least one).
    pub fn new(max_loaded: usize) -> Self {
        Self {
            known: BTreeMap::new(),
            loaded: BTreeMap::new(),
            max_loaded: max_loaded.max(1),
            registrations: 0,
            clock: 0,
            loads: 0,
        }
    }

    /// Makes `name` servable from the PEFT folder `dir`, reading and checking it against
    /// `model` now so that a bad folder fails here and not in a request.
    pub fn register(
        &mut self,
        name: &str,
        dir: PathBuf,
        model: &LlamaForCausalLM<B>,
    ) -> Result<(), EngineError> {
        if self.known.contains_key(name) || self.loaded.contains_key(name) {
            return Err(EngineError::BadRequest(format!(
                "an adapter named {name:?} is already loaded (or still in use); unload it first"
            )));
        }
        let (weights, fingerprint) = load(&dir, model)?;
        self.registrations += 1;
        self.known
            .insert(name.to_string(), (dir, self.registrations, fingerprint));
        if self.make_room() {
            self.clock += 1;
            self.loaded.insert(
                name.to_string(),
                Loaded {
                    weights,
                    last_used: self.clock,
                    in_use: 0,
                },
            );
        }
        Ok(())
    }

    /// Forgets `name`; an adapter that running requests use stays loaded until they finish.
    pub fn unregister(&mut self, name: &str) -> Result<(), EngineError> {
        self.known
            .remove(name)
            .ok_or_else(|| EngineError::UnknownModel(name.to_string()))?;
        if self.loaded.get(name).is_some_and(|l| l.in_use == 0) {
            self.loaded.remove(name);
        }
        Ok(())
    }

    /// Names of the known adapters, sorted.
    pub fn names(&self) -> Vec<String> {
        self.known.keys().cloned().collect()
    }

    /// The number of `name`'s registration: a name registered again gets a new one.
    pub fn generation(&self, name: &str) -> Option<u64> {
        self.known.get(name).map(|(_, g, _)| *g)
    }

    /// The sha256 of each known adapter's registered files and its registration number, by
    /// name: a name registered again gets another number, and another sha256 if its files
    /// differ.
    pub fn fingerprints(&self) -> BTreeMap<String, ([u8; 32], u64)> {
        self.known
            .iter()
            .map(|(name, (_, generation, sha))| (name.clone(), (*sha, *generation)))
            .collect()
    }

    /// Whether `name` is known.
    pub fn contains(&self, name: &str) -> bool {
        self.known.contains_key(name)
    }

    /// Adapters in memory now.
    pub fn loaded(&self) -> usize {
        self.loaded.len()
    }

    /// Loads from disk since the start.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Marks `name` in use by one more request, loading it if needed. `Ok(false)` when it is
    /// not loaded and every loaded adapter is in use at the maximum: the request waits.
    pub fn acquire(
        &mut self,
        name: &str,
        model: &LlamaForCausalLM<B>,
    ) -> Result<bool, EngineError> {
        self.clock += 1;
        if let Some(l) = self.loaded.get_mut(name) {
            l.in_use += 1;
            l.last_used = self.clock;
            return Ok(true);
        }
        let (dir, _, registered) = self
            .known
            .get(name)
            .ok_or_else(|| EngineError::UnknownModel(name.to_string()))?
            .clone();
        if self.loaded.len() >= self.max_loaded && !self.make_room() {
            return Ok(false);
        }
        let (weights, fingerprint) = load(&dir, model)?;
        if fingerprint != registered {
            return Err(EngineError::Adapter(format!(
                "adapter {name}: the files in {} changed since it was loaded; load it again \
                 (POST /v1/load_lora_adapter) to serve the new ones",
                dir.display()
            )));
        }
        self.loads += 1;
        self.loaded.insert(
            name.to_string(),
            Loaded {
                weights,
                last_used: self.clock,
                in_use: 1,
            },
        );
        Ok(true)
    }

    /// One request fewer uses `name`.
    pub fn release(&mut self, name: &str) {
        if let Some(l) = self.loaded.get_mut(name) {
            l.in_use = l.in_use.saturating_sub(1);
            if l.in_use == 0 && !self.known.contains_key(name) {
                self.loaded.remove(name);
            }
        }
    }

    /// The weights of a loaded adapter.
    pub fn get(&self, name: &str) -> Option<&ServedAdapter<B>> {
        self.loaded.get(name).map(|l| &l.weights)
    }

    /// Evicts idle adapters, least recently used first, until one more fits. Whether it does.
    fn make_room(&mut self) -> bool {
        while self.loaded.len() >= self.max_loaded {
            let victim = self
                .loaded
                .iter()
                .filter(|(_, l)| l.in_use == 0)
                .min_by_key(|(_, l)| l.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(n) => {
                    self.loaded.remove(&n);
                }
                None => return false,
            }
        }
        true
    }
}

/// The adapter in `dir` checked against `model`, and the sha256 of the files read.
fn load<B: Backend>(
    dir: &std::path::Path,
    model: &LlamaForCausalLM<B>,
) -> Result<(ServedAdapter<B>, [u8; 32]), EngineError> {
    let (peft, fingerprint) =
        PeftAdapter::read_fingerprinted(dir).map_err(|e| EngineError::Adapter(e.to_string()))?;
    let weights =
        ServedAdapter::new(model, &peft, dir).map_err(|e| EngineError::Adapter(e.to_string()))?;
    Ok((weights, fingerprint))
}
