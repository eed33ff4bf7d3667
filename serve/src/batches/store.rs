//! Where the Batch API keeps its files and batches across restarts: an SQLite database
//! (`batches.sqlite3`, write-ahead log, synced on every commit) beside a folder of file
//! contents (`files/ID`, each written atomically before its row is committed). A batch's
//! answers are rows keyed by (batch, line): each is committed as it completes, and a line
//! recorded twice keeps its first answer, so a batch resumed after a crash neither loses nor
//! repeats one.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::BatchError;

/// The Batch API's state on disk, held by one server at a time.
pub struct Store {
    dir: PathBuf,
    db: Mutex<Connection>,
    /// `lock`, locked while the store is open: a second server on the same folder would run
    /// its unfinished batches again.
    _lock: std::fs::File,
}

/// One line's answer, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The line's index among the batch's requests, from 0.
    pub index: usize,
    /// Answered with a 2xx status.
    pub ok: bool,
    /// The output line.
    pub line: Value,
}

impl Store {
    /// Opens (or creates) the state in `dir`; [`BatchError::Busy`] when another process
    /// holds it.
    pub fn open(dir: &Path) -> Result<Self, BatchError> {
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(|e| BatchError::io(&files, e))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| BatchError::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(BatchError::Busy {
                    path: dir.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(BatchError::io(&lock_path, e)),
        }
        let path = dir.join("batches.sqlite3");
        let db = Connection::open(&path).map_err(|e| sql(&path, e))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS files (
                 id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, object TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS batches (
                 id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, object TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS results (
                 batch_id TEXT NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL,
                 line TEXT NOT NULL, PRIMARY KEY (batch_id, idx));",
        )
        .map_err(|e| sql(&path, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            db: Mutex::new(db),
            _lock: lock,
        })
    }

    fn db(&self) -> Result<std::sync::MutexGuard<'_, Connection>, BatchError> {
        self.db.lock().map_err(|_| BatchError::Io {
            path: self.dir.clone(),
            source: std::io::Error::other("the batch database lock is poisoned"),
        })
    }

    fn err(&self, e: rusqlite::Error) -> BatchError {
        sql(&self.dir.join("batches.sqlite3"), e)
    }

    /// Where file `id`'s bytes are.
    fn content_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(id)
    }

    /// Keeps `bytes` as the file described by `object` (its `id` and `created_at`).
    pub fn add_file(&self, object: &Value, bytes: &[u8]) -> Result<(), BatchError> {
        let id = object["id"].as_str().unwrap_or_default();
        let path = self.content_path(id);
        ft_adapters::atomic::write_atomic(&path, bytes).map_err(|e| BatchError::io(&path, e))?;
        self.db()?
            .execute(
                "INSERT OR REPLACE INTO files (id, created_at, object) VALUES (?1, ?2, ?3)",
                params![
                    id,
                    object["created_at"].as_i64().unwrap_or(0),
                    object.to_string()
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// File `id`'s object.
    pub fn file(&self, id: &str) -> Result<Option<Value>, BatchError> {
        self.one("SELECT object FROM files WHERE id = ?1", id)
    }

    /// Every file, newest first.
    pub fn files(&self) -> Result<Vec<Value>, BatchError> {
        self.all("SELECT object FROM files ORDER BY created_at DESC, id DESC")
    }

    /// File `id`'s bytes.
    pub fn content(&self, id: &str) -> Result<Option<Vec<u8>>, BatchError> {
        if self.file(id)?.is_none() {
            return Ok(None);
        }
        let path = self.content_path(id);
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| BatchError::io(&path, e))
    }

    /// Deletes file `id`; whether there was one.
    pub fn delete_file(&self, id: &str) -> Result<bool, BatchError> {
        let gone = self
            .db()?
            .execute("DELETE FROM files WHERE id = ?1", params![id])
            .map_err(|e| self.err(e))?;
        let path = self.content_path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BatchError::io(&path, e))
            }
            _ => {}
        }
        Ok(gone > 0)
    }

    /// Keeps (or replaces) a batch object.
    pub fn put_batch(&self, object: &Value) -> Result<(), BatchError> {
        self.db()?
            .execute(
                "INSERT INTO batches (id, created_at, object) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET object = excluded.object",
                params![
                    object["id"].as_str().unwrap_or_default(),
                    object["created_at"].as_i64().unwrap_or(0),
                    object.to_string()
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Batch `id`'s object.
    pub fn batch(&self, id: &str) -> Result<Option<Value>, BatchError> {
        self.one("SELECT object FROM batches WHERE id = ?1", id)
    }

    /// Every batch, newest first.
    pub fn batches(&self) -> Result<Vec<Value>, BatchError> {
        self.all("SELECT object FROM batches ORDER BY created_at DESC, id DESC")
    }

    /// Records line `index` of batch `id`'s answer; a line already recorded keeps its first.
    pub fn record(&self, id: &str, index: usize, ok: bool, line: &Value) -> Result<(), BatchError> {
        self.db()?
            .execute(
                "INSERT OR IGNORE INTO results (batch_id, idx, ok, line) VALUES (?1, ?2, ?3, ?4)",
                params![id, index as i64, ok, line.to_string()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Batch `id`'s recorded answers, in line order.
    pub fn results(&self, id: &str) -> Result<Vec<Recorded>, BatchError> {
        let db = self.db()?;
        let mut stmt = db
            .prepare("SELECT idx, ok, line FROM results WHERE batch_id = ?1 ORDER BY idx")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (index, ok, line) = row.map_err(|e| self.err(e))?;
            out.push(Recorded {
                index: index as usize,
                ok,
                line: serde_json::from_str(&line).unwrap_or(Value::Null),
            });
        }
        Ok(out)
    }

    fn one(&self, query: &str, id: &str) -> Result<Option<Value>, BatchError> {
        let text: Option<String> = self
            .db()?
            .query_row(query, params![id], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    fn all(&self, query: &str) -> Result<Vec<Value>, BatchError> {
        let db = self.db()?;
        let mut stmt = db.prepare(query).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(|e| self.err(e))?;
            out.extend(serde_json::from_str(&text).ok());
        }
        Ok(out)
    }
}

fn sql(path: &Path, e: rusqlite::Error) -> BatchError {
    BatchError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn files_batches_and_answers_survive_a_reopen_and_answers_are_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let file = json!({"id": "file-1", "object": "file", "created_at": 5, "purpose": "batch"});
        store.add_file(&file, b"abc").unwrap();
        let batch = json!({"id": "batch_1", "created_at": 6, "status": "validating"});
        store.put_batch(&batch).unwrap();
        store.record("batch_1", 1, true, &json!({"n": 1})).unwrap();
        store.record("batch_1", 0, false, &json!({"n": 0})).unwrap();
        store
            .record("batch_1", 1, false, &json!({"n": "again"}))
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.file("file-1").unwrap(), Some(file));
        assert_eq!(
            store.content("file-1").unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        let mut moved = batch.clone();
        moved["status"] = "in_progress".into();
        store.put_batch(&moved).unwrap();
        assert_eq!(store.batches().unwrap(), [moved]);
        let got = store.results("batch_1").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].index, got[0].ok), (0, false));
        assert_eq!(got[1].line, json!({"n": 1}), "the first answer is kept");
        assert!(store.delete_file("file-1").unwrap());
        assert!(!store.delete_file("file-1").unwrap());
        assert_eq!(store.content("file-1").unwrap(), None);
        assert!(store.files().unwrap().is_empty());
        let busy = Store::open(dir.path()).err().unwrap();
        assert!(matches!(busy, BatchError::Busy { .. }), "{busy}");
    }
}
