//! Answers in this process: least recently used out once their bytes pass the budget, and
//! each gone after the time to live.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{Cached, Key};

/// What an entry costs beyond its answer (key, time, links of the list).
const ENTRY_OVERHEAD: usize = 96;

struct Entry {
    value: Arc<Cached>,
    stored: Instant,
    size: usize,
}

/// A byte-bounded LRU map of answers.
pub(super) struct Memory {
    entries: LruCache<Key, Entry>,
    bytes: usize,
    budget: usize,
}

impl Memory {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The answer under `key` if it is younger than `ttl`, now the most recently used.
    pub(super) fn get(&mut self, key: &Key, ttl: Option<Duration>) -> Option<Arc<Cached>> {
        let expired = self
            .entries
            .peek(key)
            .is_some_and(|e| ttl.is_some_and(|t| e.stored.elapsed() >= t));
        if expired {
            if let Some(e) = self.entries.pop(key) {
                self.bytes -= e.size;
            }
            return None;
        }
        self.entries.get(key).map(|e| e.value.clone())
    }

    /// Stores `value`, evicting the least recently used until it fits; `false` when it is
    /// larger than the whole budget.
    pub(super) fn put(&mut self, key: Key, value: Cached) -> bool {
        let size = value.size() + ENTRY_OVERHEAD;
        if size > self.budget {
            return false;
        }
        let entry = Entry {
            value: Arc::new(value),
            stored: Instant::now(),
            size,
        };
        if let Some(old) = self.entries.put(key, entry) {
            self.bytes -= old.size;
        }
        self.bytes += size;
        while self.bytes > self.budget {
            match self.entries.pop_lru() {
                Some((_, e)) => self.bytes -= e.size,
                None => break,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> Cached {
        Cached::Whole("x".repeat(n))
    }

    #[test]
    fn the_least_recently_used_go_first_once_the_budget_is_full() {
        let mut m = Memory::new(3 * (100 + ENTRY_OVERHEAD));
        for i in 0..3 {
            assert!(m.put(Key([i; 32]), body(100)));
        }
        assert!(m.get(&Key([0; 32]), None).is_some(), "0 is now the newest");
        assert!(m.put(Key([3; 32]), body(100)));
        assert!(m.get(&Key([1; 32]), None).is_none(), "1 was the oldest");
        for i in [0, 2, 3] {
            assert!(m.get(&Key([i; 32]), None).is_some(), "{i}");
        }
        assert_eq!(m.bytes(), 3 * (100 + ENTRY_OVERHEAD));
        assert!(!m.put(Key([9; 32]), body(10_000)), "larger than the budget");
        assert_eq!(m.bytes(), 3 * (100 + ENTRY_OVERHEAD));
    }

    #[test]
    fn a_replaced_answer_is_counted_once_and_an_old_one_expires() {
        let mut m = Memory::new(10_000);
        m.put(Key([1; 32]), body(100));
        m.put(Key([1; 32]), body(200));
        assert_eq!(m.bytes(), 200 + ENTRY_OVERHEAD);
        assert_eq!(
            m.get(&Key([1; 32]), Some(Duration::from_secs(60)))
                .as_deref(),
            Some(&body(200))
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(m
            .get(&Key([1; 32]), Some(Duration::from_millis(10)))
            .is_none());
        assert_eq!(m.bytes(), 0, "the expired entry is gone");
    }
}
