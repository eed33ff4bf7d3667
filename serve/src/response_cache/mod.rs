//! The response cache: a request whose answer its inputs fix (greedy decoding, beam search, or
//! a seed of its own) is answered again with the bytes sent the first time, without the
//! engine. The key covers everything that changes the answer: the route, the base model's
//! weights and the storage they are served in, the adapter's files, and every field of the
//! request body. The store is in memory (least recently used out past a byte budget) or a
//! Redis that several servers can share; a Redis that cannot be reached is a miss, never an
//! error. A request that arrives while the same request is being answered waits for that
//! answer instead of generating it again ([`Flight`]).

mod key;
mod memory;
mod redis_store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

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
    /// Hits that waited for the same request in flight instead of generating it.
    pub coalesced: AtomicU64,
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
    /// Keys being answered now; each channel closes when its answer is stored or abandoned.
    in_flight: Mutex<HashMap<Key, watch::Receiver<()>>>,
}

/// What a request that missed does: answer it (and release the waiters when done), or wait
/// for the same request in flight.
pub enum Claim {
    /// Nobody is answering this key: answer it, holding the flight until stored.
    Answer(Flight),
    /// Someone is: this closes when they stored the answer or gave up.
    Wait(watch::Receiver<()>),
}

/// A key being answered; dropping it releases the requests that wait for it.
pub struct Flight {
    cache: Arc<ResponseCache>,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Ok(mut f) = self.cache.in_flight.lock() {
            f.remove(&self.key);
        }
    }
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
            in_flight: Mutex::new(HashMap::new()),
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

    /// The answer stored under `key`, if any (counted by [`Self::count`]).
    pub async fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        match &self.store {
            Store::Memory(m) => m.lock().ok().and_then(|mut m| m.get(key, self.ttl)),
            Store::Redis(r) => match r.get(key).await {
                Ok(found) => found.map(Arc::new),
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("response cache read: {e}");
                    None
                }
            },
        }
    }

    /// Counts one request as a hit (one that `waited` for the same request in flight also
    /// as coalesced) or a miss.
    pub fn count(&self, hit: bool, waited: bool) {
        let counter = if hit {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if hit && waited {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Claims `key` for a request that missed: the first answers it, the others wait.
    pub fn claim(self: &Arc<Self>, key: &Key) -> Claim {
        let Ok(mut f) = self.in_flight.lock() else {
            // A poisoned map only loses coalescing: answer without a flight's waiters.
            let (done, _) = watch::channel(());
            return Claim::Answer(Flight {
                cache: self.clone(),
                key: Key([0; 32]),
                _done: done,
            });
        };
        if let Some(waiting) = f.get(key) {
            return Claim::Wait(waiting.clone());
        }
        let (done, waiting) = watch::channel(());
        f.insert(*key, waiting);
        Claim::Answer(Flight {
            cache: self.clone(),
            key: *key,
            _done: done,
        })
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
