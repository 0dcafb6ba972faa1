//! The guard: the one decision path every adapter (and the broker's dry run) goes through.
//!
//! "May this token do this verb on this resource, now?" Cheap rejections come first (size,
//! expiry), then root key and signature, then the local revocation view, then the token's own
//! checks together with the adapter policy over request facts the adapter derived itself.
//! The guard never does network I/O; every error is a deny. Only the guard can construct an
//! `Authorized<T>`, so an adapter cannot forward anything it did not ask about.

mod cache;
pub mod containment;
mod decisions;
mod record;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use biscuit_auth::builder::{date, fact, string};
use biscuit_auth::error::{FailedCheck, Logic, MatchedPolicy, Token as BiscuitError};
use serde::Serialize;

use crate::policy::PolicySet;
use crate::revocation::{RevocationDenial, RevocationView};
use crate::scope::Verb;
use crate::settings::RunLimits;
use crate::token::{random_id, verify, PublicKeySet, TokenRejected, VerifiedToken};
pub use cache::VerifiedCache;
pub use containment::{ContainmentView, Ledger, LedgerCode, LedgerDenial, Obligation};
pub use decisions::DecisionCache;
pub use record::{decision_event, decision_verb};

/// What an adapter asks about: one operation (kept under its first name for the adapters
/// that ask about one at a time).
pub use crate::operation::Operation as Request;
pub use crate::operation::Operation;

/// Stable deny codes, part of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    TokenTooLarge,
    TokenMalformed,
    TokenUnknownKey,
    TokenKeyRetired,
    TokenBadSignature,
    TokenExpired,
    TokenRevoked,
    RevocationFeedStale,
    /// The store behind the feed was lost or replaced; the view is being read again.
    RevocationFeedReset,
    PolicyDenied,
    PolicyRunLimit,
    PolicyError,
    ContainmentUnavailable,
    Frozen,
    RecoveryPoint,
    RateLimited,
    ApprovalInvalid,
    AuditUnavailable,
    UseBudgetExhausted,
    /// An allow that still needs a ledger (approval, counting, audit) asked without one.
    ObligationsUnfulfilled,
}

impl DenyCode {
    /// Every code, for counters that need one slot each.
    pub const ALL: [DenyCode; 20] = [
        DenyCode::TokenTooLarge,
        DenyCode::TokenMalformed,
        DenyCode::TokenUnknownKey,
        DenyCode::TokenKeyRetired,
        DenyCode::TokenBadSignature,
        DenyCode::TokenExpired,
        DenyCode::TokenRevoked,
        DenyCode::RevocationFeedStale,
        DenyCode::RevocationFeedReset,
        DenyCode::PolicyDenied,
        DenyCode::PolicyRunLimit,
        DenyCode::PolicyError,
        DenyCode::ContainmentUnavailable,
        DenyCode::Frozen,
        DenyCode::RecoveryPoint,
        DenyCode::RateLimited,
        DenyCode::ApprovalInvalid,
        DenyCode::AuditUnavailable,
        DenyCode::UseBudgetExhausted,
        DenyCode::ObligationsUnfulfilled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::TokenTooLarge => "token_too_large",
            DenyCode::TokenMalformed => "token_malformed",
            DenyCode::TokenUnknownKey => "token_unknown_key",
            DenyCode::TokenKeyRetired => "token_key_retired",
            DenyCode::TokenBadSignature => "token_bad_signature",
            DenyCode::TokenExpired => "token_expired",
            DenyCode::TokenRevoked => "token_revoked",
            DenyCode::RevocationFeedStale => "revocation_feed_stale",
            DenyCode::RevocationFeedReset => "revocation_feed_reset",
            DenyCode::PolicyDenied => "policy_denied",
            DenyCode::PolicyRunLimit => "policy_run_limit",
            DenyCode::PolicyError => "policy_error",
            DenyCode::ContainmentUnavailable => "containment_unavailable",
            DenyCode::Frozen => "frozen",
            DenyCode::RecoveryPoint => "recovery_point",
            DenyCode::RateLimited => "rate_limited",
            DenyCode::ApprovalInvalid => "approval_invalid",
            DenyCode::AuditUnavailable => "audit_unavailable",
            DenyCode::UseBudgetExhausted => "use_budget_exhausted",
            DenyCode::ObligationsUnfulfilled => "obligations_unfulfilled",
        }
    }

    /// Whether the token itself is unusable (HTTP 401) rather than not allowed this (403).
    pub fn is_authentication_failure(self) -> bool {
        matches!(
            self,
            DenyCode::TokenTooLarge
                | DenyCode::TokenMalformed
                | DenyCode::TokenUnknownKey
                | DenyCode::TokenKeyRetired
                | DenyCode::TokenBadSignature
                | DenyCode::TokenExpired
                | DenyCode::TokenRevoked
        )
    }
}

/// Why the guard refused a token itself, before any question about a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({reason})", code.as_str())]
pub struct TokenDenial {
    pub code: DenyCode,
    pub reason: String,
}

/// The one table from a token's rejection to its deny code.
impl From<&TokenRejected> for DenyCode {
    fn from(rejected: &TokenRejected) -> Self {
        match rejected {
            TokenRejected::TooLarge { .. } => DenyCode::TokenTooLarge,
            TokenRejected::Malformed => DenyCode::TokenMalformed,
            TokenRejected::MissingKeyId | TokenRejected::UnknownRootKey(_) => {
                DenyCode::TokenUnknownKey
            }
            TokenRejected::RetiredRootKey(_) => DenyCode::TokenKeyRetired,
            TokenRejected::BadSignature => DenyCode::TokenBadSignature,
            TokenRejected::Expired => DenyCode::TokenExpired,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny {
        code: DenyCode,
        reason: String,
    },
    /// Destructive: the token alone is not enough. The adapter creates the approval request
    /// at the broker and fills in its id.
    ApprovalRequired {
        approval_id: Option<String>,
        digest: String,
    },
}

/// A decision with its id, for logs, responses and the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub agent: Option<String>,
    pub session: Option<String>,
    /// Which policy allowed, or which checks failed.
    pub explanation: Vec<String>,
    /// What an allow still requires of the adapter before it may forward.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub obligations: Vec<Obligation>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.outcome == Outcome::Allow
    }
}

/// Proof that the guard allowed `T`. Only this module can make one: adapters forward what an
/// `Authorized` wraps, so nothing outside the core may forge it.
///
/// ```compile_fail,E0451
/// // Outside the core crate the fields are private: no struct literal...
/// let forged = capgate_core::guard::Authorized {
///     inner: b"DROP TABLE bookings".to_vec(),
///     decision_id: String::new(),
///     shadow_deny: None,
/// };
/// ```
///
/// ```compile_fail,E0599
/// // ...and no constructor.
/// let forged = capgate_core::guard::Authorized::new(b"DROP TABLE bookings".to_vec());
/// ```
#[derive(Debug)]
pub struct Authorized<T> {
    inner: T,
    decision_id: String,
    /// In shadow mode: the deny that enforce mode would have returned.
    shadow_deny: Option<Box<Decision>>,
}

impl<T> Authorized<T> {
    /// The deny a shadow-mode pass let through, if any.
    pub fn shadow_deny(&self) -> Option<&Decision> {
        self.shadow_deny.as_deref()
    }

    pub fn decision_id(&self) -> &str {
        &self.decision_id
    }

    pub fn get(&self) -> &T {
        &self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// When an operation of a request takes effect, which decides what is settled when it is
/// asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// It runs when the request is forwarded: every obligation is fulfilled first, an
    /// approval consumed or (when missing) requested.
    Run,
    /// It is prepared now and may run later, any number of times (a PostgreSQL Parse). An
    /// operation that needs an approval is judged now for everything else: the approval is
    /// neither consumed nor requested (it must name what each run binds) and nothing is
    /// counted or recorded; the adapter asks again, at [`Stage::Run`], for every run. An
    /// operation that needs no approval is settled now, as if it ran.
    Prepare,
}

/// How a request is authorised: the one choice an adapter makes (its mode, and whether it
/// can fulfil obligations through a ledger).
#[derive(Clone, Copy)]
pub enum Enforcement<'a> {
    /// A deny is final.
    Enforce(Option<&'a dyn Ledger>),
    /// The request goes through either way, carrying the deny enforce mode would have made.
    Shadow(Option<&'a dyn Ledger>),
}

/// A batch that was not authorised: the decision that stopped it and which operation (by
/// its index in the request) it is about.
#[derive(Debug)]
pub struct Refusal {
    pub decision: Box<Decision>,
    pub index: usize,
}

#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Adapter name, given to policies as `adapter($name)` and logged.
    pub adapter: String,
    pub max_token_bytes: usize,
    /// How old the revocation view may be before every decision is a deny.
    pub max_staleness: Duration,
    pub limits: RunLimits,
    /// How many verified tokens, and how many allows, to remember (0 disables both caches).
    pub cache_capacity: usize,
}

/// Keys the guard verifies against; replaced wholesale when the published set changes.
pub type KeyView = Arc<RwLock<Arc<PublicKeySet>>>;

pub struct Guard {
    config: GuardConfig,
    containment: Arc<ContainmentView>,
    keys: KeyView,
    revocations: Arc<RevocationView>,
    policy: PolicySet,
    /// Policy texts by index, for explanations (computed once, not per decision).
    policy_texts: Vec<String>,
    cache: VerifiedCache,
    decisions: DecisionCache,
    ids: DecisionIds,
    /// Counted after every final decision, in atomics (no lock on the request path).
    metrics: Arc<crate::metrics::DecisionMetrics>,
}

/// Decision ids: unique, cheap, and not guessable across processes (random prefix).
struct DecisionIds {
    prefix: String,
    counter: AtomicU64,
}

impl DecisionIds {
    fn new() -> Self {
        DecisionIds {
            prefix: random_id()[..16].to_owned(),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}{:016x}",
            self.prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Guard {
    pub fn new(
        config: GuardConfig,
        keys: KeyView,
        revocations: Arc<RevocationView>,
        policy: PolicySet,
    ) -> Self {
        Guard {
            containment: Arc::new(ContainmentView::new()),
            policy_texts: authorizer_policies(&policy),
            cache: VerifiedCache::new(config.cache_capacity),
            decisions: DecisionCache::new(config.cache_capacity, policy_profile(&policy)),
            metrics: Arc::new(crate::metrics::DecisionMetrics::new(&config.adapter)),
            config,
            keys,
            revocations,
            policy,
            ids: DecisionIds::new(),
        }
    }

    /// Shares a containment view kept fresh by the adapter's sync. Without one, every
    /// non-read verb is denied (`containment_unavailable`).
    pub fn with_containment(mut self, view: Arc<ContainmentView>) -> Self {
        self.containment = view;
        self
    }

    /// Resizes the decision cache (0 turns it off); by default it holds `cache_capacity` allows.
    pub fn with_decision_cache(mut self, capacity: usize) -> Self {
        self.decisions = DecisionCache::new(capacity, policy_profile(&self.policy));
        self
    }

    pub fn containment(&self) -> &Arc<ContainmentView> {
        &self.containment
    }

    pub fn cache(&self) -> &VerifiedCache {
        &self.cache
    }

    pub fn decisions(&self) -> &DecisionCache {
        &self.decisions
    }

    /// This guard's decision counters and latency, for `/metrics`.
    pub fn metrics(&self) -> &Arc<crate::metrics::DecisionMetrics> {
        &self.metrics
    }

    /// Decides at a given instant, without logging (tests and benchmarks).
    pub fn decide_at(
        &self,
        token: &str,
        request: &Request,
        now: SystemTime,
        mono: Instant,
    ) -> Decision {
        self.evaluate(token, request, now, mono).0
    }

    pub fn revocations(&self) -> &Arc<RevocationView> {
        &self.revocations
    }

    /// Authenticates a Capgate token without asking about any resource: size, expiry, key,
    /// signature and revocation. The broker uses it where the token itself is the credential.
    pub fn verify_token(&self, token: &str) -> Result<Arc<VerifiedToken>, TokenDenial> {
        self.token_check(token, SystemTime::now(), Instant::now())
            .map_err(|failure| TokenDenial {
                code: failure.code,
                reason: failure.reason,
            })
    }

    /// Key view, signature (or cache), expiry and revocation: everything about the token
    /// itself, before any question about a resource.
    fn token_check(
        &self,
        token: &str,
        now: SystemTime,
        mono: Instant,
    ) -> Result<Arc<VerifiedToken>, TokenFailure> {
        let failure = |code, reason: String, verified: Option<Arc<VerifiedToken>>| TokenFailure {
            code,
            reason,
            verified,
        };
        let keys = self.keys.read().map(|k| k.clone()).map_err(|_| {
            failure(
                DenyCode::TokenUnknownKey,
                "key view unavailable".into(),
                None,
            )
        })?;
        let verified = self
            .verified(token, &keys, now)
            .map_err(|rejected| failure(DenyCode::from(&rejected), rejected.to_string(), None))?;
        if let Err(denial) = self
            .revocations
            .check(&verified, self.config.max_staleness, mono)
        {
            let code = match denial {
                RevocationDenial::Revoked(_) => DenyCode::TokenRevoked,
                RevocationDenial::NeverSynced | RevocationDenial::Stale { .. } => {
                    DenyCode::RevocationFeedStale
                }
                RevocationDenial::FeedReset => DenyCode::RevocationFeedReset,
            };
            return Err(failure(code, denial.to_string(), Some(verified)));
        }
        Ok(verified)
    }

    /// Decides, logs the decision, and returns it.
    pub fn decide(&self, token: &str, request: &Request) -> Decision {
        let started = Instant::now();
        let (decision, _) = self.evaluate(token, request, SystemTime::now(), started);
        log_decision(&self.config.adapter, request, &decision, "enforce");
        self.metrics
            .record(request.verb, &decision.outcome, started);
        decision
    }

    /// The one way an adapter is allowed to forward: every operation of the request is
    /// decided and `payload` wrapped as proof only as `enforcement` says.
    ///
    /// In enforce mode with a ledger, every operation is decided first, with no side effect;
    /// the request stops at its first deny, else at its first approval-required operation
    /// (whose approval request is created, so an operator is never asked about a request that
    /// would be denied anyway). Only when all are allowed are their obligations fulfilled
    /// (consume the approval, count against velocity limits, record in the audit trail), in
    /// order; a failure there denies the whole request (obligations already fulfilled stay
    /// fulfilled: an approval consumed by an earlier operation is spent, failing closed).
    /// Without a ledger, an allow that still carries obligations is a deny
    /// (`obligations_unfulfilled`). In shadow mode each operation is decided, logged and
    /// recorded as in enforce mode (a non-read only once its record is stored), then the
    /// request goes through carrying the first deny enforce mode would have made. A request of
    /// no operation authorises nothing.
    pub async fn authorize<T>(
        &self,
        token: &str,
        operations: &[Operation],
        payload: T,
        enforcement: Enforcement<'_>,
    ) -> Result<Authorized<T>, Box<Decision>> {
        match enforcement {
            Enforcement::Enforce(Some(ledger)) => self
                .authorize_each(
                    token,
                    operations.len(),
                    |index| {
                        operations
                            .get(index)
                            .map(|operation| (operation, Stage::Run))
                    },
                    payload,
                    ledger,
                )
                .await
                .map_err(|refusal| refusal.decision),
            Enforcement::Enforce(None) => self.authorize_unsettled(token, operations, payload),
            Enforcement::Shadow(ledger) => {
                self.authorize_shadow(token, operations, payload, ledger)
                    .await
            }
        }
    }

    /// Enforce mode without a ledger: only allows with nothing left to do pass.
    fn authorize_unsettled<T>(
        &self,
        token: &str,
        operations: &[Operation],
        payload: T,
    ) -> Result<Authorized<T>, Box<Decision>> {
        if operations.is_empty() {
            return Err(Box::new(self.empty_batch()));
        }
        let (now, started) = (SystemTime::now(), Instant::now());
        let mut ids = Vec::with_capacity(operations.len());
        for operation in operations {
            let (decision, _) = self.evaluate(token, operation, now, started);
            log_decision(&self.config.adapter, operation, &decision, "enforce");
            let settled = into_authorized(decision, ());
            let outcome = match &settled {
                Ok(_) => &Outcome::Allow,
                Err(decision) => &decision.outcome,
            };
            self.metrics.record(operation.verb, outcome, started);
            ids.push(settled?.decision_id);
        }
        Ok(Authorized {
            inner: payload,
            decision_id: ids.join(","),
            shadow_deny: None,
        })
    }

    /// [`Guard::authorize`] in enforce mode for a request whose operations do not all run
    /// now: each is asked about at its [`Stage`]. The refusal names the operation it is about.
    pub async fn authorize_staged<T>(
        &self,
        token: &str,
        operations: &[(Operation, Stage)],
        payload: T,
        ledger: &dyn Ledger,
    ) -> Result<Authorized<T>, Refusal> {
        self.authorize_each(
            token,
            operations.len(),
            |index| {
                operations
                    .get(index)
                    .map(|(operation, stage)| (operation, *stage))
            },
            payload,
            ledger,
        )
        .await
    }

    /// For a request that touches no resource at all (`SELECT 1`, a Describe): only the token
    /// itself is judged (signature, expiry, key, revocation), and `payload` wrapped if it holds.
    pub fn authorize_token<T>(
        &self,
        token: &str,
        payload: T,
    ) -> Result<Authorized<T>, Box<Decision>> {
        match self.token_check(token, SystemTime::now(), Instant::now()) {
            Ok(verified) => {
                let decision_id = self.ids.next();
                tracing::debug!(adapter = %self.config.adapter, agent = %verified.agent, %decision_id, "token alone: allow");
                Ok(Authorized {
                    inner: payload,
                    decision_id,
                    shadow_deny: None,
                })
            }
            Err(failure) => {
                let agent = failure.verified.as_ref().map(|v| v.agent.clone());
                let session = failure.verified.as_ref().map(|v| v.session.clone());
                tracing::info!(adapter = %self.config.adapter, code = failure.code.as_str(), reason = %failure.reason, "token alone: deny");
                Err(Box::new(Decision {
                    id: self.ids.next(),
                    outcome: Outcome::Deny {
                        code: failure.code,
                        reason: failure.reason,
                    },
                    agent,
                    session,
                    explanation: vec![],
                    obligations: vec![],
                }))
            }
        }
    }

    /// The batch decision: `at(i)` is the `i`th of `count` operations and its stage.
    async fn authorize_each<'o, T>(
        &self,
        token: &str,
        count: usize,
        at: impl Fn(usize) -> Option<(&'o Operation, Stage)>,
        payload: T,
        ledger: &dyn Ledger,
    ) -> Result<Authorized<T>, Refusal> {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut decided = Vec::with_capacity(count);
        for index in 0..count {
            let Some((operation, stage)) = at(index) else {
                break;
            };
            // Read once per operation: the same answer decides here and when settling.
            let approval_waits =
                stage == Stage::Prepare && self.containment.needs_approval(operation.verb);
            let (decision, verified) = self.evaluate(token, operation, now, mono);
            decided.push((operation, approval_waits, decision, verified));
        }
        if decided.is_empty() || decided.len() != count {
            return Err(Refusal {
                decision: Box::new(self.empty_batch()),
                index: 0,
            });
        }
        let first = |denies: bool| {
            decided
                .iter()
                .position(|(_, approval_waits, decision, _)| match decision.outcome {
                    Outcome::Deny { .. } => denies,
                    Outcome::ApprovalRequired { .. } => !denies && !approval_waits,
                    Outcome::Allow => false,
                })
        };
        if let Some(index) = first(true).or_else(|| first(false)) {
            let Some((operation, _, decision, verified)) = decided.into_iter().nth(index) else {
                return Err(Refusal {
                    decision: Box::new(self.empty_batch()),
                    index,
                });
            };
            let decision = self
                .settle(
                    token,
                    operation,
                    decision,
                    verified.as_deref(),
                    ledger,
                    mono,
                )
                .await;
            return Err(Refusal {
                decision: Box::new(decision),
                index,
            });
        }
        let mut ids = Vec::with_capacity(decided.len());
        for (index, (operation, approval_waits, decision, verified)) in
            decided.into_iter().enumerate()
        {
            if approval_waits {
                // Prepared, not run: nothing is consumed, requested, counted or recorded for
                // it now; each run is asked about (and settled) on its own.
                log_decision(&self.config.adapter, operation, &decision, "prepare");
                self.metrics.record(operation.verb, &decision.outcome, mono);
                ids.push(decision.id);
                continue;
            }
            let decision = self
                .settle(
                    token,
                    operation,
                    decision,
                    verified.as_deref(),
                    ledger,
                    mono,
                )
                .await;
            if !decision.is_allow() {
                return Err(Refusal {
                    decision: Box::new(decision),
                    index,
                });
            }
            ids.push(decision.id);
        }
        Ok(Authorized {
            inner: payload,
            decision_id: ids.join(","),
            shadow_deny: None,
        })
    }

    /// A batch with no operation authorises nothing: an adapter that found nothing to ask
    /// about has misread its request.
    fn empty_batch(&self) -> Decision {
        Decision {
            id: self.ids.next(),
            outcome: Outcome::Deny {
                code: DenyCode::PolicyDenied,
                reason: "the request holds no operation to authorise".into(),
            },
            agent: None,
            session: None,
            explanation: vec![],
            obligations: vec![],
        }
    }

    /// What follows a decision: an allow's obligations fulfilled through `ledger` (a failure
    /// turns it into a deny), an approval request created for an approval-required outcome,
    /// the decision logged, and recorded later unless its audit obligation already stored it.
    async fn settle(
        &self,
        token: &str,
        request: &Request,
        mut decision: Decision,
        verified: Option<&VerifiedToken>,
        ledger: &dyn Ledger,
        started: Instant,
    ) -> Decision {
        let recorded_synchronously = decision.obligations.contains(&Obligation::Audit);
        match &decision.outcome {
            Outcome::Allow => {
                for obligation in std::mem::take(&mut decision.obligations) {
                    let result = match &obligation {
                        Obligation::ConsumeApproval {
                            approval_id,
                            digest,
                        } => ledger.consume_approval(token, approval_id, digest).await,
                        Obligation::Count { verb } => ledger.count(token, *verb).await,
                        Obligation::Use => ledger.count_use(token).await,
                        Obligation::Audit => {
                            ledger
                                .audit(decision_event(
                                    &self.config.adapter,
                                    request,
                                    &decision,
                                    token,
                                    verified,
                                ))
                                .await
                        }
                    };
                    if let Err(denial) = result {
                        let code = match obligation {
                            Obligation::ConsumeApproval { .. } => DenyCode::ApprovalInvalid,
                            Obligation::Count { .. } => DenyCode::RateLimited,
                            Obligation::Use => DenyCode::UseBudgetExhausted,
                            Obligation::Audit => DenyCode::AuditUnavailable,
                        };
                        decision.outcome = Outcome::Deny {
                            code,
                            reason: format!("{} ({})", denial.reason, denial.code),
                        };
                        break;
                    }
                }
            }
            Outcome::ApprovalRequired { digest, .. } => {
                let operation = containment::operation(&self.config.adapter, request);
                let digest = digest.clone();
                decision.outcome = match ledger.request_approval(token, &operation).await {
                    Ok(id) => Outcome::ApprovalRequired {
                        approval_id: Some(id),
                        digest,
                    },
                    Err(denial) => Outcome::Deny {
                        code: DenyCode::ContainmentUnavailable,
                        reason: format!(
                            "approval required, but no request could be created: {}",
                            denial.reason
                        ),
                    },
                };
            }
            Outcome::Deny { .. } => {}
        }
        log_decision(&self.config.adapter, request, &decision, "enforce");
        self.metrics
            .record(request.verb, &decision.outcome, started);
        if !(recorded_synchronously && decision.is_allow()) {
            ledger.record_later(decision_event(
                &self.config.adapter,
                request,
                &decision,
                token,
                verified,
            ));
        }
        decision
    }

    /// Shadow mode: decides and logs as usual, then lets `payload` through either way,
    /// recording the deny it would have made. Still the guard's decision, never a bypass, and
    /// still audited: a non-read verb goes through only once its record is stored.
    async fn authorize_shadow<T>(
        &self,
        token: &str,
        operations: &[Operation],
        payload: T,
        ledger: Option<&dyn Ledger>,
    ) -> Result<Authorized<T>, Box<Decision>> {
        if operations.is_empty() {
            return Err(Box::new(self.empty_batch()));
        }
        let mut ids = Vec::with_capacity(operations.len());
        let mut shadow_deny = None;
        for request in operations {
            let started = Instant::now();
            let (mut decision, verified) =
                self.evaluate(token, request, SystemTime::now(), started);
            log_decision(&self.config.adapter, request, &decision, "shadow");
            let mut event = decision_event(
                &self.config.adapter,
                request,
                &decision,
                token,
                verified.as_deref(),
            );
            if let Some(detail) = event.detail.as_object_mut() {
                detail.insert("mode".into(), "shadow".into());
            }
            let recorded = match ledger {
                Some(ledger) if request.verb == Verb::Read => {
                    ledger.record_later(event);
                    Ok(())
                }
                Some(ledger) => ledger.audit(event).await.map_err(|denial| {
                    (
                        DenyCode::AuditUnavailable,
                        format!("{} ({})", denial.reason, denial.code),
                    )
                }),
                None if request.verb == Verb::Read => Ok(()),
                None => Err((
                    DenyCode::ObligationsUnfulfilled,
                    "shadow mode cannot record this write: no ledger".to_owned(),
                )),
            };
            if let Err((code, reason)) = recorded {
                decision.outcome = Outcome::Deny { code, reason };
                self.metrics
                    .record(request.verb, &decision.outcome, started);
                return Err(Box::new(decision));
            }
            // Shadow mode counts what enforce mode would have decided.
            self.metrics
                .record(request.verb, &decision.outcome, started);
            ids.push(decision.id.clone());
            if !decision.is_allow() && shadow_deny.is_none() {
                shadow_deny = Some(Box::new(decision));
            }
        }
        Ok(Authorized {
            inner: payload,
            decision_id: ids.join(","),
            shadow_deny,
        })
    }

    /// The decision, and the token as verified when it did verify (for the audit record).
    fn evaluate(
        &self,
        token: &str,
        request: &Request,
        now: SystemTime,
        mono: Instant,
    ) -> (Decision, Option<Arc<VerifiedToken>>) {
        let id = self.ids.next();
        let deny = |code: DenyCode,
                    reason: String,
                    verified: Option<&VerifiedToken>,
                    explanation| Decision {
            id: id.clone(),
            outcome: Outcome::Deny { code, reason },
            agent: verified.map(|v| v.agent.clone()),
            session: verified.map(|v| v.session.clone()),
            explanation,
            obligations: Vec::new(),
        };
        let verified = match self.token_check(token, now, mono) {
            Ok(verified) => verified,
            Err(failure) => {
                let decision = deny(
                    failure.code,
                    failure.reason,
                    failure.verified.as_deref(),
                    vec![],
                );
                return (decision, failure.verified);
            }
        };
        let key = self.decisions.key(&verified, request);
        // A cached verdict has no authorizer to read presented approvals from: operations
        // that may need one are decided afresh (reads never do; for other verbs, unknown
        // containment settings count as needing one).
        let reads_approvals =
            request.verb != Verb::Read && self.containment.needs_approval(request.verb);
        let cached = key
            .as_ref()
            .filter(|_| !reads_approvals)
            .and_then(|key| self.decisions.get(key, now));
        let verdict = match cached {
            Some(explanation) => Ok((explanation, None)),
            None => self
                .run_policy(&verified, request, now)
                .map(|(explanation, authorizer)| {
                    if let Some(key) = key {
                        self.decisions.insert(key, &verified, &explanation, now);
                    }
                    (explanation, Some(authorizer))
                }),
        };
        let decision = match verdict {
            Ok((explanation, mut authorizer)) => {
                let (outcome, obligations) = match containment::check(
                    &self.containment,
                    &self.config.adapter,
                    &verified,
                    request,
                    authorizer.as_mut(),
                ) {
                    Ok(mut obligations) => {
                        if verified.use_budget.is_some() {
                            obligations.insert(0, Obligation::Use);
                        }
                        (Outcome::Allow, obligations)
                    }
                    Err(outcome) => (outcome, Vec::new()),
                };
                Decision {
                    id: id.clone(),
                    outcome,
                    agent: Some(verified.agent.clone()),
                    session: Some(verified.session.clone()),
                    explanation,
                    obligations,
                }
            }
            Err((code, reason, explanation)) => deny(code, reason, Some(&verified), explanation),
        };
        (decision, Some(verified))
    }

    /// Signature verification, or the cached result of it. Expiry and key validity are
    /// re-checked on a cache hit: a retired key or an expired token never passes from cache.
    fn verified(
        &self,
        token: &str,
        keys: &PublicKeySet,
        now: SystemTime,
    ) -> Result<Arc<VerifiedToken>, TokenRejected> {
        if let Some(cached) = self.cache.get(token, now) {
            keys.lookup(Some(cached.key_id), now)?;
            return Ok(cached);
        }
        let verified = Arc::new(verify(token, keys, self.config.max_token_bytes, now)?);
        self.cache.insert(token, verified.clone(), now);
        Ok(verified)
    }

    /// The token's checks and the adapter policy, over facts the adapter supplied.
    fn run_policy(
        &self,
        verified: &VerifiedToken,
        request: &Request,
        now: SystemTime,
    ) -> Result<(Vec<String>, biscuit_auth::Authorizer), PolicyDenial> {
        let internal = |e: BiscuitError| (DenyCode::PolicyError, e.to_string(), vec![]);
        let mut builder = self
            .policy
            .builder()
            .set_limits(self.config.limits.to_biscuit())
            .fact(fact("time", &[date(&now)]))
            .and_then(|b| b.fact(fact("resource", &[string(&request.resource)])))
            .and_then(|b| b.fact(fact("verb", &[string(request.verb.as_str())])))
            .and_then(|b| b.fact(fact("environment", &[string(&request.environment)])))
            .and_then(|b| b.fact(fact("adapter", &[string(&self.config.adapter)])))
            .map_err(internal)?;
        for (key, value) in &request.attributes {
            builder = builder
                .fact(fact("attribute", &[string(key), string(value)]))
                .map_err(internal)?;
        }
        let mut authorizer = builder.build(&verified.biscuit).map_err(internal)?;
        let policies = &self.policy_texts;
        match authorizer.authorize() {
            Ok(index) => Ok((
                vec![format!(
                    "allowed by `{}`",
                    policies
                        .get(index)
                        .cloned()
                        .unwrap_or_else(|| format!("policy #{index}"))
                )],
                authorizer,
            )),
            Err(BiscuitError::RunLimit(limit)) => Err((
                DenyCode::PolicyRunLimit,
                format!("Datalog run limit reached: {limit}"),
                vec![],
            )),
            Err(BiscuitError::FailedLogic(logic)) => {
                let explanation = explain_failure(&logic, policies);
                Err((
                    DenyCode::PolicyDenied,
                    explanation
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "denied by policy".into()),
                    explanation,
                ))
            }
            Err(other) => Err(internal(other)),
        }
    }
}

/// Why the token itself failed, with the token if it did verify (for the decision's agent).
struct TokenFailure {
    code: DenyCode,
    reason: String,
    verified: Option<Arc<VerifiedToken>>,
}

/// Only an allow with nothing left to do becomes `Authorized`: obligations (approval, counts,
/// audit) need a ledger, so without one they turn the allow into a deny.
fn into_authorized<T>(mut decision: Decision, payload: T) -> Result<Authorized<T>, Box<Decision>> {
    if decision.is_allow() && !decision.obligations.is_empty() {
        decision.outcome = Outcome::Deny {
            code: DenyCode::ObligationsUnfulfilled,
            reason:
                "this operation needs approval, counting or audit, which this adapter cannot do"
                    .into(),
        };
    }
    if decision.is_allow() {
        Ok(Authorized {
            inner: payload,
            decision_id: decision.id,
            shadow_deny: None,
        })
    } else {
        Err(Box::new(decision))
    }
}

/// A policy deny: its code, reason and explanation lines.
type PolicyDenial = (DenyCode, String, Vec<String>);

/// What the adapter policy's verdicts can depend on; opaque (nothing cached) if unreadable.
fn policy_profile(policy: &PolicySet) -> crate::token::DatalogProfile {
    match policy.builder().snapshot() {
        Ok(snapshot) => crate::token::DatalogProfile::of_authorizer(&snapshot),
        Err(error) => {
            tracing::warn!(%error, "adapter policy unreadable for the decision cache: it stays off");
            crate::token::DatalogProfile::opaque()
        }
    }
}

fn authorizer_policies(policy: &PolicySet) -> Vec<String> {
    policy
        .builder()
        .build_unauthenticated()
        .map(|a| a.dump().3.iter().map(|p| p.to_string()).collect())
        .unwrap_or_default()
}

fn explain_failure(logic: &Logic, policies: &[String]) -> Vec<String> {
    let (matched, checks) = match logic {
        Logic::Unauthorized { policy, checks } => (Some(policy), checks.as_slice()),
        Logic::NoMatchingPolicy { checks } => (None, checks.as_slice()),
        other => return vec![other.to_string()],
    };
    let mut lines = Vec::new();
    for check in checks {
        lines.push(match check {
            FailedCheck::Block(b) if b.block_id == 0 => {
                format!("token authority check failed: `{}`", b.rule)
            }
            FailedCheck::Block(b) => {
                format!(
                    "check in attenuation block {} failed: `{}`",
                    b.block_id, b.rule
                )
            }
            FailedCheck::Authorizer(a) => format!("adapter policy check failed: `{}`", a.rule),
        });
    }
    match matched {
        Some(MatchedPolicy::Deny(index)) => lines.push(format!(
            "denied by `{}`",
            policies
                .get(*index)
                .cloned()
                .unwrap_or_else(|| format!("policy #{index}"))
        )),
        Some(MatchedPolicy::Allow(_)) => {}
        None => lines.push(
            "no allow policy matched: the token grants no right covering this resource and verb"
                .into(),
        ),
    }
    lines
}

fn log_decision(adapter: &str, request: &Request, decision: &Decision, mode: &str) {
    match &decision.outcome {
        Outcome::Allow => tracing::info!(
            decision_id = %decision.id,
            adapter,
            mode,
            agent = decision.agent.as_deref().unwrap_or("-"),
            resource = %request.resource,
            verb = %request.verb,
            "allow"
        ),
        Outcome::Deny { code, reason } => tracing::warn!(
            decision_id = %decision.id,
            adapter,
            mode,
            agent = decision.agent.as_deref().unwrap_or("-"),
            resource = %request.resource,
            verb = %request.verb,
            code = code.as_str(),
            reason = %reason,
            "deny"
        ),
        Outcome::ApprovalRequired {
            approval_id,
            digest,
        } => tracing::warn!(
            decision_id = %decision.id,
            adapter,
            mode,
            agent = decision.agent.as_deref().unwrap_or("-"),
            resource = %request.resource,
            verb = %request.verb,
            approval_id = approval_id.as_deref().unwrap_or("-"),
            digest = %digest,
            "approval required"
        ),
    }
}
