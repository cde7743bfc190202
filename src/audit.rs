//! The audit store: an append-only, keyed hash-chained SQLite log of every
//! model load, verification, refusal, fallback and unload.
//!
//! What it protects against, and how:
//! - **Edits through SQL** (`UPDATE`, `DELETE`): triggers refuse them.
//! - **Edits behind the triggers' back** (someone who drops them, or edits
//!   the file): every row stores `row_hash = SHA256(prev_hash || content)`
//!   and `mac = HMAC-SHA256(key, prev_mac || row_hash)`. The key is kept
//!   outside the database ([`AuditOptions`]: `ML_WORKER_AUDIT_KEY`, a key
//!   file, by default `<db>.key` created with mode 0600), so an editor who
//!   recomputes the chain without the key is found by [`AuditStore::verify`].
//! - **Rows removed, renumbered, or all deleted**: ids must run without gaps
//!   from 1; `sqlite_sequence` remembers the highest id handed out; and the
//!   chain head (newest id and mac) is written where the database's editor
//!   cannot rewrite it: the log, the `ml_worker_audit_head` metric, and an
//!   optional append-only anchor file (`ML_WORKER_AUDIT_ANCHOR`). `audit
//!   verify --anchor FILE` / `--head ID:MAC` checks the store against them.
//! - **Inserts silently dropped or altered** (a `BEFORE INSERT ...
//!   RAISE(IGNORE)` trigger, a view): every insert must change exactly one
//!   row and read back as written, and the schema (tables, indexes,
//!   triggers, views) must be exactly what the migrations create: anything
//!   else is refused at open and reported by `verify`.
//!
//! What it does not protect against: someone who has the key (and the
//! anchors) can write a consistent forgery; someone who can delete the
//! database and the anchor file leaves only the log and the metric behind.
//! Keep the key in a secret or on another volume than the database.
//!
//! Schema migrations are numbered in [`MIGRATIONS`] and tracked with
//! `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Schema migrations, applied in order; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    // 1: the log and its append-only triggers
    "CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        event TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        host TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL
     );
     CREATE INDEX audit_log_model ON audit_log(model, id);",
    // 2: the append-only triggers (kept as constants: `verify` compares them)
    concat!(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END;",
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END;"
    ),
    // 3: the keyed chain (rows from before it keep an empty mac) and the
    // key's id, so a store chained with another key says so
    "ALTER TABLE audit_log ADD COLUMN mac TEXT NOT NULL DEFAULT '';
     CREATE TABLE audit_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TRIGGER audit_meta_no_update BEFORE UPDATE ON audit_meta BEGIN SELECT RAISE(ABORT, 'audit_meta is append-only: UPDATE refused'); END;
     CREATE TRIGGER audit_meta_no_delete BEFORE DELETE ON audit_meta BEGIN SELECT RAISE(ABORT, 'audit_meta is append-only: DELETE refused'); END;",
];

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted key, in bytes.
const MIN_KEY_BYTES: usize = 16;

/// What happened to a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditEvent {
    /// The file's checksum was computed (and matched its pin, if any).
    Verify,
    /// The model was loaded and is ready to serve.
    Load,
    /// The model was refused (checksum mismatch, bad file, unsupported kind).
    Refuse,
    /// Requests for the model are served by its fallback.
    Fallback,
    /// The model was unloaded.
    Unload,
    /// A hot reload changed the model (old and new version in the detail),
    /// or a reload was refused (no model; the reason in the detail).
    Reload,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::Verify => "verify",
            AuditEvent::Load => "load",
            AuditEvent::Refuse => "refuse",
            AuditEvent::Fallback => "fallback",
            AuditEvent::Unload => "unload",
            AuditEvent::Reload => "reload",
        }
    }
}

/// The model-specific part of an audit row.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub model: String,
    pub version: String,
    pub kind: String,
    pub path: String,
    pub sha256: String,
    pub detail: String,
}

/// A stored row.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub ts: String,
    pub event: String,
    pub model: String,
    pub version: String,
    pub kind: String,
    pub path: String,
    pub sha256: String,
    pub host: String,
    pub worker_id: String,
    pub detail: String,
    pub prev_hash: String,
    pub row_hash: String,
    /// HMAC of the keyed chain ("" for rows written before it existed).
    pub mac: String,
}

impl AuditRow {
    fn content_hash(&self, prev_hash: &str) -> String {
        let mut h = Sha256::new();
        h.update(prev_hash.as_bytes());
        for field in [
            &self.ts,
            &self.event,
            &self.model,
            &self.version,
            &self.kind,
            &self.path,
            &self.sha256,
            &self.host,
            &self.worker_id,
            &self.detail,
        ] {
            // length-prefixed so field boundaries cannot shift
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// `HMAC(key, prev_mac || row_hash)`, hex.
fn chain_mac(key: &[u8], prev_mac: &str, row_hash: &str) -> String {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(prev_mac.as_bytes());
    m.update(row_hash.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// The schema version that starts the keyed chain.
const KEYED_CHAIN_VERSION: usize = 3;

/// `N:MAC`: how many rows predate the keyed chain, keyed.
fn unkeyed_record(key: &[u8], n: i64) -> String {
    format!("{n}:{}", chain_mac(key, "unkeyed_rows", &n.to_string()))
}

/// A key's public id: the first 16 hex digits of SHA256("ml-worker audit key" || key).
fn key_id(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"ml-worker audit key");
    h.update(key);
    hex::encode(h.finalize())[..16].to_string()
}

/// The newest row of the chain, as written to anchors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    pub id: i64,
    pub mac: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.mac)
    }
}

impl std::str::FromStr for Head {
    type Err = String;
    /// `ID:MAC`, as the log and the anchor file print it.
    fn from_str(s: &str) -> Result<Head, String> {
        let (id, mac) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("'{s}' is not ID:MAC"))?;
        let id = id
            .trim()
            .parse()
            .map_err(|_| format!("'{id}' is not a row id"))?;
        let mac = mac.trim();
        if mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{mac}' is not 64 hex digits"));
        }
        Ok(Head {
            id,
            mac: mac.to_ascii_lowercase(),
        })
    }
}

/// Where the chain's key comes from and where its head is anchored.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// The key itself (`ML_WORKER_AUDIT_KEY`); wins over `key_file`.
    pub key: Option<Vec<u8>>,
    /// A file holding the key (`ML_WORKER_AUDIT_KEY_FILE`). Without either,
    /// `<db>.key` is used, and created (mode 0600) if missing.
    pub key_file: Option<PathBuf>,
    /// An append-only file the chain head is added to after every row
    /// (`ML_WORKER_AUDIT_ANCHOR`), checked at open and by `verify`.
    pub anchor_file: Option<PathBuf>,
}

impl AuditOptions {
    /// From `ML_WORKER_AUDIT_KEY`, `ML_WORKER_AUDIT_KEY_FILE` and
    /// `ML_WORKER_AUDIT_ANCHOR`.
    pub fn from_env() -> AuditOptions {
        let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty());
        AuditOptions {
            key: var("ML_WORKER_AUDIT_KEY").map(|v| v.as_encoded_bytes().to_vec()),
            key_file: var("ML_WORKER_AUDIT_KEY_FILE").map(PathBuf::from),
            anchor_file: var("ML_WORKER_AUDIT_ANCHOR").map(PathBuf::from),
        }
    }
}

/// The outcome of [`AuditStore::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows: usize,
    /// Rows written before the keyed chain existed (checked by hash only).
    pub unkeyed_rows: usize,
    pub head: Option<Head>,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "audit store {path}: schema version {found} is newer than this binary knows ({known})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("audit store {path}: key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("audit store {path}: refused, it was tampered with: {}", problems.join("; "))]
    Tampered {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("audit store {path}: a row was not written: {message}")]
    NotWritten { path: PathBuf, message: String },
    #[error("audit store {path}: anchor file {anchor}: {source}")]
    Anchor {
        path: PathBuf,
        anchor: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Called with the new head after every row (the worker's metric).
pub type HeadHook = Box<dyn Fn(&Head) + Send + Sync>;

/// The audit store. Cheap to share: one connection behind a mutex (writes are
/// rare: model lifecycle events only).
pub struct AuditStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    host: String,
    worker_id: String,
    key: Vec<u8>,
    anchor_file: Option<PathBuf>,
    on_head: Mutex<Option<HeadHook>>,
}

impl AuditStore {
    /// Opens (creating if needed) the store at `path`, with the key and
    /// anchor the environment names ([`AuditOptions::from_env`]).
    pub fn open(path: &Path, worker_id: &str) -> Result<Self, AuditError> {
        Self::open_with(path, worker_id, &AuditOptions::from_env())
    }

    /// Opens (creating if needed) the store at `path`, in WAL mode, applies
    /// pending migrations, and refuses a store whose schema was altered or
    /// whose chain does not reach its anchor.
    pub fn open_with(
        path: &Path,
        worker_id: &str,
        options: &AuditOptions,
    ) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let key = load_key(path, options)?;
        let wrap = |source| AuditError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(wrap)?;
        let store = AuditStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            host: hostname(),
            worker_id: worker_id.to_string(),
            key,
            anchor_file: options.anchor_file.clone(),
            on_head: Mutex::new(None),
        };
        store.migrate()?;
        // nothing is written to a store whose schema or key is not ours
        let problems = {
            let conn = store.lock();
            let mut p = schema_problems(&conn).map_err(|e| store.wrap(e))?;
            p.extend(store.key_problems(&conn).map_err(|e| store.wrap(e))?);
            p
        };
        if !problems.is_empty() {
            return Err(AuditError::Tampered {
                path: store.path.clone(),
                problems,
            });
        }
        // the whole chain (a few thousand rows at most: model lifecycle
        // events), against the anchor file when there is one
        let report = store.verify()?;
        if !report.ok() {
            return Err(AuditError::Tampered {
                path: store.path.clone(),
                problems: report.problems,
            });
        }
        Ok(store)
    }

    /// Opens an existing store read-only, as it is: nothing is migrated,
    /// created or refused, so `audit verify` and `audit show` can look at a
    /// store that [`AuditStore::open_with`] would refuse. The key must
    /// exist (a missing default key file is not created).
    pub fn inspect(path: &Path, options: &AuditOptions) -> Result<Self, AuditError> {
        let mut options = options.clone();
        if options.key.is_none() && options.key_file.is_none() {
            options.key_file = Some(key_file_for(path));
        }
        let key = load_key(path, &options)?;
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| AuditError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(AuditStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            host: hostname(),
            worker_id: String::new(),
            key,
            anchor_file: options.anchor_file.clone(),
            on_head: Mutex::new(None),
        })
    }

    fn wrap(&self, source: rusqlite::Error) -> AuditError {
        AuditError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // a panic while holding the lock cannot leave SQLite inconsistent
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<(), AuditError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.wrap(e))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.wrap(e))?;
        if version as usize > MIGRATIONS.len() {
            return Err(AuditError::TooNew {
                path: self.path.clone(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(|e| self.wrap(e))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(|e| self.wrap(e))?;
            if i + 1 == KEYED_CHAIN_VERSION {
                // the keyed chain starts now: the rows already here are the
                // only ones that may lack a mac, and the count is keyed, so
                // forged unkeyed rows cannot pass as older ones
                let n: i64 = tx
                    .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get(0))
                    .map_err(|e| self.wrap(e))?;
                tx.execute(
                    "INSERT INTO audit_meta (name, value) VALUES ('unkeyed_rows', ?1)",
                    [unkeyed_record(&self.key, n)],
                )
                .map_err(|e| self.wrap(e))?;
            }
        }
        // the key this store is chained with, recorded once
        tx.execute(
            "INSERT OR IGNORE INTO audit_meta (name, value) VALUES ('key_id', ?1)",
            [key_id(&self.key)],
        )
        .map_err(|e| self.wrap(e))?;
        tx.commit().map_err(|e| self.wrap(e))
    }

    /// How many rows predate the keyed chain, from its keyed record
    /// (`Err`: the record is missing or forged).
    fn unkeyed_limit(&self, conn: &Connection) -> rusqlite::Result<Result<i64, String>> {
        let record: Option<String> = conn
            .query_row(
                "SELECT value FROM audit_meta WHERE name = 'unkeyed_rows'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(record) = record else {
            return Ok(Err(
                "the record of rows that predate the keyed chain is missing".into(),
            ));
        };
        let n = record
            .split_once(':')
            .and_then(|(n, _)| n.parse::<i64>().ok());
        Ok(match n {
            Some(n) if unkeyed_record(&self.key, n) == record => Ok(n),
            _ => Err("the record of rows that predate the keyed chain was altered".into()),
        })
    }

    /// The store's recorded key id against ours.
    fn key_problems(&self, conn: &Connection) -> rusqlite::Result<Vec<String>> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if (version as usize) < MIGRATIONS.len() {
            return Ok(vec![format!(
                "its schema is version {version}, older than this binary's {}: open it once with this binary (any command that loads models) to migrate it",
                MIGRATIONS.len()
            )]);
        }
        let recorded: Option<String> = conn
            .query_row(
                "SELECT value FROM audit_meta WHERE name = 'key_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let ours = key_id(&self.key);
        Ok(match recorded {
            Some(k) if k == ours => Vec::new(),
            Some(k) => vec![format!(
                "it is chained with key {k}, not with the key given (id {ours}); give the store's own key (ML_WORKER_AUDIT_KEY or ML_WORKER_AUDIT_KEY_FILE)"
            )],
            None => vec!["its key id is missing from audit_meta".into()],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Calls `hook` with the chain head now and after every row written.
    pub fn on_head(&self, hook: HeadHook) {
        if let Ok(Some(h)) = self.head() {
            hook(&h);
        }
        *self.on_head.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// The newest row's id and mac, if any row exists.
    pub fn head(&self) -> Result<Option<Head>, AuditError> {
        self.lock()
            .query_row(
                "SELECT id, mac FROM audit_log ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok(Head {
                        id: r.get(0)?,
                        mac: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.wrap(e))
    }

    /// Appends one row, chained to the newest one. Returns its id. The
    /// insert must change exactly one row and read back as written;
    /// afterwards the new head goes to the log, the hook and the anchor file.
    pub fn record(&self, event: AuditEvent, e: &AuditEntry) -> Result<i64, AuditError> {
        let head = {
            let mut conn = self.lock();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.wrap(e))?;
            let (prev, prev_mac): (String, String) = tx
                .query_row(
                    "SELECT row_hash, mac FROM audit_log ORDER BY id DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(|e| self.wrap(e))?
                .unwrap_or_else(|| (GENESIS.to_string(), GENESIS.to_string()));
            let prev_mac = if prev_mac.is_empty() {
                // the first keyed row after unkeyed ones
                GENESIS.to_string()
            } else {
                prev_mac
            };
            let mut row = AuditRow {
                id: 0,
                ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                event: event.as_str().to_string(),
                model: e.model.clone(),
                version: e.version.clone(),
                kind: e.kind.clone(),
                path: e.path.clone(),
                sha256: e.sha256.clone(),
                host: self.host.clone(),
                worker_id: self.worker_id.clone(),
                detail: e.detail.clone(),
                prev_hash: prev,
                row_hash: String::new(),
                mac: String::new(),
            };
            row.row_hash = row.content_hash(&row.prev_hash);
            row.mac = chain_mac(&self.key, &prev_mac, &row.row_hash);
            let changed = tx
                .execute(
                    "INSERT INTO audit_log (ts, event, model, version, kind, path, sha256, host, worker_id, detail, prev_hash, row_hash, mac)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    params![
                        row.ts, row.event, row.model, row.version, row.kind, row.path, row.sha256, row.host, row.worker_id,
                        row.detail, row.prev_hash, row.row_hash, row.mac
                    ],
                )
                .map_err(|e| self.wrap(e))?;
            let not_written = |message: String| AuditError::NotWritten {
                path: self.path.clone(),
                message,
            };
            if changed != 1 {
                return Err(not_written(format!(
                    "the insert changed {changed} rows instead of 1 (a trigger or view intercepts it?)"
                )));
            }
            let id = tx.last_insert_rowid();
            let stored: Option<String> = tx
                .query_row("SELECT mac FROM audit_log WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| self.wrap(e))?;
            if stored.as_deref() != Some(row.mac.as_str()) {
                return Err(not_written(format!(
                    "row {id} does not read back as written"
                )));
            }
            tx.commit().map_err(|e| self.wrap(e))?;
            Head { id, mac: row.mac }
        };
        tracing::info!(audit_head = %head, event = event.as_str(), model = %e.model, "audit row written");
        if let Some(hook) = &*self.on_head.lock().unwrap_or_else(|p| p.into_inner()) {
            hook(&head);
        }
        if let Some(anchor) = &self.anchor_file {
            append_anchor(anchor, &head).map_err(|source| AuditError::Anchor {
                path: self.path.clone(),
                anchor: anchor.clone(),
                source,
            })?;
        }
        Ok(head.id)
    }

    /// The newest rows (all when `None`), oldest first; optionally one model's.
    pub fn rows(
        &self,
        model: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditRow>, AuditError> {
        query_rows(&self.lock(), model, limit).map_err(|e| self.wrap(e))
    }

    /// The newest head recorded in the anchor file, if one is configured
    /// and has one.
    pub fn anchored_head(&self) -> Result<Option<Head>, AuditError> {
        Ok(self.anchored_heads()?.pop())
    }

    /// Every head recorded in the anchor file, oldest first.
    pub fn anchored_heads(&self) -> Result<Vec<Head>, AuditError> {
        let Some(anchor) = &self.anchor_file else {
            return Ok(Vec::new());
        };
        read_anchor(anchor).map_err(|source| AuditError::Anchor {
            path: self.path.clone(),
            anchor: anchor.clone(),
            source,
        })
    }

    /// [`AuditStore::verify_against`] every head in the anchor file. An anchor
    /// file that is configured but missing while the store has rows is a
    /// problem (it was removed; to start anchoring an existing store, write
    /// its current head, `ID:MAC`, into the file).
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.verify_with(&[])
    }

    /// [`AuditStore::verify`], also against heads seen elsewhere (the log,
    /// the metric).
    pub fn verify_with(&self, heads: &[Head]) -> Result<VerifyReport, AuditError> {
        let anchored = self.anchored_heads()?;
        let anchors: Vec<Head> = heads.iter().chain(anchored.iter()).cloned().collect();
        let mut report = self.verify_against(&anchors)?;
        if let (Some(file), true, Some(_)) = (&self.anchor_file, anchored.is_empty(), &report.head)
        {
            report.problems.push(format!(
                "the anchor file {} is missing but the store has rows (it was removed; to start anchoring this store, write its head {} into it)",
                file.display(),
                report.head.as_ref().map(|h| h.to_string()).unwrap_or_default()
            ));
        }
        Ok(report)
    }

    /// Re-walks the whole chain in one read snapshot: every row's hash and
    /// mac, every link, ids without gaps, no rows missing at the end, the
    /// schema exactly as the migrations made it, the key, and that the
    /// chain reaches every head in `anchors` with the same mac there.
    pub fn verify_against(&self, anchors: &[Head]) -> Result<VerifyReport, AuditError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.wrap(e))?;
        let rows = query_rows(&tx, None, None).map_err(|e| self.wrap(e))?;
        let mut problems = schema_problems(&tx).map_err(|e| self.wrap(e))?;
        problems.extend(self.key_problems(&tx).map_err(|e| self.wrap(e))?);
        let mut prev = GENESIS.to_string();
        let mut prev_mac = GENESIS.to_string();
        let mut expected_id = 1;
        let mut keyed = false;
        let mut unkeyed_rows = 0;
        let unkeyed_limit = match self.unkeyed_limit(&tx).map_err(|e| self.wrap(e))? {
            Ok(n) => n,
            Err(why) => {
                problems.push(why);
                0
            }
        };
        for r in &rows {
            if r.id != expected_id {
                problems.push(format!("rows {expected_id}..{} are missing", r.id - 1));
            }
            expected_id = r.id + 1;
            if r.prev_hash != prev {
                problems.push(format!(
                    "row {}: chain broken (prev_hash does not match the previous row; a row before it was removed or edited)",
                    r.id
                ));
            }
            if r.content_hash(&r.prev_hash) != r.row_hash {
                problems.push(format!(
                    "row {}: content does not match its row_hash (the row was edited)",
                    r.id
                ));
            }
            if r.mac.is_empty() {
                if keyed || r.id > unkeyed_limit {
                    problems.push(format!(
                        "row {}: no mac, but only rows 1..={unkeyed_limit} predate the keyed chain (the row was forged or edited)",
                        r.id
                    ));
                }
                unkeyed_rows += 1;
            } else {
                keyed = true;
                if chain_mac(&self.key, &prev_mac, &r.row_hash) != r.mac {
                    problems.push(format!(
                        "row {}: its mac does not match the keyed chain (the row or one before it was edited, or the chain recomputed without the key)",
                        r.id
                    ));
                }
                prev_mac = r.mac.clone();
            }
            prev = r.row_hash.clone();
        }
        let seq: Option<i64> = tx
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.wrap(e))?;
        let last = rows.last().map(|r| r.id).unwrap_or(0);
        if seq.unwrap_or(0) > last {
            problems.push(format!(
                "rows {}..={} were removed from the end of the log",
                last + 1,
                seq.unwrap_or(0)
            ));
        }
        // ids run 1, 2, ... (checked above); a head is found by its id
        let mut anchor_problems = anchors.iter().filter_map(|a| {
            let row = usize::try_from(a.id - 1)
                .ok()
                .and_then(|i| rows.get(i))
                .filter(|r| r.id == a.id)
                .or_else(|| rows.iter().find(|r| r.id == a.id));
            match row {
                None => Some(format!(
                    "the anchored head {a} is not in the store: it has {} rows (rows were removed or the store replaced)",
                    rows.len()
                )),
                Some(r) if r.mac != a.mac => Some(format!(
                    "row {}: its mac differs from the anchored head {a} (the chain was rewritten)",
                    r.id
                )),
                Some(_) => None,
            }
        });
        problems.extend(anchor_problems.by_ref().take(10));
        let more = anchor_problems.count();
        if more > 0 {
            problems.push(format!("and {more} more anchored head(s) not matched"));
        }
        Ok(VerifyReport {
            rows: rows.len(),
            unkeyed_rows,
            head: rows.last().map(|r| Head {
                id: r.id,
                mac: r.mac.clone(),
            }),
            problems,
        })
    }
}

/// The key from the options, a key file, or `<db>.key` (created, random,
/// mode 0600, when missing).
fn load_key(db: &Path, options: &AuditOptions) -> Result<Vec<u8>, AuditError> {
    let err = |message: String| AuditError::Key {
        path: db.to_path_buf(),
        message,
    };
    let check = |key: Vec<u8>, from: &str| {
        if key.len() < MIN_KEY_BYTES {
            Err(err(format!("{from} is shorter than {MIN_KEY_BYTES} bytes")))
        } else {
            Ok(key)
        }
    };
    if let Some(k) = &options.key {
        return check(k.clone(), "ML_WORKER_AUDIT_KEY");
    }
    let (file, default) = match &options.key_file {
        Some(f) => (f.clone(), false),
        None => (key_file_for(db), true),
    };
    match std::fs::read(&file) {
        Ok(bytes) => check(trim_ascii(&bytes).to_vec(), &file.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && default => {
            let mut raw = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
                .map_err(|e| err(format!("cannot draw a random key: {e}")))?;
            let key = hex::encode(raw);
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .and_then(|mut f| std::io::Write::write_all(&mut f, key.as_bytes()))
                .map_err(|e| err(format!("cannot create {}: {e}", file.display())))?;
            tracing::warn!(key_file = %file.display(),
                "audit key created beside the database; keep it elsewhere (ML_WORKER_AUDIT_KEY or ML_WORKER_AUDIT_KEY_FILE) so the database's editor cannot read it");
            Ok(key.into_bytes())
        }
        Err(e) => Err(err(format!("{}: {e}", file.display()))),
    }
}

/// `<db>.key`: the default key file.
pub fn key_file_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Adds `head` to the anchor file (one `ID:MAC` line per row, appended).
fn append_anchor(file: &Path, head: &Head) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(file)?;
    writeln!(f, "{head}")?;
    f.sync_data()
}

/// Every head in an anchor file, oldest first (none if it does not exist).
/// Every non-empty line must be a head, with ids strictly increasing (the
/// file is only ever appended to).
fn read_anchor(file: &Path) -> std::io::Result<Vec<Head>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut heads: Vec<Head> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let head: Head = line
            .trim()
            .parse()
            .map_err(|e: String| bad(format!("line {}: {e}", n + 1)))?;
        if let Some(last) = heads.last() {
            if head.id <= last.id {
                return Err(bad(format!(
                    "line {}: head {} follows head {} (ids only grow: the file was edited)",
                    n + 1,
                    head.id,
                    last.id
                )));
            }
        }
        heads.push(head);
    }
    Ok(heads)
}

/// `(type, name, tbl_name, sql)` of every schema object.
type SchemaObject = (String, String, String, Option<String>);

fn schema_of(conn: &Connection) -> rusqlite::Result<Vec<SchemaObject>> {
    let mut stmt =
        conn.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect();
    rows
}

/// The schema the migrations create (applied to an empty in-memory
/// database: the reference text is SQLite's own).
fn expected_schema() -> &'static [SchemaObject] {
    static EXPECTED: std::sync::OnceLock<Vec<SchemaObject>> = std::sync::OnceLock::new();
    EXPECTED.get_or_init(|| {
        let conn = Connection::open_in_memory().expect("in-memory SQLite");
        for sql in MIGRATIONS {
            conn.execute_batch(sql).expect("the migrations apply");
        }
        schema_of(&conn).expect("sqlite_master reads")
    })
}

fn normalize(sql: &Option<String>) -> String {
    sql.as_deref()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .to_string()
}

/// Differences between the store's schema and the migrations': objects
/// added (a trigger that drops inserts, a view), removed or altered.
fn schema_problems(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let actual = schema_of(conn)?;
    let expected = expected_schema();
    let mut problems = Vec::new();
    for (ty, name, table, sql) in &actual {
        match expected.iter().find(|e| &e.0 == ty && &e.1 == name) {
            None => problems.push(format!(
                "unexpected {ty} '{name}' on '{table}' ({}): not created by ml-worker",
                crate::text::escape(&normalize(sql))
            )),
            Some(e) if normalize(&e.3) != normalize(sql) => {
                problems.push(format!("the {ty} '{name}' was altered"))
            }
            Some(_) => {}
        }
    }
    for (ty, name, _, _) in expected {
        if !actual.iter().any(|a| &a.0 == ty && &a.1 == name) {
            problems.push(format!("the {ty} '{name}' was dropped"));
        }
    }
    Ok(problems)
}

/// Rows oldest first; the newest `limit` (all when `None`), optionally one model's.
fn query_rows(
    conn: &Connection,
    model: Option<&str>,
    limit: Option<usize>,
) -> rusqlite::Result<Vec<AuditRow>> {
    let limit = limit.map(|l| l as i64).unwrap_or(-1);
    let mut stmt = conn.prepare(
        "SELECT * FROM (SELECT id, ts, event, model, version, kind, path, sha256, host, worker_id, detail, prev_hash, row_hash, mac
         FROM audit_log WHERE (?1 IS NULL OR model = ?1) ORDER BY id DESC LIMIT ?2) ORDER BY id",
    )?;
    let rows = stmt
        .query_map(params![model, limit], row_from_sql)?
        .collect();
    rows
}

fn row_from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: r.get(0)?,
        ts: r.get(1)?,
        event: r.get(2)?,
        model: r.get(3)?,
        version: r.get(4)?,
        kind: r.get(5)?,
        path: r.get(6)?,
        sha256: r.get(7)?,
        host: r.get(8)?,
        worker_id: r.get(9)?,
        detail: r.get(10)?,
        prev_hash: r.get(11)?,
        row_hash: r.get(12)?,
        mac: r.get(13)?,
    })
}

/// This machine's host name (for audit rows and the default worker id).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

/// The default worker id: `host-pid`.
pub fn default_worker_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(model: &str) -> AuditEntry {
        AuditEntry {
            model: model.into(),
            version: "v1".into(),
            kind: "lightgbm".into(),
            path: "models/m.txt".into(),
            sha256: "ab".repeat(32),
            detail: String::new(),
        }
    }

    #[test]
    fn rows_chain_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db"), "w1").unwrap();
        store.record(AuditEvent::Verify, &entry("a")).unwrap();
        store.record(AuditEvent::Load, &entry("a")).unwrap();
        let rows = store.rows(None, None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prev_hash, GENESIS);
        assert_eq!(rows[1].prev_hash, rows[0].row_hash);
        assert!(store.verify().unwrap().ok());
    }

    #[test]
    fn update_and_delete_are_refused_by_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db"), "w1").unwrap();
        store.record(AuditEvent::Load, &entry("a")).unwrap();
        let conn = store.lock();
        let e = conn
            .execute("UPDATE audit_log SET model = 'b'", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = conn.execute("DELETE FROM audit_log", []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
    }

    #[test]
    fn removing_the_newest_row_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db"), "w1").unwrap();
        store.record(AuditEvent::Load, &entry("a")).unwrap();
        store.record(AuditEvent::Unload, &entry("a")).unwrap();
        {
            let conn = store.lock();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE id = 2;",
            )
            .unwrap();
        }
        let report = store.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("removed from the end")),
            "{report:?}"
        );
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("trigger 'audit_log_no_delete' was dropped")),
            "{report:?}"
        );
    }

    #[test]
    fn a_neutered_trigger_and_a_gap_in_ids_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db"), "w1").unwrap();
        for _ in 0..3 {
            store.record(AuditEvent::Load, &entry("a")).unwrap();
        }
        {
            let conn = store.lock();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_delete;
                 CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log WHEN 0 BEGIN SELECT 1; END;
                 DELETE FROM audit_log WHERE id = 2;",
            )
            .unwrap();
        }
        let report = store.verify().unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("was altered")),
            "{report:?}"
        );
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("rows 2..2 are missing")),
            "{report:?}"
        );
    }

    /// The append-only triggers as migration 2 creates them (to put back
    /// after an edit).
    const NO_UPDATE: &str = "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END;";
    const NO_DELETE: &str = "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END;";

    fn store(dir: &Path, anchor: bool) -> AuditStore {
        let options = AuditOptions {
            key: Some(b"0123456789abcdef-test-key".to_vec()),
            key_file: None,
            anchor_file: anchor.then(|| dir.join("anchor")),
        };
        AuditStore::open_with(&dir.join("a.db"), "w1", &options).unwrap()
    }

    #[test]
    fn a_trigger_that_drops_inserts_is_refused_at_open_and_caught_by_the_row_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        s.record(AuditEvent::Load, &entry("a")).unwrap();
        s.lock()
            .execute_batch(
                "CREATE TRIGGER hide BEFORE INSERT ON audit_log BEGIN SELECT RAISE(IGNORE); END;",
            )
            .unwrap();
        // the open store notices the insert vanished
        let e = s.record(AuditEvent::Load, &entry("b")).unwrap_err();
        assert!(matches!(e, AuditError::NotWritten { .. }), "{e}");
        assert!(e.to_string().contains("changed 0 rows"), "{e}");
        let report = s.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("unexpected trigger 'hide'")),
            "{report:?}"
        );
        drop(s);
        // and a new one refuses to open it
        let options = AuditOptions {
            key: Some(b"0123456789abcdef-test-key".to_vec()),
            ..Default::default()
        };
        let e = AuditStore::open_with(&dir.path().join("a.db"), "w2", &options)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("tampered"), "{e}");
        assert!(e.to_string().contains("unexpected trigger 'hide'"), "{e}");
    }

    #[test]
    fn a_chain_recomputed_without_the_key_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        for m in ["a", "b", "c"] {
            s.record(AuditEvent::Load, &entry(m)).unwrap();
        }
        // the editor changes row 2 and recomputes the SHA-256 chain (and,
        // guessing, the macs with a key of their own)
        {
            let conn = s.lock();
            conn.execute_batch("DROP TRIGGER audit_log_no_update;")
                .unwrap();
            let rows = query_rows(&conn, None, None).unwrap();
            let (mut prev, mut prev_mac) = (GENESIS.to_string(), GENESIS.to_string());
            for mut r in rows {
                if r.id == 2 {
                    r.sha256 = "f".repeat(64);
                }
                r.prev_hash = prev.clone();
                r.row_hash = r.content_hash(&r.prev_hash);
                r.mac = chain_mac(b"a key of their own", &prev_mac, &r.row_hash);
                conn.execute(
                    "UPDATE audit_log SET sha256 = ?1, prev_hash = ?2, row_hash = ?3, mac = ?4 WHERE id = ?5",
                    params![r.sha256, r.prev_hash, r.row_hash, r.mac, r.id],
                )
                .unwrap();
                prev = r.row_hash;
                prev_mac = r.mac;
            }
            conn.execute_batch(NO_UPDATE).unwrap();
        }
        let report = s.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("row 1: its mac does not match the keyed chain")),
            "{report:?}"
        );
        assert!(
            !report.problems.iter().any(|p| p.contains("row_hash")),
            "the unkeyed chain alone looks intact: {report:?}"
        );
    }

    #[test]
    fn every_head_in_the_anchor_file_counts_not_only_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), true);
        for m in ["a", "b", "c"] {
            s.record(AuditEvent::Load, &entry(m)).unwrap();
        }
        let heads = s.anchored_heads().unwrap();
        assert_eq!(heads.iter().map(|h| h.id).collect::<Vec<_>>(), [1, 2, 3]);
        // the newest row removed and the anchor file made to end at the
        // row that is left: its last line matches, its earlier one does not
        {
            let conn = s.lock();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE id = 3;
                 UPDATE sqlite_sequence SET seq = 2 WHERE name = 'audit_log';",
            )
            .unwrap();
            conn.execute_batch(NO_DELETE).unwrap();
        }
        let anchor = dir.path().join("anchor");
        let mut text = std::fs::read_to_string(&anchor).unwrap();
        text.push_str(&format!("{}\n", heads[1]));
        std::fs::write(&anchor, &text).unwrap();
        let e = s.verify().unwrap_err().to_string();
        assert!(e.contains("line 4: head 2 follows head 3"), "{e}");
        // the same without the out-of-order line: head 3 is missing
        let text: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        std::fs::write(&anchor, text).unwrap();
        let report = s.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains(&format!("anchored head {} is not in the store", heads[2]))),
            "{report:?}"
        );
        // a line that is not a head
        std::fs::write(&anchor, format!("{}\nnot a head\n", heads[0])).unwrap();
        let e = s.verify().unwrap_err().to_string();
        assert!(e.contains("line 2:"), "{e}");
    }

    #[test]
    fn removing_rows_and_renumbering_or_emptying_the_store_is_caught_by_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), true);
        for m in ["a", "b", "c"] {
            s.record(AuditEvent::Load, &entry(m)).unwrap();
        }
        let head = s.head().unwrap().unwrap();
        assert_eq!(s.anchored_head().unwrap(), Some(head.clone()));
        assert!(s.verify().unwrap().ok());
        // the newest row removed, sqlite_sequence rewound: the chain that
        // is left is consistent, only the anchor knows
        {
            let conn = s.lock();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE id = 3;
                 UPDATE sqlite_sequence SET seq = 2 WHERE name = 'audit_log';",
            )
            .unwrap();
            conn.execute_batch(NO_DELETE).unwrap();
        }
        let report = s.verify().unwrap();
        assert_eq!(report.rows, 2);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains(&format!("anchored head {head} is not in the store"))),
            "{report:?}"
        );
        // without the anchor file, the head from the log or the metric
        let report = s.verify_against(std::slice::from_ref(&head)).unwrap();
        assert!(!report.ok(), "{report:?}");
        // every row deleted: "0 rows" is not ok
        {
            let conn = s.lock();
            conn.execute_batch(
                "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log; DELETE FROM sqlite_sequence;",
            )
            .unwrap();
            conn.execute_batch(NO_DELETE).unwrap();
        }
        let report = s.verify().unwrap();
        assert_eq!(report.rows, 0);
        assert!(!report.ok(), "{report:?}");
        drop(s);
        // a store that does not reach its anchor is refused at open
        let options = AuditOptions {
            key: Some(b"0123456789abcdef-test-key".to_vec()),
            key_file: None,
            anchor_file: Some(dir.path().join("anchor")),
        };
        assert!(AuditStore::open_with(&dir.path().join("a.db"), "w", &options).is_err());
    }

    #[test]
    fn rows_forged_without_a_mac_do_not_pass_as_older_than_the_keyed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), false);
        for m in ["a", "b", "c"] {
            s.record(AuditEvent::Load, &entry(m)).unwrap();
        }
        // the editor rewrites row 2 and recomputes the unkeyed chain with
        // every mac empty, as if all rows predated the keyed chain
        {
            let conn = s.lock();
            conn.execute_batch("DROP TRIGGER audit_log_no_update;")
                .unwrap();
            let rows = query_rows(&conn, None, None).unwrap();
            let mut prev = GENESIS.to_string();
            for mut r in rows {
                if r.id == 2 {
                    r.sha256 = "f".repeat(64);
                }
                r.prev_hash = prev.clone();
                r.row_hash = r.content_hash(&r.prev_hash);
                conn.execute(
                    "UPDATE audit_log SET sha256 = ?1, prev_hash = ?2, row_hash = ?3, mac = '' WHERE id = ?4",
                    params![r.sha256, r.prev_hash, r.row_hash, r.id],
                )
                .unwrap();
                prev = r.row_hash;
            }
            conn.execute_batch(NO_UPDATE).unwrap();
        }
        let report = s.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("row 1: no mac, but only rows 1..=0 predate")),
            "{report:?}"
        );
        drop(s);
        let options = AuditOptions {
            key: Some(b"0123456789abcdef-test-key".to_vec()),
            ..Default::default()
        };
        let e = AuditStore::open_with(&dir.path().join("a.db"), "w", &options)
            .err()
            .expect("refused at open");
        assert!(e.to_string().contains("no mac"), "{e}");
    }

    #[test]
    fn a_removed_anchor_file_is_a_problem_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), true);
        s.record(AuditEvent::Load, &entry("a")).unwrap();
        assert!(s.verify().unwrap().ok());
        std::fs::remove_file(dir.path().join("anchor")).unwrap();
        let report = s.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("is missing but the store has rows")),
            "{report:?}"
        );
        drop(s);
        let options = AuditOptions {
            key: Some(b"0123456789abcdef-test-key".to_vec()),
            key_file: None,
            anchor_file: Some(dir.path().join("anchor")),
        };
        assert!(AuditStore::open_with(&dir.path().join("a.db"), "w", &options).is_err());
    }

    #[test]
    fn another_key_is_refused_and_a_default_key_file_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let s = AuditStore::open_with(&db, "w", &AuditOptions::default()).unwrap();
        s.record(AuditEvent::Load, &entry("a")).unwrap();
        drop(s);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_file_for(&db))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // reopening finds the same key
        assert!(AuditStore::open_with(&db, "w", &AuditOptions::default()).is_ok());
        let other = AuditOptions {
            key: Some(b"some-other-key-0123456789".to_vec()),
            ..Default::default()
        };
        let e = AuditStore::open_with(&db, "w", &other)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("chained with key"), "{e}");
        let short = AuditOptions {
            key: Some(b"short".to_vec()),
            ..Default::default()
        };
        assert!(AuditStore::open_with(&db, "w", &short).is_err());
    }

    #[test]
    fn reopening_keeps_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.db");
        AuditStore::open(&p, "w1")
            .unwrap()
            .record(AuditEvent::Load, &entry("a"))
            .unwrap();
        let s = AuditStore::open(&p, "w2").unwrap();
        assert_eq!(s.rows(None, None).unwrap().len(), 1);
        let v: i64 = s
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
    }
}
