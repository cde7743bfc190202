//! The audit store: an append-only, hash-chained SQLite log of every model
//! load, verification, refusal, fallback and unload.
//!
//! - Append-only: triggers make the database refuse `UPDATE` and `DELETE` on
//!   `audit_log`.
//! - Hash-chained: each row stores `prev_hash` (the previous row's `row_hash`,
//!   64 zeros for the first) and `row_hash = SHA256(prev_hash || content)`, so
//!   [`AuditStore::verify`] finds any row edited or removed behind the
//!   triggers' back (e.g. by someone who dropped them in the sqlite3 shell).
//!   Removing the newest rows is caught through `sqlite_sequence`, which
//!   remembers the highest id ever handed out.
//! - Schema migrations are numbered in [`MIGRATIONS`] and tracked with
//!   `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

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
];

/// The append-only triggers exactly as migration 2 creates them.
const TRIGGERS: [(&str, &str); 2] = [
    (
        "audit_log_no_update",
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    ),
    (
        "audit_log_no_delete",
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
    ),
];

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::Verify => "verify",
            AuditEvent::Load => "load",
            AuditEvent::Refuse => "refuse",
            AuditEvent::Fallback => "fallback",
            AuditEvent::Unload => "unload",
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

/// The outcome of [`AuditStore::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows: usize,
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
}

/// The audit store. Cheap to share: one connection behind a mutex (writes are
/// rare: model lifecycle events only).
pub struct AuditStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    host: String,
    worker_id: String,
}

impl AuditStore {
    /// Opens (creating if needed) the store at `path`, in WAL mode, and
    /// applies pending migrations.
    pub fn open(path: &Path, worker_id: &str) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
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
        };
        store.migrate()?;
        Ok(store)
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
        }
        tx.commit().map_err(|e| self.wrap(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Appends one row, chained to the newest one. Returns its id.
    pub fn record(&self, event: AuditEvent, e: &AuditEntry) -> Result<i64, AuditError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.wrap(e))?;
        let prev: String = tx
            .query_row(
                "SELECT row_hash FROM audit_log ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.wrap(e))?
            .unwrap_or_else(|| GENESIS.to_string());
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
        };
        row.row_hash = row.content_hash(&row.prev_hash);
        tx.execute(
            "INSERT INTO audit_log (ts, event, model, version, kind, path, sha256, host, worker_id, detail, prev_hash, row_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                row.ts, row.event, row.model, row.version, row.kind, row.path, row.sha256, row.host, row.worker_id,
                row.detail, row.prev_hash, row.row_hash
            ],
        )
        .map_err(|e| self.wrap(e))?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(|e| self.wrap(e))?;
        Ok(id)
    }

    /// The newest `limit` rows (all when `None`), oldest first; optionally one model's.
    pub fn rows(
        &self,
        model: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditRow>, AuditError> {
        query_rows(&self.lock(), model, limit).map_err(|e| self.wrap(e))
    }

    /// Re-walks the whole chain in one read snapshot: every row's hash,
    /// every link, ids without gaps, no rows missing at the end, and the
    /// append-only triggers in place and unaltered.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.wrap(e))?;
        let rows = query_rows(&tx, None, None).map_err(|e| self.wrap(e))?;
        let mut problems = Vec::new();
        let mut prev = GENESIS.to_string();
        let mut expected_id = 1;
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
        for (name, want) in TRIGGERS {
            let sql: Option<String> = tx
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1 AND tbl_name = 'audit_log'",
                    [name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.wrap(e))?;
            match sql {
                None => problems.push(format!("the append-only trigger {name} was dropped")),
                Some(sql) if sql.trim().trim_end_matches(';') != want => {
                    problems.push(format!("the append-only trigger {name} was altered"))
                }
                Some(_) => {}
            }
        }
        Ok(VerifyReport {
            rows: rows.len(),
            problems,
        })
    }
}

/// Rows oldest first; the newest `limit` (all when `None`), optionally one model's.
fn query_rows(
    conn: &Connection,
    model: Option<&str>,
    limit: Option<usize>,
) -> rusqlite::Result<Vec<AuditRow>> {
    let limit = limit.map(|l| l as i64).unwrap_or(-1);
    let mut stmt = conn.prepare(
        "SELECT * FROM (SELECT id, ts, event, model, version, kind, path, sha256, host, worker_id, detail, prev_hash, row_hash
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
                .any(|p| p.contains("audit_log_no_delete was dropped")),
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
