//! The broker: an axum service that issues tokens, publishes keys and revocations, and answers
//! dry-run authorisation questions. One file per API resource; `problem` maps every error.
//!
//! The route table below is the single source of what the broker serves: the router is built
//! from it and a test compares it with `openapi.yaml`.

mod approvals;
mod audit;
mod authorize;
mod console;
mod containment;
mod health;
mod integrity;
mod keys;
mod metrics;
pub mod problem;
mod revocations;
mod tokens;
pub mod webhooks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::identity::Authenticator;
use crate::store::Store;
use capgate_core::guard::{ContainmentView, Guard, GuardConfig, KeyView};
use capgate_core::policy::{GrantEvaluator, PolicySet};
use capgate_core::revocation::RevocationView;
use capgate_core::token::Keyring;
use problem::ApiError;

pub use capgate_core::wire::{
    AuditPage, AuthorizationDetail, CountResponse, FeedPage, FreezeState, GrantResponse,
    TokenResponse,
};
pub use integrity::{CheckpointDocument, Recovered, StoreIntegrity, CHECKPOINT_INTERVAL};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Adapters ship decisions in batches of up to 500 records of about 1 KiB each (a record
/// keeps the token's blocks, for replay), so the audit route alone takes bigger bodies.
pub const MAX_AUDIT_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How often the broker refreshes its own revocation view and key ring from disk and store.
const REFRESH_INTERVAL: Duration = Duration::from_millis(250);
pub use capgate_core::revocation::DEFAULT_MAX_STALENESS;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] capgate_core::token::KeyError),
    #[error(transparent)]
    Policy(#[from] capgate_core::policy::PolicyError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityConfigError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Integrity(#[from] integrity::IntegrityError),
    #[error(transparent)]
    Webhook(#[from] webhooks::WebhookError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

pub struct BrokerState {
    pub config: BrokerConfig,
    keyring: RwLock<Arc<Keyring>>,
    keys: KeyView,
    pub authenticator: Authenticator,
    pub grants: GrantEvaluator,
    pub guard: Guard,
    pub store: Arc<dyn Store>,
    /// The store's generation, whether it was lost, and the audit checkpoints.
    pub integrity: StoreIntegrity,
    /// Latest revocation cursor, for long-polling feed readers.
    revocation_cursor: watch::Sender<u64>,
    /// Bumped when something other than a revocation changes what the feed says (freeze).
    feed_epoch: watch::Sender<u64>,
    /// Issuance, approval and webhook counters for `/metrics`.
    pub metrics: Arc<capgate_core::metrics::BrokerMetrics>,
    /// Approval events to webhook sinks, queued without waiting.
    pub notifier: webhooks::Notifier,
    /// Operators signed in to the approvals console.
    console: console::Sessions,
}

impl BrokerState {
    /// Loads everything the broker needs and refuses to start on any doubt.
    pub async fn open(config: BrokerConfig) -> Result<Arc<Self>, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (keyring, created) = Keyring::open_or_create(&config.data_dir)?;
        if created {
            tracing::info!(key_id = keyring.active_key_id(), "generated a new root key");
        }
        let grant_policy = PolicySet::load_dir(&config.policies)?;
        let adapter_policy = PolicySet::load_dir(&config.adapter_policies)?;
        let authenticator =
            Authenticator::with_adapters(&config.identity, &config.operators, &config.adapters)?;
        let notifier = webhooks::Notifier::new(&config.notifications, config.listen)?;
        let store: Arc<dyn Store> = crate::store::open(&config).await?;
        let integrity = StoreIntegrity::open(&config, store.as_ref(), &keyring).await?;
        let keys: KeyView = Arc::new(RwLock::new(Arc::new(keyring.public_keys()?)));
        let guard = Guard::new(
            GuardConfig {
                adapter: "broker-dry-run".into(),
                max_token_bytes: config.tokens.max_token_bytes,
                max_staleness: DEFAULT_MAX_STALENESS,
                limits: config.datalog.clone(),
                cache_capacity: 10_000,
            },
            keys.clone(),
            Arc::new(RevocationView::new()),
            adapter_policy,
        )
        .with_containment(Arc::new(ContainmentView::new()));
        guard
            .containment()
            .set_document(capgate_core::containment::ContainmentDocument::new(
                &config.containment,
                &keyring.approval_key().public(),
            ))
            .map_err(|why| {
                StartError::Keys(capgate_core::token::KeyError::Corrupt {
                    path: config.data_dir.clone(),
                    why,
                })
            })?;
        Ok(Arc::new(BrokerState {
            grants: GrantEvaluator::new(grant_policy, config.grant_settings()),
            config,
            keyring: RwLock::new(Arc::new(keyring)),
            keys,
            authenticator,
            guard,
            store,
            integrity,
            revocation_cursor: watch::channel(0).0,
            feed_epoch: watch::channel(0).0,
            metrics: Arc::new(capgate_core::metrics::BrokerMetrics::new(
                notifier.sink_metrics(),
            )),
            notifier,
            console: console::Sessions::default(),
        }))
    }

    pub fn keyring(&self) -> Result<Arc<Keyring>, ApiError> {
        self.keyring.read().map(|k| k.clone()).map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "keys_unavailable",
                "signing keys are unavailable",
            )
        })
    }

    /// Appends to the audit trail; failure is an error for the caller (fail closed).
    pub(crate) async fn audit(
        &self,
        kind: capgate_core::containment::audit::AuditKind,
        actor: Option<&str>,
        detail: serde_json::Value,
    ) -> Result<(), ApiError> {
        let event = capgate_core::containment::audit::AuditEvent {
            kind,
            actor: actor.map(str::to_owned),
            detail,
        };
        self.store
            .append_audit(event)
            .await
            .map(|_| ())
            .map_err(|e| {
                tracing::error!(error = %e, "audit record could not be stored");
                ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "the audit trail cannot be written; nothing was done",
                )
            })
    }

    /// Counts an approval event and queues it for the webhook sinks (never waits).
    pub(crate) fn announce(
        &self,
        event: &str,
        approval: &capgate_core::containment::approval::Approval,
    ) {
        use capgate_core::containment::approval::ApprovalStatus;
        // The first of two approvals leaves the request pending: announced, not counted.
        if !(event == "approved" && approval.status != ApprovalStatus::Approved) {
            self.metrics.approval_event(event);
        }
        let kind = match event {
            "requested" => "approval.requested",
            "expired" => "approval.expired",
            "used" => return,
            _ => "approval.decided",
        };
        let environment = self
            .config
            .environments
            .iter()
            .find(|env| {
                env.resources
                    .iter()
                    .any(|r| r.covers(&approval.operation.resource))
            })
            .map(|env| env.name.clone());
        self.notifier.publish(kind, approval, environment);
    }

    /// Marks pending approvals past their expiry as expired and announces each. Several
    /// brokers may sweep the same store: the compare-and-set lets exactly one move each.
    async fn sweep_expired(&self) {
        use capgate_core::containment::approval::{ApprovalAction, ApprovalStatus};
        let now = capgate_core::token::unix_seconds_now();
        let approvals = match self.store.approvals().await {
            Ok(approvals) => approvals,
            Err(e) => {
                tracing::warn!(error = %e, "expiry sweep: cannot list approvals");
                return;
            }
        };
        for approval in approvals {
            if approval.status != ApprovalStatus::Pending || now < approval.expires_at {
                continue;
            }
            let expired = crate::store::update_approval(
                self.store.as_ref(),
                &approval.id,
                &ApprovalAction::Expire,
                now,
            )
            .await;
            match expired {
                Ok(expired) => {
                    let recorded = self
                        .audit(
                            capgate_core::containment::audit::AuditKind::Approval,
                            None,
                            serde_json::json!({"event": "expired", "approval": expired}),
                        )
                        .await;
                    if recorded.is_err() {
                        tracing::error!(approval_id = %expired.id, "expired approval not recorded in the audit trail");
                    }
                    tracing::warn!(approval_id = %expired.id, agent = %expired.agent, "approval expired undecided");
                    self.announce("expired", &expired);
                }
                // Another broker (or an operator) moved it first: nothing to announce here.
                Err(crate::store::UpdateError::Rejected(_)) => {}
                Err(e) => {
                    tracing::warn!(approval_id = %approval.id, error = %e, "expiry sweep failed")
                }
            }
        }
    }

    /// Wakes long-polling feed readers so they pick up a changed freeze flag at once.
    pub(crate) fn wake_feed(&self) {
        self.feed_epoch.send_modify(|epoch| *epoch += 1);
    }

    pub(crate) fn notify_revocation(&self, cursor: u64) {
        self.revocation_cursor.send_if_modified(|current| {
            let newer = cursor > *current;
            if newer {
                *current = cursor;
            }
            newer
        });
    }

    /// Pulls new revocations from the store into the dry-run guard's view and wakes feed
    /// readers. The store is the source of truth, so several brokers converge on it.
    async fn refresh_revocations(&self) {
        let sent = Instant::now();
        let view = self.guard.revocations();
        let refreshed = async {
            let frozen = self.store.frozen().await?;
            let entries = self.store.revocations_since(view.cursor(), 10_000).await?;
            Ok::<_, crate::store::StoreError>((frozen, entries))
        };
        match refreshed.await {
            Ok((frozen, entries)) => {
                self.guard.containment().set_frozen(frozen);
                view.apply(&entries, sent);
                self.notify_revocation(view.cursor());
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot refresh revocations; dry runs will deny once stale")
            }
        }
    }

    /// Picks up `capgate keys rotate` run against the same data directory.
    fn reload_keys_if_changed(&self, last: &mut Option<SystemTime>) {
        let modified = Keyring::ring_modified(&self.config.data_dir);
        if modified == *last {
            return;
        }
        *last = modified;
        match Keyring::open(&self.config.data_dir).and_then(|ring| Ok((ring.public_keys()?, ring)))
        {
            Ok((public, ring)) => {
                tracing::info!(active_key_id = ring.active_key_id(), "key ring reloaded");
                if let (Ok(mut keys), Ok(mut keyring)) = (self.keys.write(), self.keyring.write()) {
                    *keys = Arc::new(public);
                    *keyring = Arc::new(ring);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "key ring changed but cannot be loaded; keeping the previous one")
            }
        }
    }
}

/// Every route the broker serves: (method, path, handler). The router is built from this.
pub fn route_table() -> Vec<(Method, &'static str, MethodRouter<Arc<BrokerState>>)> {
    vec![
        (Method::POST, "/v1/tokens", post(tokens::issue)),
        (Method::GET, "/v1/keys", get(keys::list)),
        (Method::POST, "/v1/revocations", post(revocations::create)),
        (Method::GET, "/v1/revocations", get(revocations::feed)),
        (Method::POST, "/v1/authorize", post(authorize::dry_run)),
        (Method::GET, "/v1/health", get(health::health)),
        (Method::GET, "/metrics", get(metrics::scrape)),
        (Method::GET, "/v1/containment", get(containment::document)),
        (Method::POST, "/v1/velocity", post(containment::count)),
        (Method::POST, "/v1/uses", post(containment::count_use)),
        (Method::GET, "/v1/freeze", get(containment::freeze_state)),
        (Method::POST, "/v1/freeze", post(containment::set_freeze)),
        (Method::POST, "/v1/approvals", post(approvals::create)),
        (Method::GET, "/v1/approvals", get(approvals::list)),
        (Method::GET, "/v1/approvals/{id}", get(approvals::show)),
        (
            Method::POST,
            "/v1/approvals/{id}/approve",
            post(approvals::approve),
        ),
        (
            Method::POST,
            "/v1/approvals/{id}/deny",
            post(approvals::deny),
        ),
        (
            Method::POST,
            "/v1/approvals/{id}/cancel",
            post(approvals::cancel),
        ),
        (
            Method::POST,
            "/v1/approvals/{id}/grant",
            post(approvals::grant),
        ),
        (
            Method::POST,
            "/v1/approvals/{id}/consume",
            post(approvals::consume),
        ),
        (
            Method::POST,
            "/v1/approvals/{id}/preview",
            post(approvals::attach_preview),
        ),
        (
            Method::POST,
            "/v1/audit",
            post(audit::append).layer(DefaultBodyLimit::max(MAX_AUDIT_BODY_BYTES)),
        ),
        (Method::GET, "/v1/audit", get(audit::read)),
        (Method::GET, "/v1/audit/checkpoint", get(integrity::latest)),
        (Method::POST, "/v1/store/recover", post(integrity::recover)),
        // The approvals console: HTML for operators in a browser (console/mod.rs).
        (Method::GET, "/ui", get(console::home)),
        (Method::GET, "/ui/login", get(console::login_form)),
        (Method::POST, "/ui/login", post(console::login)),
        (Method::POST, "/ui/logout", post(console::logout)),
        (Method::POST, "/ui/freeze", post(console::freeze)),
        (
            Method::POST,
            "/ui/approvals/{id}/approve",
            post(console::approve),
        ),
        (Method::POST, "/ui/approvals/{id}/deny", post(console::deny)),
    ]
}

pub fn router(state: Arc<BrokerState>) -> Router {
    let mut by_path: BTreeMap<&str, MethodRouter<Arc<BrokerState>>> = BTreeMap::new();
    for (_, path, handler) in route_table() {
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(handler),
            None => handler,
        };
        by_path.insert(path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(
            path,
            handler.fallback(|| async { ApiError::method_not_allowed() }),
        );
    }
    router
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            integrity::refuse_while_lost,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Starts background refreshers and serves until `shutdown` completes.
pub async fn serve(
    config: BrokerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let addr = config.listen;
    let state = BrokerState::open(config).await?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    run(listener, state, shutdown).await
}

pub async fn run(
    listener: TcpListener,
    state: Arc<BrokerState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    state.refresh_revocations().await;
    let background = state.clone();
    let refresher = tokio::spawn(async move {
        let mut ring_modified = Keyring::ring_modified(&background.config.data_dir);
        let mut ticker = tokio::time::interval(REFRESH_INTERVAL);
        let mut changes = background.store.changes();
        loop {
            // A change published by any broker sharing the store wakes us at once; the tick
            // keeps the view's freshness honest when nothing changes.
            tokio::select! {
                _ = ticker.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        ticker.tick().await;
                    }
                }
            }
            background.refresh_revocations().await;
            background
                .integrity
                .watch(
                    background.store.as_ref(),
                    background.guard.revocations().cursor(),
                )
                .await;
            background.reload_keys_if_changed(&mut ring_modified);
        }
    });
    let checkpointing = state.clone();
    let checkpointer = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CHECKPOINT_INTERVAL);
        loop {
            ticker.tick().await;
            if let Err(e) = checkpointing
                .integrity
                .checkpoint(checkpointing.store.as_ref())
                .await
            {
                tracing::error!(error = %e, "cannot checkpoint the audit trail");
            }
        }
    });
    let sweeping = state.clone();
    let sweeper = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(sweeping.config.notifications.expiry_sweep);
        loop {
            ticker.tick().await;
            if sweeping.integrity.lost().is_none() {
                sweeping.sweep_expired().await;
            }
        }
    });
    let deliveries = state.notifier.spawn();
    let last_checkpoint = state.clone();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "capgate broker listening");
    }
    let limits = state.config.connections.clone();
    // One descriptor per client connection: the broker opens none per request.
    let result =
        capgate_net::connections::http::serve(listener, router(state), limits, 1, shutdown)
            .await
            .map_err(StartError::Serve);
    refresher.abort();
    checkpointer.abort();
    sweeper.abort();
    for delivery in deliveries {
        delivery.abort();
    }
    // What was appended since the last tick is pinned before the broker goes away.
    if let Err(e) = last_checkpoint
        .integrity
        .checkpoint(last_checkpoint.store.as_ref())
        .await
    {
        tracing::error!(error = %e, "cannot checkpoint the audit trail at shutdown");
    }
    result
}
