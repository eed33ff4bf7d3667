//! The response cache: a request whose answer its inputs fix (greedy decoding, beam search, or
//! a seed of its own) is answered again with the bytes sent the first time, without the
//! engine. The key covers everything that changes the answer: the route, the base model's
//! weights and the storage they are served in, the adapter's files, and every field of the
//! request body. The store is in memory (least recently used out past a byte budget) or a
//! Redis that several servers can share; a Redis that cannot be reached is a miss, never an
//! error.

mod key;
mod memory;
mod redis_store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use key::{file_fingerprint, Key, KeyParts};
use memory::Memory;
use redis_store::RedisStore;

/// Where answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStore {
    /// In this process, at most this many bytes of answers.
    Memory {
        /// The budget.
        bytes: usize,
    },
    /// In the Redis at `redis://HOST:PORT[/DB]`.
    Redis {
        /// Its URL.
        url: String,
    },
}

/// The cache a server keeps, and what identifies its base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The store.
    pub store: CacheStore,
    /// How long an answer stays; `None` keeps it until evicted.
    pub ttl: Option<Duration>,
    /// The sha256 of the base model's files and of how they are served (see
    /// [`file_fingerprint`]).
    pub model: [u8; 32],
}

/// An answer as it was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cached {
    /// A whole JSON body.
    Whole(String),
    /// The `data` of each server-sent event, `[DONE]` included.
    Events(Vec<String>),
}

impl Cached {
    /// Bytes it holds, for the memory budget.
    fn size(&self) -> usize {
        match self {
            Self::Whole(body) => body.len(),
            Self::Events(events) => events.iter().map(|e| e.len() + 24).sum(),
        }
    }
}

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The Redis URL is malformed, or the server did not answer.
    #[error("the response cache at {url}: {message}")]
    Redis {
        /// The URL, without its password.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Counts since the start.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Answers found.
    pub hits: AtomicU64,
    /// Cacheable requests not found.
    pub misses: AtomicU64,
    /// Answers stored.
    pub stores: AtomicU64,
    /// Reads and writes the store failed (Redis away); each read counted as a miss too.
    pub errors: AtomicU64,
}

enum Store {
    Memory(Mutex<Memory>),
    Redis(RedisStore),
}

/// A store of answers with its counters.
pub struct ResponseCache {
    store: Store,
    ttl: Option<Duration>,
    model: [u8; 32],
    stats: CacheStats,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        };
        f.debug_struct("ResponseCache")
            .field("store", &kind)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl ResponseCache {
    /// Opens the store `config` names; a Redis must answer now.
    pub async fn open(config: &CacheConfig) -> Result<Arc<Self>, CacheError> {
        let store = match &config.store {
            CacheStore::Memory { bytes } => Store::Memory(Mutex::new(Memory::new(*bytes))),
            CacheStore::Redis { url } => Store::Redis(RedisStore::connect(url).await?),
        };
        Ok(Arc::new(Self {
            store,
            ttl: config.ttl,
            model: config.model,
            stats: CacheStats::default(),
        }))
    }

    /// The base model's fingerprint, for keys.
    pub fn model(&self) -> &[u8; 32] {
        &self.model
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes held in memory (0 for Redis, which reports its own).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Memory(m) => m.lock().map_or(0, |m| m.bytes()),
            Store::Redis(_) => 0,
        }
    }

    /// The answer stored under `key`, counting a hit or a miss.
    pub async fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        let found = match &self.store {
            Store::Memory(m) => m.lock().ok().and_then(|mut m| m.get(key, self.ttl)),
            Store::Redis(r) => match r.get(key).await {
                Ok(found) => found.map(Arc::new),
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("response cache read: {e}");
                    None
                }
            },
        };
        let counter = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores `value` under `key`; a store that fails is counted and logged, and the answer
    /// simply stays uncached.
    pub async fn put(&self, key: &Key, value: Cached) {
        let stored = match &self.store {
            Store::Memory(m) => m.lock().is_ok_and(|mut m| m.put(*key, value)),
            Store::Redis(r) => match r.put(key, &value, self.ttl).await {
                Ok(()) => true,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("response cache write: {e}");
                    false
                }
            },
        };
        if stored {
            self.stats.stores.fetch_add(1, Ordering::Relaxed);
        }
    }
}
