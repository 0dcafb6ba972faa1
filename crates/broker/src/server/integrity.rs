//! Whether the store is still the store this broker knew, and evidence of the audit trail
//! kept outside it.
//!
//! - At start: a store that would not survive its own restart is refused (unless accepted),
//!   and the store's generation and audit head are compared with the signed checkpoint in the
//!   data directory: another generation, or no generation, is a lost store; a trail behind or
//!   disagreeing with the checkpoint was truncated or rewritten. Either refuses to start
//!   unless the operator says otherwise (`StartOverrides`).
//! - While serving: the generation, the revocation cursor and the audit head are watched; a
//!   store that loses any of them is *lost*: every route that depends on its state answers
//!   `store_lost` (adapters then deny everything) until an operator recovers it
//!   (`POST /v1/store/recover`), which starts a new generation seeded with the revocations
//!   this broker still remembers. A new generation is never created silently.
//! - A checkpoint of the audit head is signed and written atomically at most every
//!   `CHECKPOINT_INTERVAL` when the head moved, and on shutdown.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use biscuit_auth::KeyPair;
use serde::{Deserialize, Serialize};

use super::approvals::operator;
use super::problem::ApiError;
use super::BrokerState;
use crate::config::{BrokerConfig, StartOverrides};
use crate::store::{NewRevocation, RevocationKind, Store, StoreError};
use capgate_core::containment::audit::{AuditEvent, AuditKind, Tamper, GENESIS};
use capgate_core::containment::checkpoint::{self, Checkpoint, CheckpointError};
use capgate_core::token::{random_id, unix_seconds_now, Keyring};

/// How often the audit head is checkpointed when it moved.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Keys(#[from] capgate_core::token::KeyError),
    /// The store would not survive its own restart; `why` names the setting and the flag.
    #[error("{why}")]
    Volatile { why: String },
    #[error(
        "store lost: the audit checkpoint {path} names store generation {expected}, but the \
         store has {found}: it was emptied or replaced, with every revocation, approval and \
         audit record it held. Find out what happened; restore the store if you can; start \
         with --accept-store-loss to begin a new generation (revocations made before the loss \
         must then be made again)"
    )]
    Lost {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "the audit trail does not match the signed checkpoint {path}: {tamper}. Investigate \
         (`capgate audit verify`); start with --accept-audit-rollback to continue from the \
         store as it is"
    )]
    BehindCheckpoint { path: PathBuf, tamper: Tamper },
    #[error(
        "the audit checkpoint {path} is not signed by this broker's checkpoint key ({why}); \
         start with --accept-audit-rollback to replace it"
    )]
    Forged { path: PathBuf, why: String },
}

pub struct StoreIntegrity {
    data_dir: PathBuf,
    key: KeyPair,
    generation: RwLock<String>,
    /// Why the store is lost; `None` while it is the store this broker knew.
    lost: RwLock<Option<String>>,
    last: Mutex<Option<Checkpoint>>,
}

impl StoreIntegrity {
    /// The start checks described in the module documentation; takes the first checkpoint.
    pub async fn open(
        config: &BrokerConfig,
        store: &dyn Store,
        keyring: &Keyring,
    ) -> Result<StoreIntegrity, IntegrityError> {
        if let Err(e) = store.check_durable().await {
            let StoreError::Misconfigured(why) = e else {
                return Err(e.into());
            };
            if !config.store.accept_volatile {
                return Err(IntegrityError::Volatile { why });
            }
            tracing::warn!(%why, "starting on a volatile store, as configured");
        }
        let overrides: &StartOverrides = &config.overrides;
        let key = keyring.checkpoint_key()?;
        let path = checkpoint::path(&config.data_dir);
        let mut previous = checkpoint::load(&config.data_dir)?;
        if let Some(cp) = &previous {
            if let Err(e) = cp.verify(&key.public()) {
                if !overrides.accept_audit_rollback {
                    return Err(IntegrityError::Forged {
                        path,
                        why: e.to_string(),
                    });
                }
                tracing::warn!(error = %e, "replacing a checkpoint that does not verify, as told");
                previous = None;
            }
        }
        let stored = store.generation().await?;
        let generation = match (stored, &previous) {
            (Some(found), Some(cp)) if found == cp.generation => found,
            (Some(found), None) => {
                // A data directory new to this store (another broker made it), or one whose
                // checkpoint was removed: nothing to compare with, so the first one is taken now.
                tracing::warn!(generation = %found, "no audit checkpoint in the data directory; taking the first");
                found
            }
            (None, None) => store.init_generation(&random_id()).await?,
            (found, Some(cp)) => {
                if !overrides.accept_store_loss {
                    return Err(IntegrityError::Lost {
                        path,
                        expected: cp.generation.clone(),
                        found: found.unwrap_or_else(|| "none".into()),
                    });
                }
                let kept = checkpoint::archive(&config.data_dir, cp)?;
                let generation = match found {
                    Some(found) => found,
                    None => store.init_generation(&random_id()).await?,
                };
                tracing::warn!(old = %cp.generation, new = %generation, archived = %kept.display(), "store loss accepted: a new generation");
                store
                    .append_audit(integrity_event(
                        "store_loss_accepted",
                        &cp.generation,
                        &generation,
                        cp,
                        0,
                    ))
                    .await?;
                previous = None;
                generation
            }
        };
        if let Some(cp) = &previous {
            if let Err(tamper) = compare(store, cp).await? {
                if !overrides.accept_audit_rollback {
                    return Err(IntegrityError::BehindCheckpoint { path, tamper });
                }
                tracing::warn!(%tamper, "audit trail behind its checkpoint; continuing as told");
                checkpoint::archive(&config.data_dir, cp)?;
                store
                    .append_audit(AuditEvent {
                        kind: AuditKind::Integrity,
                        actor: None,
                        detail: serde_json::json!({
                            "event": "audit_rollback_accepted",
                            "found": tamper.to_string(),
                            "checkpoint": { "seq": cp.seq, "hash": cp.hash },
                        }),
                    })
                    .await?;
            }
        }
        let integrity = StoreIntegrity {
            data_dir: config.data_dir.clone(),
            key,
            generation: RwLock::new(generation),
            lost: RwLock::new(None),
            last: Mutex::new(None),
        };
        integrity.checkpoint(store).await?;
        Ok(integrity)
    }

    pub fn generation(&self) -> String {
        self.generation
            .read()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    pub fn lost(&self) -> Option<String> {
        match self.lost.read() {
            Ok(lost) => lost.clone(),
            Err(_) => Some("integrity state poisoned".into()),
        }
    }

    fn mark_lost(&self, why: String) {
        if let Ok(mut lost) = self.lost.write() {
            if lost.is_none() {
                tracing::error!(%why, "store lost: refusing everything that depends on it until an operator recovers it");
                *lost = Some(why);
            }
        }
    }

    pub fn latest(&self) -> Option<Checkpoint> {
        self.last.lock().ok().and_then(|last| last.clone())
    }

    /// One look at the store: is it still the generation we know, and has nothing gone
    /// backwards? `known_cursor` is the newest revocation cursor this broker has applied.
    /// A store that cannot be reached is unavailable, not lost.
    pub async fn watch(&self, store: &dyn Store, known_cursor: u64) {
        if !self.check_generation(store).await {
            return;
        }
        if let Ok(head) = store.revocation_head().await {
            if head < known_cursor {
                self.mark_lost(format!(
                    "the revocation feed went back from cursor {known_cursor} to {head}"
                ));
            }
        }
    }

    /// Whether the store still has the generation this broker knows (marks it lost if not).
    /// `false` also when it cannot be asked: the caller learns nothing more from it then.
    pub async fn check_generation(&self, store: &dyn Store) -> bool {
        if self.lost().is_some() {
            return false;
        }
        let expected = self.generation();
        match store.generation().await {
            Ok(Some(found)) if found == expected => true,
            Ok(found) => {
                self.mark_lost(format!(
                    "the store's generation is {}, not {expected}: it was emptied or replaced",
                    found.as_deref().unwrap_or("gone")
                ));
                false
            }
            Err(_) => false,
        }
    }

    /// Signs and writes a checkpoint of the current head if it moved, after checking that
    /// the previous one still holds (a trail that fell behind it marks the store lost).
    pub async fn checkpoint(&self, store: &dyn Store) -> Result<(), IntegrityError> {
        if self.lost().is_some() {
            return Ok(());
        }
        let head = store.audit_head().await?;
        if let Some(last) = self.latest() {
            if head == last.seq {
                return Ok(());
            }
            if let Err(tamper) = compare(store, &last).await? {
                self.mark_lost(tamper.to_string());
                return Ok(());
            }
        }
        let hash = record_hash_at(store, head).await?;
        let checkpoint = Checkpoint::sign(
            &self.key,
            &self.generation(),
            head,
            &hash,
            unix_seconds_now(),
        )?;
        let dir = self.data_dir.clone();
        let written = checkpoint.clone();
        tokio::task::spawn_blocking(move || checkpoint::store(&dir, &written))
            .await
            .map_err(|e| StoreError::Unavailable(format!("checkpoint task failed: {e}")))??;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(checkpoint);
        }
        Ok(())
    }
}

/// Where the store's trail stands against `cp`: behind it, disagreeing with it, or fine.
async fn compare(store: &dyn Store, cp: &Checkpoint) -> Result<Result<(), Tamper>, StoreError> {
    let head = store.audit_head().await?;
    if head < cp.seq {
        return Ok(Err(Tamper::BehindCheckpoint {
            found: head,
            checkpoint: cp.seq,
        }));
    }
    if record_hash_at(store, cp.seq).await? != cp.hash {
        return Ok(Err(Tamper::CheckpointMismatch { seq: cp.seq }));
    }
    Ok(Ok(()))
}

async fn record_hash_at(store: &dyn Store, seq: u64) -> Result<String, StoreError> {
    if seq == 0 {
        return Ok(GENESIS.to_owned());
    }
    let records = store.audit_since(seq.saturating_sub(1), 1).await?;
    records
        .into_iter()
        .find(|r| r.seq == seq)
        .map(|r| r.hash)
        .ok_or_else(|| StoreError::Corrupt(format!("audit record {seq} is missing")))
}

fn integrity_event(
    event: &str,
    previous: &str,
    generation: &str,
    checkpoint: &Checkpoint,
    restored: u64,
) -> AuditEvent {
    AuditEvent {
        kind: AuditKind::Integrity,
        actor: None,
        detail: serde_json::json!({
            "event": event,
            "previous_generation": previous,
            "generation": generation,
            "previous_checkpoint": { "seq": checkpoint.seq, "hash": checkpoint.hash },
            "restored_revocations": restored,
        }),
    }
}

/// Routes that still answer while the store is lost: they read nothing from it that could
/// allow anything, and operators need them to see and recover.
fn answers_while_lost(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/v1/health")
            | (&Method::GET, "/metrics")
            | (&Method::GET, "/v1/keys")
            | (&Method::GET, "/v1/containment")
            | (&Method::GET, "/v1/audit")
            | (&Method::GET, "/v1/audit/checkpoint")
            | (&Method::POST, "/v1/store/recover")
    )
}

/// Refuses every other route with `store_lost` while the store is lost; the revocation feed
/// among them, which tells adapters to drop their view and deny until it answers again.
pub async fn refuse_while_lost(
    State(state): State<Arc<BrokerState>>,
    request: Request,
    next: Next,
) -> Response {
    match state.integrity.lost() {
        Some(why) if !answers_while_lost(request.method(), request.uri().path()) => {
            ApiError::from(StoreError::Lost(why)).into_response()
        }
        _ => next.run(request).await,
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointDocument {
    pub checkpoint: Option<Checkpoint>,
}

/// `GET /v1/audit/checkpoint`: the newest signed checkpoint, for adapters and auditors to
/// keep and compare (its signer is named inside; pin it from the data directory).
pub async fn latest(State(state): State<Arc<BrokerState>>) -> Json<CheckpointDocument> {
    Json(CheckpointDocument {
        checkpoint: state.integrity.latest(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Recovered {
    pub previous_generation: String,
    pub generation: String,
    /// Revocations this broker remembered and wrote into the new generation.
    pub restored: u64,
}

/// `POST /v1/store/recover` (operators): accepts the loss. Starts a new generation (or
/// joins the one another broker started), writes back every revocation and the freeze flag
/// this broker still holds in memory, records what happened as the new trail's first record,
/// and checkpoints it.
pub async fn recover(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
) -> Result<Json<Recovered>, ApiError> {
    let operator = operator(&state, &headers)?;
    let integrity = &state.integrity;
    if integrity.lost().is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "store_not_lost",
            "the store is the one this broker knows; nothing to recover",
        ));
    }
    let store = state.store.as_ref();
    let previous = integrity.generation();
    let generation = store.init_generation(&random_id()).await?;
    let max_ttl = state.config.tokens.max_ttl.as_secs();
    let mut restored = 0;
    for (kind, value) in state.guard.revocations().entries() {
        store
            .revoke(NewRevocation {
                kind,
                value,
                reason: "restored after the store was lost".into(),
                revoked_by: operator.name.clone(),
                // What was revoked before the loss expires within the longest token life.
                expires_at: (kind != RevocationKind::Agent).then(|| unix_seconds_now() + max_ttl),
            })
            .await?;
        restored += 1;
    }
    if state.guard.containment().frozen() {
        store.set_frozen(true).await?;
    }
    let old = integrity.latest();
    if let Some(old) = &old {
        checkpoint::archive(&integrity.data_dir, old).map_err(internal)?;
    }
    let old = old.unwrap_or(Checkpoint {
        generation: previous.clone(),
        seq: 0,
        hash: GENESIS.into(),
        at: 0,
        public_key: String::new(),
        signature: String::new(),
    });
    store
        .append_audit(AuditEvent {
            actor: Some(operator.name.clone()),
            ..integrity_event("store_recovered", &previous, &generation, &old, restored)
        })
        .await?;
    if let Ok(mut g) = integrity.generation.write() {
        *g = generation.clone();
    }
    if let Ok(mut last) = integrity.last.lock() {
        *last = None;
    }
    // The new generation's cursors start again: the broker's own view follows from zero
    // (before the store counts as found again, so the watcher never sees the old cursor).
    state.guard.revocations().restart_cursor();
    if let Ok(mut lost) = integrity.lost.write() {
        *lost = None;
    }
    integrity.checkpoint(store).await.map_err(internal)?;
    state.wake_feed();
    tracing::warn!(operator = %operator.name, %previous, %generation, restored, "store recovered: new generation");
    Ok(Json(Recovered {
        previous_generation: previous,
        generation,
        restored,
    }))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "store recovery failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "recovery_failed",
        "the store could not be recovered; see the broker's log",
    )
}
