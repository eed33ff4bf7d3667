//! The adapter registry: one folder holding an SQLite database (`registry.sqlite`) of adapter
//! versions and their files, stored once each by content (`blobs/sha256/<hex>`).
//!
//! A version records its name, number, task, base model (source and sha256), rank, alpha,
//! target modules, the recipe text, metrics (JSON), creation time, the sha256 of each file,
//! and where it was published. Adding first reserves its blobs (a `pending_blobs` row per file,
//! committed), then writes them (each through a temporary file and a rename), then inserts the
//! version in one `BEGIN IMMEDIATE` transaction that also picks the version number and drops
//! the reservation, so concurrent adds from several processes serialize on SQLite's lock and
//! none is lost, and a failed add leaves no row (an unreferenced blob at most, which a later
//! removal collects). Removal collects garbage under the same lock: a blob goes only when no
//! version and no reservation younger than [`RESERVATION_S`] names it, so a removal never
//! deletes the blobs of an add that has not committed yet. Version numbers are never reused:
//! `last_versions` remembers the highest each name reached, whatever was removed since.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomic;
use crate::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use crate::AdapterError;

const DB_FILE: &str = "registry.sqlite";

/// How long an add's reservation of its blobs protects them from garbage collection: an add
/// that crashed between reserving and committing holds its blobs no longer than this.
pub const RESERVATION_S: i64 = 3600;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pending_blobs (
    sha256 TEXT NOT NULL,
    add_id TEXT NOT NULL,
    since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS last_versions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    task TEXT,
    base_model TEXT,
    base_sha256 TEXT,
    r INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    recipe TEXT,
    metrics TEXT NOT NULL,
    created_at TEXT NOT NULL,
    files TEXT NOT NULL,
    published TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (name, version)
)";

/// One adapter version as the registry records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// The adapter's name.
    pub name: String,
    /// 1, 2, ... per name.
    pub version: u32,
    /// The task it was trained for, if any.
    pub task: Option<String>,
    /// The base model (source string or hub id).
    pub base_model: Option<String>,
    /// sha256 of the base model file, when known.
    pub base_sha256: Option<String>,
    /// Rank.
    pub r: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Target modules.
    pub target_modules: Vec<String>,
    /// The recipe that trained it (TOML), if known.
    pub recipe: Option<String>,
    /// Metrics (a JSON object).
    pub metrics: serde_json::Value,
    /// Seconds since the Unix epoch, UTC, as RFC 3339.
    pub created_at: String,
    /// File name -> sha256 of its content.
    pub files: BTreeMap<String, String>,
    /// Hub repositories it was published to.
    pub published: Vec<String>,
}

impl AdapterRecord {
    /// `name:version`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

/// What an add records besides the adapter files.
#[derive(Debug, Clone, Default)]
pub struct AddInfo {
    /// The task.
    pub task: Option<String>,
    /// Base model source (defaults to the adapter config's `base_model_name_or_path`).
    pub base_model: Option<String>,
    /// sha256 of the base model file.
    pub base_sha256: Option<String>,
    /// The recipe text.
    pub recipe: Option<String>,
    /// Metrics (a JSON object).
    pub metrics: Option<serde_json::Value>,
}

/// A registry folder.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    conn: Connection,
}

fn db_err(dir: &Path) -> impl Fn(rusqlite::Error) -> AdapterError + '_ {
    move |e| AdapterError::Registry {
        path: dir.join(DB_FILE),
        what: e.to_string(),
    }
}

/// Checks an adapter name: letters, digits, `.`, `_`, `-`; not starting with `.`; at most 96.
pub fn validate_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 96
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::BadName(format!(
            "adapter name {name:?}: use letters, digits, '.', '_' and '-' (not first '.'), at most 96"
        )))
    }
}

/// Parses `NAME[:VERSION]`.
pub fn parse_ref(s: &str) -> Result<(String, Option<u32>), AdapterError> {
    let (name, version) = match s.split_once(':') {
        Some((n, v)) => {
            let v: u32 = v.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                AdapterError::BadName(format!(
                    "{s:?}: the version after ':' must be a number >= 1"
                ))
            })?;
            (n, Some(v))
        }
        None => (s, None),
    };
    validate_name(name)?;
    Ok((name.to_string(), version))
}

/// A relative path with no `..`, root or prefix components (for files named by users or
/// servers).
pub fn safe_relative(path: &str) -> Result<PathBuf, AdapterError> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(AdapterError::BadName(format!(
            "path {path:?} must be relative, without '..'"
        )))
    }
}

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Renames the filled `staging` folder to `dest`. When another export made `dest` first (two
/// servers resolving the same new version), its files are replaced atomically instead; either
/// way no staging folder is left behind.
fn publish(
    staging: tempfile::TempDir,
    files: &[(PathBuf, Vec<u8>)],
    dest: &Path,
) -> Result<(), AdapterError> {
    match std::fs::rename(staging.path(), dest) {
        Ok(()) => {
            // Its path is `dest` now: nothing is left to remove.
            let _ = staging.keep();
            Ok(())
        }
        Err(e)
            if dest.is_dir()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty
                ) =>
        {
            for (rel, bytes) in files {
                let path = dest.join(rel);
                write_atomic(&path, bytes).map_err(|e| AdapterError::io(&path, e))?;
            }
            Ok(())
        }
        Err(e) => Err(AdapterError::io(dest, e)),
    }
}

impl Registry {
    /// Opens (creating if needed) the registry in `dir`.
    pub fn open(dir: &Path) -> Result<Self, AdapterError> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| AdapterError::io(dir, e))?;
        let conn = Connection::open(dir.join(DB_FILE)).map_err(db_err(dir))?;
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(db_err(dir))?;
        // Switching to WAL and creating the schema while another process does the same can
        // fail at once with "database is locked" (SQLite does not call the busy handler
        // there): retry for up to a minute, as the busy timeout would.
        let mut attempts = 0;
        loop {
            let setup = conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|_| conn.execute_batch(SCHEMA));
            match setup {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && attempts < 600 =>
                {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other.map_err(db_err(dir))?,
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            conn,
        })
    }

    /// Opens the registry in `dir` for reading only (`list`, `show`, `export`): nothing is
    /// created or written, so a registry on a read-only disk or owned by another user can be
    /// read. A folder without a registry reads as an empty one.
    pub fn open_read_only(dir: &Path) -> Result<Self, AdapterError> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            let conn = Connection::open_in_memory().map_err(db_err(dir))?;
            conn.execute_batch(SCHEMA).map_err(db_err(dir))?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                conn,
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let open = |query: &str| {
            let conn =
                Connection::open_with_flags(format!("file:{}{query}", uri_path(&path)), flags)
                    .map_err(db_err(dir))?;
            conn.busy_timeout(Duration::from_secs(60))
                .map_err(db_err(dir))?;
            // Reading a WAL database needs its shared-memory file, which a read-only folder
            // without one cannot get: the first query tells.
            conn.query_row("SELECT count(*) FROM adapters", [], |r| r.get::<_, i64>(0))
                .map_err(db_err(dir))?;
            Ok::<_, AdapterError>(conn)
        };
        // Where the folder cannot be written, SQLite reads the file as it is ("immutable"):
        // nobody can be writing to it either.
        let conn = open("?mode=ro").or_else(|_| open("?mode=ro&immutable=1"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            conn,
        })
    }

    /// The registry folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds the PEFT adapter in `src` as the next version of `name`; returns its record.
    pub fn add(
        &mut self,
        src: &Path,
        name: &str,
        info: AddInfo,
    ) -> Result<AdapterRecord, AdapterError> {
        let staged = self.stage(src, name, info)?;
        self.commit(staged)
    }

    /// The first half of an add: the adapter read, its blobs reserved and written; no version
    /// yet.
    fn stage(&mut self, src: &Path, name: &str, info: AddInfo) -> Result<Staged, AdapterError> {
        validate_name(name)?;
        let adapter = PeftAdapter::read(src)?;
        let mut contents = Vec::new();
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let path = src.join(file);
            let bytes = std::fs::read(&path).map_err(|e| AdapterError::io(&path, e))?;
            contents.push((file, sha256_hex(&bytes), bytes));
        }
        let add_id = add_id();
        let dir = self.dir.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&dir))?;
        for (_, hex, _) in &contents {
            tx.execute(
                "INSERT INTO pending_blobs (sha256, add_id, since) VALUES (?1, ?2, ?3)",
                params![hex, add_id, unix_now()],
            )
            .map_err(db_err(&dir))?;
        }
        tx.commit().map_err(db_err(&dir))?;
        let mut files = BTreeMap::new();
        for (file, hex, bytes) in contents {
            if let Err(e) = self.put_blob(&hex, &bytes) {
                self.release(&add_id);
                return Err(e);
            }
            files.insert(file.to_string(), hex);
        }
        let c = &adapter.config;
        let record = AdapterRecord {
            name: name.to_string(),
            version: 0,
            task: info.task,
            base_model: info
                .base_model
                .or_else(|| c.base_model_name_or_path.clone()),
            base_sha256: info.base_sha256,
            r: c.r,
            alpha: c.lora_alpha,
            target_modules: c.target_modules.clone(),
            recipe: info.recipe,
            metrics: info.metrics.unwrap_or_else(|| serde_json::json!({})),
            created_at: now_rfc3339(),
            files,
            published: Vec::new(),
        };
        Ok(Staged { record, add_id })
    }

    /// The second half of an add: the next version number of the name (never one used
    /// before, even if removed), the row inserted and the reservation dropped, in one
    /// transaction.
    fn commit(&mut self, staged: Staged) -> Result<AdapterRecord, AdapterError> {
        let Staged { mut record, add_id } = staged;
        let dir = self.dir.clone();
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let last: Option<u32> = tx.query_row(
                "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM adapters WHERE name = ?1
                 UNION ALL SELECT version FROM last_versions WHERE name = ?1)",
                [&record.name],
                |r| r.get(0),
            )?;
            record.version = last.unwrap_or(0) + 1;
            insert(&tx, &record)?;
            tx.execute(
                "INSERT INTO last_versions (name, version) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version",
                params![record.name, record.version],
            )?;
            tx.execute("DELETE FROM pending_blobs WHERE add_id = ?1", [&add_id])?;
            tx.commit()
        })();
        if let Err(e) = result {
            self.release(&add_id);
            return Err(db_err(&dir)(e));
        }
        Ok(record)
    }

    /// Drops an add's reservation after it failed (best effort: a reservation left behind
    /// expires after [`RESERVATION_S`]).
    fn release(&self, add_id: &str) {
        let _ = self
            .conn
            .execute("DELETE FROM pending_blobs WHERE add_id = ?1", [add_id]);
    }

    /// Stores `bytes` under their sha256 `hex` (once).
    fn put_blob(&self, hex: &str, bytes: &[u8]) -> Result<(), AdapterError> {
        let path = self.blob_path(hex);
        if !path.exists() {
            write_atomic(&path, bytes).map_err(|e| AdapterError::io(&path, e))?;
        }
        Ok(())
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(hex)
    }

    /// Every version that reads back, by name then version; a row that does not (edited or
    /// damaged outside ft) is left out with a warning, so that it cannot hide the others.
    pub fn list(&self) -> Result<Vec<AdapterRecord>, AdapterError> {
        let (records, damaged) = self.list_all()?;
        for d in &damaged {
            tracing::warn!("{}: {d}", self.dir.join(DB_FILE).display());
        }
        Ok(records)
    }

    /// Every version that reads back, and a description of each row that does not (its
    /// `name:version` and what is wrong with it).
    pub fn list_all(&self) -> Result<(Vec<AdapterRecord>, Vec<String>), AdapterError> {
        let dir = self.dir.clone();
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM adapters ORDER BY name, version")
            .map_err(db_err(&dir))?;
        let mut rows = stmt.query([]).map_err(db_err(&dir))?;
        let (mut records, mut damaged) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next().map_err(db_err(&dir))? {
            match row_to_record(row) {
                Ok(r) => records.push(r),
                Err(e) => {
                    let name: String = row.get(0).unwrap_or_else(|_| "?".into());
                    let version: String = row
                        .get::<_, i64>(1)
                        .map_or_else(|_| "?".into(), |v| v.to_string());
                    damaged.push(format!("{name}:{version} cannot be read ({e}); left out"));
                }
            }
        }
        Ok((records, damaged))
    }

    /// The version `name:version`, or the newest of `name`.
    pub fn get(&self, name: &str, version: Option<u32>) -> Result<AdapterRecord, AdapterError> {
        validate_name(name)?;
        let dir = self.dir.clone();
        let found = match version {
            Some(v) => self
                .conn
                .query_row(
                    "SELECT * FROM adapters WHERE name = ?1 AND version = ?2",
                    params![name, v],
                    row_to_record,
                )
                .optional(),
            None => self
                .conn
                .query_row(
                    "SELECT * FROM adapters WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                    [name],
                    row_to_record,
                )
                .optional(),
        }
        .map_err(db_err(&dir))?;
        found.ok_or_else(|| {
            AdapterError::NotFound(match version {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            })
        })
    }

    /// Removes `name:version` (every version when `version` is `None`) and the blobs no
    /// version uses any more; returns the removed ids.
    pub fn remove(
        &mut self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Vec<String>, AdapterError> {
        validate_name(name)?;
        let dir = self.dir.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err(&dir))?;
        // By key alone, so that a row that no longer reads back can still be removed.
        let doomed: Vec<u32> = {
            let mut stmt = tx
                .prepare(
                    "SELECT version FROM adapters WHERE name = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version",
                )
                .map_err(db_err(&dir))?;
            let versions = stmt
                .query_map(params![name, version], |r| r.get(0))
                .map_err(db_err(&dir))?
                .collect::<Result<Vec<u32>, _>>()
                .map_err(db_err(&dir))?;
            versions
        };
        if doomed.is_empty() {
            return Err(AdapterError::NotFound(match version {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            }));
        }
        for v in &doomed {
            tx.execute(
                "DELETE FROM adapters WHERE name = ?1 AND version = ?2",
                params![name, v],
            )
            .map_err(db_err(&dir))?;
        }
        collect_garbage(&tx, &dir.join("blobs/sha256"), &dir)?;
        tx.commit().map_err(db_err(&dir))?;
        Ok(doomed.iter().map(|v| format!("{name}:{v}")).collect())
    }

    /// Writes the files of `record` into `dest` (a PEFT folder), checking each sha256. A new
    /// folder appears whole or not at all (it is filled under a temporary name, then renamed);
    /// into an existing one each file is replaced atomically.
    pub fn export(&self, record: &AdapterRecord, dest: &Path) -> Result<(), AdapterError> {
        let files = record
            .files
            .iter()
            .map(|(file, hex)| Ok((safe_relative(file)?, self.blob(hex)?)))
            .collect::<Result<Vec<_>, AdapterError>>()?;
        if dest.exists() {
            for (rel, bytes) in files {
                let path = dest.join(rel);
                write_atomic(&path, &bytes).map_err(|e| AdapterError::io(&path, e))?;
            }
            return Ok(());
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| AdapterError::io(parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".export-")
            .tempdir_in(parent)
            .map_err(|e| AdapterError::io(parent, e))?;
        for (rel, bytes) in &files {
            let path = staging.path().join(rel);
            write_atomic(&path, bytes).map_err(|e| AdapterError::io(&path, e))?;
        }
        publish(staging, &files, dest)
    }

    /// The content of blob `hex`, verified against its name.
    pub fn blob(&self, hex: &str) -> Result<Vec<u8>, AdapterError> {
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(AdapterError::BadName(format!("{hex:?} is not a sha256")));
        }
        let path = self.blob_path(hex);
        let bytes = std::fs::read(&path).map_err(|e| AdapterError::io(&path, e))?;
        if sha256_hex(&bytes) != hex {
            return Err(AdapterError::Registry {
                path,
                what: "blob content does not match its sha256".into(),
            });
        }
        Ok(bytes)
    }

    /// Merges `metrics` (a JSON object) into the record's metrics.
    pub fn add_metrics(
        &mut self,
        name: &str,
        version: u32,
        metrics: &serde_json::Value,
    ) -> Result<(), AdapterError> {
        let mut record = self.get(name, Some(version))?;
        if let (Some(into), Some(from)) = (record.metrics.as_object_mut(), metrics.as_object()) {
            for (k, v) in from {
                into.insert(k.clone(), v.clone());
            }
        }
        let dir = self.dir.clone();
        self.conn
            .execute(
                "UPDATE adapters SET metrics = ?3 WHERE name = ?1 AND version = ?2",
                params![name, version, record.metrics.to_string()],
            )
            .map_err(db_err(&dir))?;
        Ok(())
    }

    /// Records that `name:version` was published to `repo`.
    pub fn mark_published(
        &mut self,
        name: &str,
        version: u32,
        repo: &str,
    ) -> Result<(), AdapterError> {
        let mut record = self.get(name, Some(version))?;
        if !record.published.iter().any(|r| r == repo) {
            record.published.push(repo.to_string());
        }
        let dir = self.dir.clone();
        self.conn
            .execute(
                "UPDATE adapters SET published = ?3 WHERE name = ?1 AND version = ?2",
                params![
                    name,
                    version,
                    serde_json::to_string(&record.published).unwrap_or_default()
                ],
            )
            .map_err(db_err(&dir))?;
        Ok(())
    }
}

/// An add between its two halves.
struct Staged {
    record: AdapterRecord,
    add_id: String,
}

/// A name for one add's reservation, unique across processes and threads.
fn add_id() -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Deletes the blobs in `blobs` that no version and no live reservation names, inside `tx`
/// (which holds the write lock, so no add can reserve meanwhile); expired reservations go too.
fn collect_garbage(
    tx: &rusqlite::Transaction<'_>,
    blobs: &Path,
    dir: &Path,
) -> Result<(), AdapterError> {
    let oldest = unix_now() - RESERVATION_S;
    tx.execute("DELETE FROM pending_blobs WHERE since < ?1", [oldest])
        .map_err(db_err(dir))?;
    let mut used = std::collections::HashSet::new();
    let mut files = tx
        .prepare("SELECT files FROM adapters")
        .map_err(db_err(dir))?;
    let rows = files
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db_err(dir))?;
    for row in rows {
        let row = row.map_err(db_err(dir))?;
        // A row whose files do not parse keeps every blob: never delete on a guess.
        let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(&row) else {
            return Ok(());
        };
        used.extend(map.into_values());
    }
    let mut pending = tx
        .prepare("SELECT sha256 FROM pending_blobs")
        .map_err(db_err(dir))?;
    for hex in pending
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db_err(dir))?
    {
        used.insert(hex.map_err(db_err(dir))?);
    }
    let entries = std::fs::read_dir(blobs).map_err(|e| AdapterError::io(blobs, e))?;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() == 64 && !used.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

fn insert(tx: &rusqlite::Transaction<'_>, r: &AdapterRecord) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO adapters (name, version, task, base_model, base_sha256, r, alpha, target_modules, recipe, metrics, created_at, files, published)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            r.name,
            r.version,
            r.task,
            r.base_model,
            r.base_sha256,
            r.r as i64,
            r.alpha,
            serde_json::to_string(&r.target_modules).unwrap_or_default(),
            r.recipe,
            r.metrics.to_string(),
            r.created_at,
            serde_json::to_string(&r.files).unwrap_or_default(),
            serde_json::to_string(&r.published).unwrap_or_default(),
        ],
    )
}

/// `path` for an SQLite `file:` URI: bytes other than unreserved ones and `/` percent-encoded.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<AdapterRecord> {
    fn parse<T: serde::de::DeserializeOwned>(
        row: &rusqlite::Row<'_>,
        i: usize,
    ) -> rusqlite::Result<T> {
        let s: String = row.get(i)?;
        serde_json::from_str(&s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    }
    Ok(AdapterRecord {
        name: row.get(0)?,
        version: row.get(1)?,
        task: row.get(2)?,
        base_model: row.get(3)?,
        base_sha256: row.get(4)?,
        r: row.get::<_, i64>(5)? as usize,
        alpha: row.get(6)?,
        target_modules: parse(row, 7)?,
        recipe: row.get(8)?,
        metrics: parse(row, 9)?,
        created_at: row.get(10)?,
        files: parse(row, 11)?,
        published: parse(row, 12)?,
    })
}

/// Now as RFC 3339 UTC (second precision), from the civil date of the Unix day.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{LoraWeights, Matrix, PeftConfig};

    fn adapter(dir: &Path, seed: f32) {
        let config: PeftConfig = serde_json::from_value(serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "target_modules": ["q_proj"], "base_model_name_or_path": "org/base"
        }))
        .unwrap();
        let m = |shape: [usize; 2]| Matrix {
            shape,
            data: (0..shape[0] * shape[1]).map(|i| i as f32 * seed).collect(),
        };
        let mut modules = BTreeMap::new();
        modules.insert(
            "model.layers.0.self_attn.q_proj".to_string(),
            LoraWeights {
                a: m([2, 4]),
                b: m([4, 2]),
            },
        );
        PeftAdapter { config, modules }.write(dir).unwrap();
    }

    #[test]
    fn a_damaged_row_is_left_out_of_the_list_and_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        adapter(&a, 0.5);
        let root = dir.path().join("reg");
        let mut reg = Registry::open(&root).unwrap();
        reg.add(&a, "good", AddInfo::default()).unwrap();
        reg.add(&a, "bad", AddInfo::default()).unwrap();
        reg.conn
            .execute(
                "UPDATE adapters SET files = 'not json' WHERE name = 'bad'",
                [],
            )
            .unwrap();
        let names: Vec<String> = reg.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["good"]);
        let (_, damaged) = reg.list_all().unwrap();
        assert_eq!(damaged.len(), 1);
        assert!(
            damaged[0].starts_with("bad:1 cannot be read"),
            "{damaged:?}"
        );
        assert_eq!(reg.remove("bad", None).unwrap(), ["bad:1"]);
        assert!(reg.list_all().unwrap().1.is_empty());
        // The damaged row kept its blobs while it stood; the good version still exports.
        let good = reg.get("good", None).unwrap();
        reg.export(&good, &dir.path().join("out")).unwrap();
    }

    #[test]
    fn reading_only_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        adapter(&a, 0.5);
        let root = dir.path().join("reg");
        Registry::open(&root)
            .unwrap()
            .add(&a, "x", AddInfo::default())
            .unwrap();
        let db = root.join(DB_FILE);
        let before = std::fs::read(&db).unwrap();
        let reg = Registry::open_read_only(&root).unwrap();
        assert_eq!(reg.list().unwrap().len(), 1);
        assert!(
            reg.conn.execute("DELETE FROM adapters", []).is_err(),
            "read only"
        );
        let empty = Registry::open_read_only(&dir.path().join("none")).unwrap();
        assert!(empty.list().unwrap().is_empty());
        assert!(!dir.path().join("none").exists(), "nothing created");
        drop(reg);
        assert_eq!(
            before,
            std::fs::read(&db).unwrap(),
            "the database is unchanged"
        );
    }

    #[test]
    fn add_list_show_export_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        adapter(&a, 0.5);
        adapter(&b, 0.25);
        let mut reg = Registry::open(&dir.path().join("reg")).unwrap();
        let info = AddInfo {
            task: Some("dates".into()),
            metrics: Some(serde_json::json!({"em": 0.9})),
            ..Default::default()
        };
        let r1 = reg.add(&a, "dates", info.clone()).unwrap();
        let r2 = reg.add(&b, "dates", info).unwrap();
        assert_eq!((r1.version, r2.version), (1, 2));
        assert_eq!(r1.base_model.as_deref(), Some("org/base"));
        assert_eq!(reg.get("dates", None).unwrap().version, 2);
        assert_eq!(reg.list().unwrap().len(), 2);
        let out = dir.path().join("out");
        reg.export(&reg.get("dates", Some(1)).unwrap(), &out)
            .unwrap();
        assert_eq!(
            PeftAdapter::read(&out).unwrap(),
            PeftAdapter::read(&a).unwrap()
        );
        reg.add_metrics("dates", 1, &serde_json::json!({"latency": 3}))
            .unwrap();
        assert_eq!(
            reg.get("dates", Some(1)).unwrap().metrics,
            serde_json::json!({"em": 0.9, "latency": 3})
        );
        assert_eq!(reg.remove("dates", Some(1)).unwrap(), vec!["dates:1"]);
        let blobs = std::fs::read_dir(dir.path().join("reg/blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(
            blobs, 2,
            "the removed version's weights are collected; the config is shared"
        );
        assert!(matches!(
            reg.get("dates", Some(1)),
            Err(AdapterError::NotFound(_))
        ));
    }

    #[test]
    fn names_and_paths_are_validated() {
        for bad in ["", "../x", ".hidden", "a/b", "a b", "x:0", "x:y"] {
            assert!(parse_ref(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_ref("dates-v2:3").unwrap(),
            ("dates-v2".to_string(), Some(3))
        );
        for bad in ["../a", "/etc/passwd", "a/../../b", ""] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
        assert!(safe_relative("adapter_model.safetensors").is_ok());
    }

    #[test]
    fn a_removal_never_collects_the_blobs_of_an_add_not_yet_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (y, z) = (dir.path().join("y"), dir.path().join("z"));
        adapter(&y, 0.5);
        adapter(&z, 0.75);
        let reg_dir = dir.path().join("reg");
        let mut adding = Registry::open(&reg_dir).unwrap();
        let mut removing = Registry::open(&reg_dir).unwrap();
        removing.add(&z, "z", AddInfo::default()).unwrap();
        // y's blobs are written, its version not yet recorded, when another process removes
        // z and collects garbage.
        let staged = adding.stage(&y, "y", AddInfo::default()).unwrap();
        removing.remove("z", None).unwrap();
        let record = adding.commit(staged).unwrap();
        let out = dir.path().join("out");
        adding.export(&record, &out).unwrap();
        assert_eq!(
            PeftAdapter::read(&out).unwrap(),
            PeftAdapter::read(&y).unwrap()
        );
        // Committed, the reservation is gone: removing y now collects its blobs.
        adding.remove("y", None).unwrap();
        let left = std::fs::read_dir(reg_dir.join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(left, 0);
    }

    #[test]
    fn concurrent_adds_exports_and_removals_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg_dir = dir.path().join("reg");
        Registry::open(&reg_dir).unwrap();
        let workers: Vec<_> = ["y", "z"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let (src, reg_dir) = (dir.path().join(name), reg_dir.clone());
                adapter(&src, 0.5 + i as f32);
                let out = dir.path().join(format!("out-{name}"));
                std::thread::spawn(move || {
                    let mut reg = Registry::open(&reg_dir).unwrap();
                    for _ in 0..40 {
                        let record = reg.add(&src, name, AddInfo::default()).unwrap();
                        reg.export(&record, &out).unwrap();
                        reg.remove(name, None).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn version_numbers_are_never_reused_after_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        adapter(&a, 1.0);
        let mut reg = Registry::open(&dir.path().join("reg")).unwrap();
        assert_eq!(reg.add(&a, "x", AddInfo::default()).unwrap().version, 1);
        assert_eq!(reg.add(&a, "x", AddInfo::default()).unwrap().version, 2);
        reg.remove("x", Some(2)).unwrap();
        assert_eq!(reg.add(&a, "x", AddInfo::default()).unwrap().version, 3);
        reg.remove("x", None).unwrap();
        assert_eq!(reg.add(&a, "x", AddInfo::default()).unwrap().version, 4);
    }

    #[test]
    fn a_failed_export_leaves_no_folder() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        adapter(&a, 1.0);
        let reg_dir = dir.path().join("reg");
        let mut reg = Registry::open(&reg_dir).unwrap();
        let record = reg.add(&a, "x", AddInfo::default()).unwrap();
        let weights = reg.blob_path(&record.files[WEIGHTS_FILE]);
        std::fs::write(&weights, b"changed on disk").unwrap();
        let out = dir.path().join("out");
        assert!(reg.export(&record, &out).is_err());
        assert!(!out.exists(), "no half-written folder");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".export-"))
            .collect();
        assert!(left.is_empty(), "no staging folder left behind");
    }

    #[test]
    fn an_export_that_loses_the_race_to_its_folder_writes_into_it_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("served");
        // Another export made the folder (with an older file) after this one checked.
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("a.txt"), b"old").unwrap();
        let staging = tempfile::Builder::new()
            .prefix(".export-")
            .tempdir_in(dir.path())
            .unwrap();
        std::fs::write(staging.path().join("a.txt"), b"new").unwrap();
        let files = vec![(PathBuf::from("a.txt"), b"new".to_vec())];
        publish(staging, &files, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("a.txt")).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["served"], "no staging folder left behind");
    }

    #[test]
    fn a_failed_add_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        adapter(&a, 1.0);
        std::fs::write(a.join(WEIGHTS_FILE), b"not safetensors").unwrap();
        let mut reg = Registry::open(&dir.path().join("reg")).unwrap();
        assert!(reg.add(&a, "x", AddInfo::default()).is_err());
        assert!(reg.list().unwrap().is_empty());
    }
}
