//! The embedded default store: one SQLite file in the data directory, needing nothing
//! installed. Writes are synchronous (WAL, synchronous=FULL) so nothing acknowledged is lost
//! on restart. Queries run on the blocking pool, never on the async executor.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::watch;

use super::{NewRevocation, Revocation, RevocationKind, SessionRecord, Store, StoreError};
use capgate_core::containment::approval::Approval;
use capgate_core::containment::audit::{next_record, AuditEvent, AuditRecord};
use capgate_core::token::unix_seconds_now;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    agent      TEXT NOT NULL,
    key_id     INTEGER NOT NULL,
    issued_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    rights     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    cursor     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    expires_at INTEGER,
    UNIQUE (kind, value)
);
CREATE TABLE IF NOT EXISTS approvals (
    id         TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    json       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    key        TEXT PRIMARY KEY,
    count      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq  INTEGER PRIMARY KEY,
    json TEXT NOT NULL
);
";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    changes: watch::Sender<u64>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(unavailable)?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            changes: watch::channel(0).0,
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn row_to_revocation(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Revocation, String)> {
    let kind: String = row.get(1)?;
    Ok((
        Revocation {
            cursor: row.get::<_, i64>(0)? as u64,
            kind: RevocationKind::Token,
            value: row.get(2)?,
            reason: row.get(3)?,
            revoked_by: row.get(4)?,
            revoked_at: row.get::<_, i64>(5)? as u64,
            expires_at: row.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        },
        kind,
    ))
}

fn with_kind((mut revocation, kind): (Revocation, String)) -> Result<Revocation, StoreError> {
    revocation.kind = RevocationKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown revocation kind {kind:?}")))?;
    Ok(revocation)
}

const REVOCATION_COLUMNS: &str = "cursor, kind, value, reason, revoked_by, revoked_at, expires_at";

#[async_trait]
impl Store for SqliteStore {
    async fn record_session(&self, s: SessionRecord) -> Result<(), StoreError> {
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO sessions (session_id, agent, key_id, issued_at, expires_at, rights)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    s.session_id,
                    s.agent,
                    s.key_id,
                    s.issued_at as i64,
                    s.expires_at as i64,
                    s.rights
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn session(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let id = session_id.to_owned();
        self.with(move |conn| {
            conn.query_row(
                "SELECT session_id, agent, key_id, issued_at, expires_at, rights
                 FROM sessions WHERE session_id = ?1",
                params![id],
                |row| {
                    Ok(SessionRecord {
                        session_id: row.get(0)?,
                        agent: row.get(1)?,
                        key_id: row.get(2)?,
                        issued_at: row.get::<_, i64>(3)? as u64,
                        expires_at: row.get::<_, i64>(4)? as u64,
                        rights: row.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn revoke(&self, r: NewRevocation) -> Result<Revocation, StoreError> {
        let entry = self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute(
                "INSERT INTO revocations (kind, value, reason, revoked_by, revoked_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (kind, value) DO NOTHING",
                params![
                    r.kind.as_str(),
                    r.value,
                    r.reason,
                    r.revoked_by,
                    unix_seconds_now() as i64,
                    r.expires_at.map(|v| v as i64)
                ],
            )
            .map_err(unavailable)?;
            let row = tx
                .query_row(
                    &format!(
                        "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE kind = ?1 AND value = ?2"
                    ),
                    params![r.kind.as_str(), r.value],
                    row_to_revocation,
                )
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            with_kind(row)
        })
        .await?;
        self.changes.send_if_modified(|current| {
            let newer = entry.cursor > *current;
            *current = (*current).max(entry.cursor);
            newer
        });
        Ok(entry)
    }

    async fn revocations_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE cursor > ?1 ORDER BY cursor LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![cursor as i64, limit as i64], row_to_revocation)
                .map_err(unavailable)?;
            rows.map(|row| row.map_err(unavailable).and_then(with_kind))
                .collect()
        })
        .await
    }

    async fn agent_revoked(&self, agent: &str) -> Result<bool, StoreError> {
        let agent = agent.to_owned();
        self.with(move |conn| {
            conn.query_row(
                "SELECT 1 FROM revocations WHERE kind = 'agent' AND value = ?1",
                params![agent],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(unavailable)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn generation(&self) -> Result<Option<String>, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT value FROM flags WHERE name = 'generation'",
                [],
                |row| row.get::<_, String>(0),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn init_generation(&self, candidate: &str) -> Result<String, StoreError> {
        let candidate = candidate.to_owned();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO flags (name, value) VALUES ('generation', ?1)
                 ON CONFLICT (name) DO NOTHING",
                params![candidate],
            )
            .map_err(unavailable)?;
            conn.query_row(
                "SELECT value FROM flags WHERE name = 'generation'",
                [],
                |row| row.get(0),
            )
            .map_err(unavailable)
        })
        .await
    }

    async fn revocation_head(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(cursor), 0) FROM revocations",
                [],
                |row| row.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(unavailable)
        })
        .await
    }

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError> {
        let json = to_json(approval)?;
        let (id, version, created) = (approval.id.clone(), approval.version, approval.created_at);
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO approvals (id, version, created_at, json) VALUES (?1, ?2, ?3, ?4)",
                params![id, version as i64, created as i64, json],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        let id = id.to_owned();
        let json: Option<String> = self
            .with(move |conn| {
                conn.query_row(
                    "SELECT json FROM approvals WHERE id = ?1",
                    params![id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        json.map(|j| from_json(&j)).transpose()
    }

    async fn approvals(&self) -> Result<Vec<Approval>, StoreError> {
        let rows: Vec<String> = self
            .with(|conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT json FROM approvals ORDER BY created_at DESC LIMIT 1000",
                    )
                    .map_err(unavailable)?;
                let rows = stmt.query_map([], |row| row.get(0)).map_err(unavailable)?;
                rows.map(|r| r.map_err(unavailable)).collect()
            })
            .await?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    async fn replace_approval(&self, next: &Approval) -> Result<bool, StoreError> {
        let json = to_json(next)?;
        let (id, version) = (next.id.clone(), next.version);
        self.with(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE approvals SET version = ?2, json = ?3 WHERE id = ?1 AND version = ?4",
                    params![id, version as i64, json, version as i64 - 1],
                )
                .map_err(unavailable)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn increment(&self, key: &str, window: std::time::Duration) -> Result<u64, StoreError> {
        let window = window.as_secs().max(1);
        let now = unix_seconds_now();
        let key = format!("{key}:{}", now / window);
        let expires_at = (now / window + 1) * window;
        self.with(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            tx.execute(
                "DELETE FROM counters WHERE expires_at <= ?1",
                params![now as i64],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO counters (key, count, expires_at) VALUES (?1, 1, ?2)
                 ON CONFLICT (key) DO UPDATE SET count = count + 1",
                params![key, expires_at as i64],
            )
            .map_err(unavailable)?;
            let count: i64 = tx
                .query_row(
                    "SELECT count FROM counters WHERE key = ?1",
                    params![key],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(count as u64)
        })
        .await
    }

    async fn set_frozen(&self, frozen: bool) -> Result<(), StoreError> {
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO flags (name, value) VALUES ('frozen', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![if frozen { "1" } else { "0" }],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn frozen(&self) -> Result<bool, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT value FROM flags WHERE name = 'frozen'", [], |row| {
                row.get::<_, String>(0)
            })
            .optional()
            .map(|v| v.as_deref() == Some("1"))
            .map_err(unavailable)
        })
        .await
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord, StoreError> {
        let mut records = self
            .with(move |conn| append_chained(conn, vec![event]))
            .await?;
        records
            .pop()
            .ok_or_else(|| StoreError::Corrupt("audit append returned nothing".into()))
    }

    /// One transaction, one fsync, for the whole batch.
    async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<u64, StoreError> {
        let records = self.with(move |conn| append_chained(conn, events)).await?;
        Ok(records.last().map(|r| r.seq).unwrap_or(0))
    }

    async fn audit_since(&self, seq: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<String> = self
            .with(move |conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT json FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                    .map_err(unavailable)?;
                let rows = stmt
                    .query_map(params![seq as i64, limit as i64], |row| row.get(0))
                    .map_err(unavailable)?;
                rows.map(|r| r.map_err(unavailable)).collect()
            })
            .await?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    async fn audit_head(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|v| v as u64)
            .map_err(unavailable)
        })
        .await
    }
}

/// Appends `events` to the chain inside one transaction and returns the stored records.
fn append_chained(
    conn: &mut Connection,
    events: Vec<AuditEvent>,
) -> Result<Vec<AuditRecord>, StoreError> {
    let tx = conn.transaction().map_err(unavailable)?;
    // Cached statements: preparing them anew cost a tenth of an append.
    let last: Option<String> = tx
        .prepare_cached("SELECT json FROM audit ORDER BY seq DESC LIMIT 1")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)).optional())
        .map_err(unavailable)?;
    let mut previous: Option<AuditRecord> = last.map(|j| from_json(&j)).transpose()?;
    let mut records = Vec::with_capacity(events.len());
    let mut insert = tx
        .prepare_cached("INSERT INTO audit (seq, json) VALUES (?1, ?2)")
        .map_err(unavailable)?;
    for event in events {
        let record = next_record(
            previous.as_ref().map(|r| (r.seq, r.hash.as_str())),
            event,
            unix_seconds_now(),
        );
        insert
            .execute(params![record.seq as i64, to_json(&record)?])
            .map_err(unavailable)?;
        previous = Some(record.clone());
        records.push(record);
    }
    drop(insert);
    tx.commit().map_err(unavailable)?;
    Ok(records)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(kind: RevocationKind, value: &str) -> NewRevocation {
        NewRevocation {
            kind,
            value: value.into(),
            reason: "test".into(),
            revoked_by: "alice".into(),
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn revocations_survive_reopen_and_cursor_is_monotonic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let store = SqliteStore::open(&path).expect("open");
            let a = store
                .revoke(revocation(RevocationKind::Agent, "bot"))
                .await
                .expect("a");
            let b = store
                .revoke(revocation(RevocationKind::Session, "s1"))
                .await
                .expect("b");
            assert!(b.cursor > a.cursor);
            let again = store
                .revoke(revocation(RevocationKind::Agent, "bot"))
                .await
                .expect("again");
            assert_eq!(again.cursor, a.cursor, "revoking twice is idempotent");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert!(store.agent_revoked("bot").await.expect("query"));
        assert!(!store.agent_revoked("other").await.expect("query"));
        let all = store.revocations_since(0, 100).await.expect("feed");
        assert_eq!(all.len(), 2);
        let rest = store
            .revocations_since(all[0].cursor, 100)
            .await
            .expect("feed");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].kind, RevocationKind::Session);
    }
}
