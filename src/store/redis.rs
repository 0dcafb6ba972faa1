//! Shared state on Redis, for several brokers and adapters. Writes that must be atomic run as
//! Lua scripts; every revocation is published so other brokers wake their feed readers at
//! once. Revocations expire with what they revoke. Redis failures surface as
//! `StoreError::Unavailable`, which callers turn into denials and refusals.
//!
//! Keys (all under the configured prefix): `rev:cursor` (counter), `rev:log` (sorted set of
//! cursors), `rev:<cursor>` (entry JSON), `rev:index:<kind>:<value>` (idempotency and
//! lookups), `session:<id>`, and the pub/sub channel `events`.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::watch;

use super::{NewRevocation, Revocation, SessionRecord, Store, StoreError};
use crate::token::unix_seconds_now;

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

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    revoke: Script,
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
}
