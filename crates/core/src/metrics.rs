//! Prometheus metrics: what the broker and every adapter count, kept in atomics so that
//! recording on the request path never takes a lock, and encoded in the OpenMetrics text
//! format by `prometheus-client` only when `/metrics` is scraped.
//!
//! The label space is closed (adapter name, verb, outcome, deny code, sink name), so every
//! series exists from the start: nothing is allocated or looked up while deciding.
//! (prometheus-client's own `Family` and `Histogram` take a lock per update, which is why the
//! values live here and the crate only encodes them.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::guard::{DenyCode, Outcome};
use crate::revocation::RevocationView;
use crate::scope::Verb;

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the decision latency buckets: a cached read decides in tens of
/// microseconds; a write waits for the broker (approval, counting, audit) in milliseconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// A fixed-bucket histogram of durations: an observation is two relaxed atomic adds.
#[derive(Debug)]
pub struct AtomicHistogram {
    /// One per bound in [`LATENCY_BUCKETS`], then +Inf; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so a scrape racing an observation stays consistent.
        let count = buckets
            .iter()
            .fold(0u64, |total, (_, n)| total.saturating_add(*n));
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

const OUTCOMES: [&str; 3] = ["allow", "deny", "approval_required"];

/// One guard's decisions: by verb and outcome, denials by reason, latency by verb.
#[derive(Debug)]
pub struct DecisionMetrics {
    adapter: String,
    outcomes: [[AtomicU64; OUTCOMES.len()]; Verb::ALL.len()],
    denials: [AtomicU64; DenyCode::ALL.len()],
    latency: [AtomicHistogram; Verb::ALL.len()],
}

impl DecisionMetrics {
    pub fn new(adapter: &str) -> Self {
        DecisionMetrics {
            adapter: adapter.to_owned(),
            outcomes: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            denials: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicHistogram::default()),
        }
    }

    /// Counts one final decision (after the ledger's obligations) and how long it took.
    pub fn record(&self, verb: Verb, outcome: &Outcome, started: Instant) {
        let v = verb_index(verb);
        let o = match outcome {
            Outcome::Allow => 0,
            Outcome::Deny { code, .. } => {
                let index = DenyCode::ALL.iter().position(|c| c == code);
                if let Some(counter) = index.and_then(|i| self.denials.get(i)) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                1
            }
            Outcome::ApprovalRequired { .. } => 2,
        };
        if let Some(counter) = self.outcomes.get(v).and_then(|row| row.get(o)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(histogram) = self.latency.get(v) {
            histogram.observe(started.elapsed());
        }
    }

    /// Decisions with this verb and outcome (`allow`, `deny`, `approval_required`) so far.
    pub fn count(&self, verb: Verb, outcome: &str) -> u64 {
        let o = OUTCOMES.iter().position(|name| *name == outcome);
        o.and_then(|o| self.outcomes.get(verb_index(verb))?.get(o))
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

fn verb_index(verb: Verb) -> usize {
    Verb::ALL.iter().position(|v| *v == verb).unwrap_or(0)
}

/// An adapter's audit spool: what waits to be shipped to the broker and what failed.
#[derive(Debug, Default)]
pub struct SpoolMetrics {
    /// Complete records in the spool file not yet stored at the broker, as of the last pass.
    pub depth: AtomicU64,
    pub shipped: AtomicU64,
    pub ship_failures: AtomicU64,
}

/// Token issuance refusals are counted by these codes; anything else is `other`.
const REFUSAL_CODES: [&str; 19] = [
    "scope_refused",
    "agent_revoked",
    "invalid_scope",
    "invalid_ttl",
    "invalid_max_uses",
    "no_scopes",
    "too_many_scopes",
    "credential_missing",
    "api_key_unknown",
    "jwt_expired",
    "jwt_invalid",
    "malformed_json",
    "unsupported_media_type",
    "policy_run_limit",
    "policy_error",
    "store_unavailable",
    "store_lost",
    "audit_unavailable",
    "other",
];

/// Approval life events counted by the broker that saw them.
pub const APPROVAL_EVENTS: [&str; 6] = [
    "requested",
    "approved",
    "denied",
    "cancelled",
    "expired",
    "used",
];

/// The broker's own counters: issuance, approvals, and one row per webhook sink.
#[derive(Debug)]
pub struct BrokerMetrics {
    pub tokens_issued: AtomicU64,
    refusals: [AtomicU64; REFUSAL_CODES.len()],
    approval_events: [AtomicU64; APPROVAL_EVENTS.len()],
    pub sinks: Vec<Arc<SinkMetrics>>,
}

impl BrokerMetrics {
    pub fn new(sinks: Vec<Arc<SinkMetrics>>) -> Self {
        BrokerMetrics {
            tokens_issued: AtomicU64::new(0),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            approval_events: std::array::from_fn(|_| AtomicU64::new(0)),
            sinks,
        }
    }

    pub fn token_refused(&self, code: &str) {
        let index = REFUSAL_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(REFUSAL_CODES.len() - 1);
        if let Some(counter) = self.refusals.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn approval_event(&self, event: &str) {
        if let Some(counter) = APPROVAL_EVENTS
            .iter()
            .position(|e| *e == event)
            .and_then(|i| self.approval_events.get(i))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One webhook sink's delivery counters.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub name: String,
    pub delivered: AtomicU64,
    /// Events given up on after every retry.
    pub failed: AtomicU64,
    /// Failed attempts, each retried or given up.
    pub attempt_failures: AtomicU64,
    /// Events dropped (oldest first) because the sink's queue was full.
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

/// Everything one process exposes; values read at scrape time are filled in by the caller.
#[derive(Default, Clone)]
pub struct Sources {
    pub decisions: Vec<Arc<DecisionMetrics>>,
    pub revocations: Option<Arc<RevocationView>>,
    pub spool: Option<Arc<SpoolMetrics>>,
    pub broker: Option<Arc<BrokerMetrics>>,
    /// Approvals in the store by status, read by the broker's handler for this scrape.
    pub approvals: Vec<(&'static str, u64)>,
    /// The audit trail's newest sequence number, read for this scrape.
    pub audit_head: Option<u64>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

/// The OpenMetrics text exposition of `sources`, ending in `# EOF`.
pub fn render(sources: Sources) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

type Labels = Vec<(&'static str, String)>;

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        metric
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, u64, u64>(value, None)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        metric.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if !self.decisions.is_empty() {
            self.encode_decisions(&mut encoder)?;
        }
        if let Some(view) = &self.revocations {
            let age = view.age(Instant::now()).map_or(-1.0, |a| a.as_secs_f64());
            gauges(
                &mut encoder,
                "capgate_revocation_feed_age_seconds",
                "Time since the revocation view last reflected the feed (-1: never synced); decisions deny past the staleness bound.",
                &[(vec![], age)],
            )?;
            counters(
                &mut encoder,
                "capgate_revocation_feed_resyncs",
                "Times the revocation view was dropped and read again (store lost or replaced).",
                &[(vec![], view.resyncs())],
            )?;
        }
        if let Some(spool) = &self.spool {
            gauges(
                &mut encoder,
                "capgate_audit_spool_depth",
                "Decision records in the local audit spool not yet stored at the broker.",
                &[(vec![], load(&spool.depth) as f64)],
            )?;
            counters(
                &mut encoder,
                "capgate_audit_spool_shipped_records",
                "Spooled decision records the broker stored.",
                &[(vec![], load(&spool.shipped))],
            )?;
            counters(
                &mut encoder,
                "capgate_audit_spool_ship_failures",
                "Failed attempts to ship the audit spool to the broker (retried).",
                &[(vec![], load(&spool.ship_failures))],
            )?;
        }
        if let Some(broker) = &self.broker {
            self.encode_broker(&mut encoder, broker)?;
        }
        if !self.approvals.is_empty() {
            let rows: Vec<(Labels, f64)> = self
                .approvals
                .iter()
                .map(|(status, n)| (vec![("status", (*status).to_owned())], *n as f64))
                .collect();
            gauges(
                &mut encoder,
                "capgate_approvals",
                "Approval requests in the store by status (the newest 1000).",
                &rows,
            )?;
        }
        if let Some(head) = self.audit_head {
            gauges(
                &mut encoder,
                "capgate_audit_head_seq",
                "Sequence number of the newest audit record.",
                &[(vec![], head as f64)],
            )?;
        }
        Ok(())
    }
}

impl Sources {
    fn encode_decisions(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut rows = Vec::new();
        let mut denials = Vec::new();
        for metrics in &self.decisions {
            for (verb, row) in Verb::ALL.iter().zip(&metrics.outcomes) {
                for (outcome, counter) in OUTCOMES.iter().zip(row) {
                    let labels = vec![
                        ("adapter", metrics.adapter.clone()),
                        ("verb", verb.as_str().to_owned()),
                        ("outcome", (*outcome).to_owned()),
                    ];
                    rows.push((labels, load(counter)));
                }
            }
            for (code, counter) in DenyCode::ALL.iter().zip(&metrics.denials) {
                let labels = vec![
                    ("adapter", metrics.adapter.clone()),
                    ("reason", code.as_str().to_owned()),
                ];
                denials.push((labels, load(counter)));
            }
        }
        counters(
            encoder,
            "capgate_decisions",
            "Guard decisions by adapter, verb and final outcome.",
            &rows,
        )?;
        counters(
            encoder,
            "capgate_denials",
            "Denied decisions by adapter and stable deny code.",
            &denials,
        )?;
        let mut metric = encoder.encode_descriptor(
            "capgate_decision_duration_seconds",
            "Time from token to final decision, including the ledger's synchronous calls to the broker.",
            None,
            MetricType::Histogram,
        )?;
        for metrics in &self.decisions {
            for (verb, histogram) in Verb::ALL.iter().zip(&metrics.latency) {
                let labels: Labels = vec![
                    ("adapter", metrics.adapter.clone()),
                    ("verb", verb.as_str().to_owned()),
                ];
                let (sum, count, buckets) = histogram.snapshot();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }

    fn encode_broker(
        &self,
        encoder: &mut DescriptorEncoder,
        broker: &BrokerMetrics,
    ) -> std::fmt::Result {
        counters(
            encoder,
            "capgate_tokens_issued",
            "Tokens issued.",
            &[(vec![], load(&broker.tokens_issued))],
        )?;
        let refusals: Vec<(Labels, u64)> = REFUSAL_CODES
            .iter()
            .zip(&broker.refusals)
            .map(|(code, n)| (vec![("code", (*code).to_owned())], load(n)))
            .collect();
        counters(
            encoder,
            "capgate_token_refusals",
            "Token requests refused, by problem code.",
            &refusals,
        )?;
        let events: Vec<(Labels, u64)> = APPROVAL_EVENTS
            .iter()
            .zip(&broker.approval_events)
            .map(|(event, n)| (vec![("event", (*event).to_owned())], load(n)))
            .collect();
        counters(
            encoder,
            "capgate_approval_events",
            "Approval requests and transitions seen by this broker.",
            &events,
        )?;
        if broker.sinks.is_empty() {
            return Ok(());
        }
        let sink = |f: fn(&SinkMetrics) -> &AtomicU64| -> Vec<(Labels, u64)> {
            broker
                .sinks
                .iter()
                .map(|s| (vec![("sink", s.name.clone())], load(f(s))))
                .collect()
        };
        counters(
            encoder,
            "capgate_webhook_delivered",
            "Webhook events delivered (2xx answer).",
            &sink(|s| &s.delivered),
        )?;
        counters(
            encoder,
            "capgate_webhook_failed",
            "Webhook events given up on after every retry.",
            &sink(|s| &s.failed),
        )?;
        counters(
            encoder,
            "capgate_webhook_attempt_failures",
            "Failed webhook delivery attempts (timeouts, errors, non-2xx, redirects).",
            &sink(|s| &s.attempt_failures),
        )?;
        counters(
            encoder,
            "capgate_webhook_dropped",
            "Webhook events dropped, oldest first, because the sink's queue was full.",
            &sink(|s| &s.dropped),
        )?;
        let queued: Vec<(Labels, f64)> = sink(|s| &s.queued)
            .into_iter()
            .map(|(l, n)| (l, n as f64))
            .collect();
        gauges(
            encoder,
            "capgate_webhook_queue_depth",
            "Webhook events waiting for delivery.",
            &queued,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_land_in_the_first_bucket_that_holds_them() {
        let h = AtomicHistogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.00303).abs() < 1e-6, "{sum}");
        assert_eq!(buckets.first().map(|b| b.1), Some(1));
        let at = |bound: f64| buckets.iter().find(|b| b.0 == bound).map(|b| b.1);
        assert_eq!(at(0.005), Some(1));
        assert_eq!(at(f64::INFINITY), Some(1));
    }

    #[test]
    fn deny_code_all_names_every_code_once() {
        // A new variant breaks this exhaustive match; its arm count (20) must then grow, and
        // with it `DenyCode::ALL`, or the new code would go uncounted.
        const ARMS: usize = 20;
        let _exhaustive = |code: DenyCode| match code {
            DenyCode::TokenTooLarge
            | DenyCode::TokenMalformed
            | DenyCode::TokenUnknownKey
            | DenyCode::TokenKeyRetired
            | DenyCode::TokenBadSignature
            | DenyCode::TokenExpired
            | DenyCode::TokenRevoked
            | DenyCode::RevocationFeedStale
            | DenyCode::RevocationFeedReset
            | DenyCode::PolicyDenied
            | DenyCode::PolicyRunLimit
            | DenyCode::PolicyError
            | DenyCode::ContainmentUnavailable
            | DenyCode::Frozen
            | DenyCode::RecoveryPoint
            | DenyCode::RateLimited
            | DenyCode::ApprovalInvalid
            | DenyCode::AuditUnavailable
            | DenyCode::UseBudgetExhausted
            | DenyCode::ObligationsUnfulfilled => (),
        };
        let names: std::collections::HashSet<&str> =
            DenyCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ARMS, "DenyCode::ALL must name each code once");
    }

    #[test]
    fn every_deny_code_has_its_own_counter() {
        let metrics = DecisionMetrics::new("t");
        for code in DenyCode::ALL {
            let outcome = Outcome::Deny {
                code,
                reason: String::new(),
            };
            metrics.record(Verb::Write, &outcome, Instant::now());
        }
        assert!(metrics.denials.iter().all(|c| load(c) == 1));
        assert_eq!(
            metrics.count(Verb::Write, "deny"),
            DenyCode::ALL.len() as u64
        );
    }
}
