//! Shared state on Redis, for several brokers and adapters. Writes that must be atomic run as
//! Lua scripts; every revocation is published so other brokers wake their feed readers at
//! once. Revocations expire with what they revoke. Redis failures surface as
//! `StoreError::Unavailable`, which callers turn into denials and refusals.
//!
//! Keys (all under the configured prefix): `rev:cursor` (counter), `rev:log` (sorted set of
//! cursors), `rev:<cursor>` (entry JSON), `rev:index:<kind>:<value>` (idempotency and
//! lookups), `session:<id>`, `generation` (set once, see `Store::generation`), and the
//! pub/sub channel `events`.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::watch;

use super::{NewRevocation, Revocation, SessionRecord, Store, StoreError};
use capgate_core::containment::approval::Approval;
use capgate_core::containment::audit::{next_record, AuditEvent, AuditRecord, GENESIS};
use capgate_core::token::unix_seconds_now;

const REVOKE: &str = r#"
local existing = redis.call('GET', KEYS[1])
if existing then
  local entry = redis.call('GET', ARGV[1] .. existing)
  if entry then return entry end
end
local cursor = redis.call('INCR', KEYS[2])
local expires = cjson.null
if ARGV[7] ~= '' then expires = tonumber(ARGV[7]) end
local entry = cjson.encode({
  cursor = cursor, kind = ARGV[2], value = ARGV[3], reason = ARGV[4],
  revoked_by = ARGV[5], revoked_at = tonumber(ARGV[6]), expires_at = expires
})
redis.call('SET', ARGV[1] .. cursor, entry)
redis.call('SET', KEYS[1], cursor)
redis.call('ZADD', KEYS[3], cursor, cursor)
if ARGV[7] ~= '' then
  redis.call('EXPIREAT', ARGV[1] .. cursor, ARGV[7])
  redis.call('EXPIREAT', KEYS[1], ARGV[7])
end
redis.call('PUBLISH', ARGV[8], cursor)
return entry
"#;

/// Compare-and-set of an approval: KEYS[1] the approval hash, ARGV[1] expected version,
/// ARGV[2] new version, ARGV[3] JSON, ARGV[4] TTL seconds.
const REPLACE_APPROVAL: &str = r#"
local current = redis.call('HGET', KEYS[1], 'version')
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'json', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Fixed-window counter: INCR, and set the expiry on the first event of the window.
const INCREMENT: &str = r#"
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"#;

/// Appends an audit record only if the head is still the one it was computed from:
/// KEYS[1] head hash, KEYS[2] log list; ARGV[1] expected seq, ARGV[2] new seq, ARGV[3] new
/// hash, ARGV[4] record JSON.
const APPEND_AUDIT: &str = r#"
local seq = redis.call('HGET', KEYS[1], 'seq') or '0'
if seq ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'seq', ARGV[2], 'hash', ARGV[3])
return 1
"#;

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    revoke: Script,
    replace_approval: Script,
    increment: Script,
    append_audit: Script,
    /// Serialises this process's appends, so compare-and-set conflicts only arise between
    /// brokers, where a short randomised back-off settles them.
    audit_lock: tokio::sync::Mutex<()>,
    changes: watch::Sender<u64>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects, refuses a Redis that may evict keys, and starts listening for changes.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        check_eviction_policy(&mut conn).await?;
        let (changes, _) = watch::channel(0);
        let subscriber = tokio::spawn(listen(client, format!("{prefix}events"), changes.clone()));
        Ok(RedisStore {
            conn,
            prefix: prefix.to_owned(),
            revoke: Script::new(REVOKE),
            replace_approval: Script::new(REPLACE_APPROVAL),
            increment: Script::new(INCREMENT),
            append_audit: Script::new(APPEND_AUDIT),
            audit_lock: tokio::sync::Mutex::new(()),
            changes,
            subscriber,
        })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }
}

/// Revocations carry TTLs and must never be evicted early: only `noeviction` is safe.
async fn check_eviction_policy(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let policy = reply.get(1).cloned().unwrap_or_default();
    if policy != "noeviction" {
        return Err(StoreError::Misconfigured(format!(
            "Redis maxmemory-policy is {policy:?}: it may evict revocations and other security state; \
             set `maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction, or in redis.conf)"
        )));
    }
    Ok(())
}

/// A Redis with neither an append-only file nor RDB snapshots comes back from a restart
/// empty: every revocation and approval and the audit chain gone, without an error.
async fn check_persistence(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let setting = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .map(|reply| reply.get(1).cloned().unwrap_or_default())
        }
    };
    let (appendonly, save) = match (setting("appendonly").await, setting("save").await) {
        (Ok(appendonly), Ok(save)) => (appendonly, save),
        (Err(e), _) | (_, Err(e)) => {
            return Err(StoreError::Misconfigured(format!(
                "cannot read Redis persistence settings (CONFIG GET failed: {e}), so nothing \
                 shows whether revocations survive a Redis restart; allow CONFIG GET for the \
                 broker's user, or accept the risk with `capgate serve --accept-volatile-store` \
                 ([store] accept_volatile = true)"
            )))
        }
    };
    if appendonly != "yes" && save.trim().is_empty() {
        return Err(StoreError::Misconfigured(
            "Redis does not persist (appendonly no, save \"\"): a Redis restart would silently drop \
             every revocation, approval and audit record; set `appendonly yes` (CONFIG SET \
             appendonly yes, and in redis.conf) or configure `save` snapshots, or accept the risk \
             with `capgate serve --accept-volatile-store` ([store] accept_volatile = true)"
                .into(),
        ));
    }
    Ok(())
}

/// Follows the events channel, reconnecting forever, and publishes the newest cursor seen.
async fn listen(client: redis::Client, channel: String, changes: watch::Sender<u64>) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Ok(cursor) = message.get_payload::<u64>() {
                            changes.send_if_modified(|current| {
                                let newer = cursor > *current;
                                *current = (*current).max(cursor);
                                newer
                            });
                        }
                    }
                }
                tracing::warn!("redis subscription lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to redis events; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn parse_revocation(json: &str) -> Result<Revocation, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("revocation entry: {e}")))
}

#[async_trait]
impl Store for RedisStore {
    async fn record_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(&session).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // Kept a minute past expiry so a late revocation by session still finds its expiry.
        let ttl = session.expires_at.saturating_sub(unix_seconds_now()) + 60;
        let mut conn = self.conn.clone();
        let _: () = conn
            .set_ex(
                self.key(&format!("session:{}", session.session_id)),
                json,
                ttl,
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn session(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn
            .get(self.key(&format!("session:{session_id}")))
            .await
            .map_err(unavailable)?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    async fn revoke(&self, r: NewRevocation) -> Result<Revocation, StoreError> {
        let mut conn = self.conn.clone();
        let json: String = self
            .revoke
            .key(self.key(&format!("rev:index:{}:{}", r.kind.as_str(), r.value)))
            .key(self.key("rev:cursor"))
            .key(self.key("rev:log"))
            .arg(self.key("rev:"))
            .arg(r.kind.as_str())
            .arg(&r.value)
            .arg(&r.reason)
            .arg(&r.revoked_by)
            .arg(unix_seconds_now())
            .arg(r.expires_at.map(|e| e.to_string()).unwrap_or_default())
            .arg(self.key("events"))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let entry = parse_revocation(&json)?;
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
        let mut conn = self.conn.clone();
        let log = self.key("rev:log");
        // Expired entries leave their cursor in the log; drop those and look again, so a page
        // full of expired cursors never hides newer entries.
        for _ in 0..8 {
            let cursors: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
                .arg(&log)
                .arg(format!("({cursor}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit.max(1))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if cursors.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = cursors
                .iter()
                .map(|c| self.key(&format!("rev:{c}")))
                .collect();
            let entries: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut live = Vec::new();
            let mut expired = Vec::new();
            for (c, entry) in cursors.iter().zip(entries) {
                match entry {
                    Some(json) => live.push(parse_revocation(&json)?),
                    None => expired.push(*c),
                }
            }
            if !expired.is_empty() {
                let _: () = conn.zrem(&log, expired).await.map_err(unavailable)?;
            }
            if !live.is_empty() {
                return Ok(live);
            }
        }
        Ok(Vec::new())
    }

    async fn agent_revoked(&self, agent: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        conn.exists(self.key(&format!("rev:index:agent:{agent}")))
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn check_durable(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        check_persistence(&mut conn).await
    }

    async fn generation(&self) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        conn.get(self.key("generation")).await.map_err(unavailable)
    }

    async fn init_generation(&self, candidate: &str) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.key("generation");
        let _: bool = conn.set_nx(&key, candidate).await.map_err(unavailable)?;
        let stored: Option<String> = conn.get(&key).await.map_err(unavailable)?;
        stored.ok_or_else(|| StoreError::Lost("the generation vanished as it was set".into()))
    }

    async fn revocation_head(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let head: Option<u64> = conn
            .get(self.key("rev:cursor"))
            .await
            .map_err(unavailable)?;
        Ok(head.unwrap_or(0))
    }

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.key(&format!("approval:{}", approval.id));
        let json = to_json(approval)?;
        let ttl = approval_ttl(approval);
        let created: bool = redis::cmd("HSETNX")
            .arg(&key)
            .arg("json")
            .arg(&json)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !created {
            return Err(StoreError::Corrupt(format!(
                "approval {} already exists",
                approval.id
            )));
        }
        let _: () = redis::pipe()
            .hset(&key, "version", approval.version)
            .expire(&key, ttl as i64)
            .zadd(self.key("approvals"), &approval.id, approval.created_at)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn
            .hget(self.key(&format!("approval:{id}")), "json")
            .await
            .map_err(unavailable)?;
        json.map(|j| from_json(&j)).transpose()
    }

    async fn approvals(&self) -> Result<Vec<Approval>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .zrevrange(self.key("approvals"), 0, 999)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for id in ids {
            // Expired approvals disappear; their index entries are skipped.
            if let Some(approval) = self.approval(&id).await? {
                out.push(approval);
            }
        }
        Ok(out)
    }

    async fn replace_approval(&self, next: &Approval) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let replaced: i64 = self
            .replace_approval
            .key(self.key(&format!("approval:{}", next.id)))
            .arg(next.version.saturating_sub(1))
            .arg(next.version)
            .arg(to_json(next)?)
            .arg(approval_ttl(next))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(replaced == 1)
    }

    async fn increment(&self, key: &str, window: Duration) -> Result<u64, StoreError> {
        let window = window.as_secs().max(1);
        let now = unix_seconds_now();
        let mut conn = self.conn.clone();
        self.increment
            .key(self.key(&format!("count:{key}:{}", now / window)))
            .arg(window + 1)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn set_frozen(&self, frozen: bool) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn
            .set(self.key("frozen"), if frozen { "1" } else { "0" })
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn frozen(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<String> = conn.get(self.key("frozen")).await.map_err(unavailable)?;
        Ok(value.as_deref() == Some("1"))
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord, StoreError> {
        let _serialised = self.audit_lock.lock().await;
        let mut conn = self.conn.clone();
        let head_key = self.key("audit:head");
        for attempt in 0..64u64 {
            if attempt > 0 {
                let jitter = capgate_core::token::random_id().as_bytes()[0] as u64 % 8;
                tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
            }
            let (seq, hash): (Option<u64>, Option<String>) = redis::cmd("HMGET")
                .arg(&head_key)
                .arg("seq")
                .arg("hash")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let seq = seq.unwrap_or(0);
            let hash = hash.unwrap_or_else(|| GENESIS.to_owned());
            let previous = (seq > 0).then_some((seq, hash.as_str()));
            let record = next_record(previous, event.clone(), unix_seconds_now());
            let appended: i64 = self
                .append_audit
                .key(&head_key)
                .key(self.key("audit:log"))
                .arg(seq)
                .arg(record.seq)
                .arg(&record.hash)
                .arg(to_json(&record)?)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if appended == 1 {
                return Ok(record);
            }
        }
        Err(StoreError::Unavailable(
            "audit chain kept moving under concurrent appends".into(),
        ))
    }

    async fn audit_since(&self, seq: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut conn = self.conn.clone();
        // Records are appended in sequence order starting at 1, so seq N is at index N - 1.
        let start = seq as isize;
        let stop = start + limit.max(1) as isize - 1;
        let rows: Vec<String> = conn
            .lrange(self.key("audit:log"), start, stop)
            .await
            .map_err(unavailable)?;
        rows.iter().map(|j| from_json(j)).collect()
    }

    async fn audit_head(&self) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let seq: Option<u64> = conn
            .hget(self.key("audit:head"), "seq")
            .await
            .map_err(unavailable)?;
        Ok(seq.unwrap_or(0))
    }
}

/// Approvals are kept a day past their expiry, for the record.
fn approval_ttl(approval: &Approval) -> u64 {
    approval.expires_at.saturating_sub(unix_seconds_now()) + 86_400
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}
