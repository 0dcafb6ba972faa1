//! Tells people about approvals: when one is requested, decided or expires, the broker POSTs
//! an event to every configured webhook sink, signed with the sink's secret
//! (`Capgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 over "t.body">`, as Stripe signs).
//!
//! Nothing here can slow a decision: publishing pushes onto each sink's bounded queue (the
//! oldest event is dropped, and counted, when it is full) and returns; one task per sink
//! delivers in order, with a timeout per attempt, exponential backoff between attempts, and
//! no redirects followed (a sink that redirects has failed, the event goes nowhere else).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Notify;

use crate::config::duration;
use capgate_core::containment::approval::{Approval, ApprovalStatus};
use capgate_core::containment::Operation;
use capgate_core::metrics::SinkMetrics;
use capgate_core::token::{random_id, unix_seconds_now};

/// The signature header; see README for how to check it.
pub const SIGNATURE_HEADER: &str = "capgate-signature";
/// Never wait longer than this between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationConfig {
    /// Where operators reach the broker; events link to `{public_url}/ui/approvals/{id}`.
    /// Defaults to `http://{listen}`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// How often pending approvals past their expiry are marked expired (and announced).
    #[serde(
        default = "NotificationConfig::default_sweep",
        deserialize_with = "duration"
    )]
    pub expiry_sweep: Duration,
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

impl NotificationConfig {
    fn default_sweep() -> Duration {
        Duration::from_secs(5)
    }

    /// Refuses sinks that could never deliver, or that two names could confuse.
    pub fn validate(&self) -> Result<(), String> {
        if self.expiry_sweep.is_zero() {
            return Err("notifications.expiry_sweep must be positive".into());
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "notifications.public_url {url:?} must start with http:// or https://"
                ));
            }
        }
        for (i, sink) in self.webhooks.iter().enumerate() {
            let name = &sink.name;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "webhook name {name:?} must be non-empty letters, digits, '-', '_' or '.'"
                ));
            }
            if self.webhooks[..i].iter().any(|other| other.name == *name) {
                return Err(format!("webhook {name:?} is configured twice"));
            }
            // No TLS client is built in: an https sink would fail on every event, so it is
            // refused now rather than discovered during an incident.
            if !sink.url.starts_with("http://") {
                return Err(format!(
                    "webhook {name:?}: url must be http:// (https sinks need a local relay in \
                     this version)"
                ));
            }
            if reqwest::Url::parse(&sink.url).is_err() {
                return Err(format!("webhook {name:?}: url {:?} is not a URL", sink.url));
            }
            if sink.secret.is_some() && sink.secret_env.is_some() {
                return Err(format!(
                    "webhook {name:?}: set at most one of secret and secret_env"
                ));
            }
            if sink.format == WebhookFormat::Json
                && sink.secret.is_none()
                && sink.secret_env.is_none()
            {
                return Err(format!(
                    "webhook {name:?}: a json sink needs a secret (or secret_env) to sign with"
                ));
            }
            if sink.queue == 0 || sink.max_attempts == 0 || sink.timeout.is_zero() {
                return Err(format!(
                    "webhook {name:?}: queue, max_attempts and timeout must be positive"
                ));
            }
        }
        Ok(())
    }
}

impl Default for NotificationConfig {
    fn default() -> Self {
        NotificationConfig {
            public_url: None,
            expiry_sweep: Self::default_sweep(),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The event itself, signed.
    #[default]
    Json,
    /// A Slack incoming-webhook message (`{"text": ...}`); signed too when a secret is set.
    Slack,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the sink in metrics and logs.
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
    /// The signing secret itself…
    #[serde(default)]
    pub secret: Option<String>,
    /// …or the environment variable that holds it.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Per attempt, connection included.
    #[serde(
        default = "WebhookConfig::default_timeout",
        deserialize_with = "duration"
    )]
    pub timeout: Duration,
    #[serde(default = "WebhookConfig::default_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each one after (at most 5 minutes).
    #[serde(
        default = "WebhookConfig::default_backoff",
        deserialize_with = "duration"
    )]
    pub initial_backoff: Duration,
    /// Events waiting beyond this many drop, oldest first.
    #[serde(default = "WebhookConfig::default_queue")]
    pub queue: usize,
}

impl WebhookConfig {
    fn default_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_attempts() -> u32 {
        6
    }
    fn default_backoff() -> Duration {
        Duration::from_secs(1)
    }
    fn default_queue() -> usize {
        1000
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook {sink}: environment variable {var} (secret_env) is not set")]
    SecretMissing { sink: String, var: String },
    #[error("webhook {sink}: {why}")]
    Client { sink: String, why: String },
}

/// What a sink receives (format `json`), and what a Slack message is made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApprovalEvent {
    /// Unique per event; also sent as `Capgate-Delivery`, so receivers can drop repeats.
    pub id: String,
    /// `approval.requested`, `approval.decided` or `approval.expired`.
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: u64,
    pub approval_id: String,
    pub status: ApprovalStatus,
    pub agent: String,
    /// The environment the operation's resource belongs to, per the broker's configuration.
    pub environment: Option<String>,
    /// The exact operation: adapter, resource, verb, and method/path/body digest or SQL.
    pub operation: Operation,
    pub digest: String,
    pub expires_at: u64,
    pub required: u32,
    pub approvers: Vec<String>,
    pub decided_by: Option<String>,
    /// The approval's page in the console.
    pub url: String,
}

struct Sink {
    config: WebhookConfig,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
    queue: Mutex<VecDeque<Arc<ApprovalEvent>>>,
    wake: Notify,
    metrics: Arc<SinkMetrics>,
}

impl Sink {
    fn push(&self, event: Arc<ApprovalEvent>) {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while queue.len() >= self.config.queue {
            queue.pop_front();
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(event);
        self.metrics
            .queued
            .store(queue.len() as u64, Ordering::Relaxed);
        drop(queue);
        // Stores a permit if the worker is busy, so no event waits for the next one.
        self.wake.notify_one();
    }

    fn pop(&self) -> Option<Arc<ApprovalEvent>> {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = queue.pop_front();
        self.metrics
            .queued
            .store(queue.len() as u64, Ordering::Relaxed);
        next
    }
}

/// The broker's notifier: publishes approval events to every sink without waiting.
pub struct Notifier {
    public_url: String,
    sinks: Vec<Arc<Sink>>,
}

impl Notifier {
    /// Builds the sinks (reading secrets from the environment where configured); their
    /// delivery tasks start with [`Notifier::spawn`].
    pub fn new(
        config: &NotificationConfig,
        listen: std::net::SocketAddr,
    ) -> Result<Self, WebhookError> {
        let mut sinks = Vec::new();
        for sink in &config.webhooks {
            let secret = match (&sink.secret, &sink.secret_env) {
                (Some(secret), _) => Some(secret.as_bytes().to_vec()),
                (None, Some(var)) => Some(
                    std::env::var(var)
                        .map_err(|_| WebhookError::SecretMissing {
                            sink: sink.name.clone(),
                            var: var.clone(),
                        })?
                        .into_bytes(),
                ),
                (None, None) => None,
            };
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(sink.timeout)
                .connect_timeout(sink.timeout)
                .build()
                .map_err(|e| WebhookError::Client {
                    sink: sink.name.clone(),
                    why: e.to_string(),
                })?;
            sinks.push(Arc::new(Sink {
                config: sink.clone(),
                secret,
                client,
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                metrics: Arc::new(SinkMetrics {
                    name: sink.name.clone(),
                    ..SinkMetrics::default()
                }),
            }));
        }
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{listen}"));
        Ok(Notifier {
            public_url: public_url.trim_end_matches('/').to_owned(),
            sinks,
        })
    }

    pub fn sink_metrics(&self) -> Vec<Arc<SinkMetrics>> {
        self.sinks.iter().map(|s| s.metrics.clone()).collect()
    }

    /// One delivery task per sink; abort them to stop.
    pub fn spawn(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.sinks
            .iter()
            .map(|sink| tokio::spawn(deliver_forever(sink.clone())))
            .collect()
    }

    /// Builds the event for `approval` and queues it for every sink. Never waits.
    pub fn publish(&self, kind: &str, approval: &Approval, environment: Option<String>) {
        if self.sinks.is_empty() {
            return;
        }
        let event = Arc::new(ApprovalEvent {
            id: random_id(),
            kind: kind.to_owned(),
            created_at: unix_seconds_now(),
            approval_id: approval.id.clone(),
            status: approval.status,
            agent: approval.agent.clone(),
            environment,
            operation: approval.operation.clone(),
            digest: approval.digest.clone(),
            expires_at: approval.expires_at,
            required: approval.required,
            approvers: approval.approvers.clone(),
            decided_by: approval.decided_by.clone(),
            url: format!("{}/ui/approvals/{}", self.public_url, approval.id),
        });
        for sink in &self.sinks {
            sink.push(event.clone());
        }
    }
}

async fn deliver_forever(sink: Arc<Sink>) {
    loop {
        match sink.pop() {
            Some(event) => deliver(&sink, &event).await,
            None => sink.wake.notified().await,
        }
    }
}

/// Tries until a 2xx answer or `max_attempts`; each attempt is signed afresh (receivers
/// reject old timestamps).
async fn deliver(sink: &Sink, event: &ApprovalEvent) {
    let body = match sink.config.format {
        WebhookFormat::Json => serde_json::to_vec(event),
        WebhookFormat::Slack => serde_json::to_vec(&slack_message(event)),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(sink = %sink.config.name, error = %e, "webhook event not serialisable");
            sink.metrics.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut backoff = sink.config.initial_backoff;
    for attempt in 1..=sink.config.max_attempts {
        let mut request = sink
            .client
            .post(&sink.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("capgate-event", &event.kind)
            .header("capgate-delivery", &event.id)
            .body(body.clone());
        if let Some(secret) = &sink.secret {
            request = request.header(SIGNATURE_HEADER, sign(secret, unix_seconds_now(), &body));
        }
        let failure = match request.send().await {
            Ok(response) if response.status().is_success() => {
                sink.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(response) => format!("answered {}", response.status()),
            Err(e) => e.to_string(),
        };
        sink.metrics
            .attempt_failures
            .fetch_add(1, Ordering::Relaxed);
        if attempt == sink.config.max_attempts {
            sink.metrics.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(sink = %sink.config.name, event = %event.id, attempts = attempt, %failure, "webhook event given up");
            return;
        }
        tracing::warn!(sink = %sink.config.name, event = %event.id, attempt, %failure, retry_in = ?backoff, "webhook delivery failed");
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
    }
}

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<unix>." + body)>`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; an empty MAC would never verify.
    let tag = Hmac::<Sha256>::new_from_slice(secret)
        .map(|mut mac| {
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        })
        .unwrap_or_default();
    format!("t={timestamp},v1={tag}")
}

/// Checks a `Capgate-Signature` header against `body`: the MAC in constant time, and the
/// timestamp within `tolerance` of `now` (a replayed old event fails).
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), &'static str> {
    let mut timestamp = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("v1", v)) => tags.push(hex::decode(v).map_err(|_| "v1 is not hex")?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or("no timestamp")?;
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return Err("timestamp outside tolerance");
    }
    for tag in tags {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad secret")?;
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&tag).is_ok() {
            return Ok(());
        }
    }
    Err("no matching v1 signature")
}

/// A Slack incoming-webhook message. Everything from the request (agent, resource, SQL…)
/// is escaped, so an agent cannot plant a link or a mention in the operators' channel.
pub fn slack_message(event: &ApprovalEvent) -> serde_json::Value {
    let headline = match (event.kind.as_str(), event.status) {
        ("approval.requested", _) => "Approval requested".to_owned(),
        ("approval.expired", _) => "Approval expired undecided".to_owned(),
        (_, status) => format!("Approval {}", status_word(status)),
    };
    let operation = &event.operation;
    let mut text = format!(
        "*{headline}*: agent `{}` wants *{}* on `{}`{} via {}",
        slack_escape(&event.agent),
        operation.verb,
        slack_escape(&operation.resource),
        event
            .environment
            .as_deref()
            .map(|e| format!(" ({})", slack_escape(e)))
            .unwrap_or_default(),
        slack_escape(&operation.adapter),
    );
    for (key, value) in &operation.detail {
        text.push_str(&format!(
            "\n>{}: `{}`",
            slack_escape(key),
            slack_escape(value)
        ));
    }
    if let Some(by) = &event.decided_by {
        text.push_str(&format!("\nDecided by {}", slack_escape(by)));
    }
    text.push_str(&format!(
        "\n<{}|Open approval {}>",
        slack_escape(&event.url),
        slack_escape(&event.approval_id)
    ));
    serde_json::json!({ "text": text })
}

fn status_word(status: ApprovalStatus) -> &'static str {
    match status {
        ApprovalStatus::Pending => "partly approved (waiting for a second operator)",
        ApprovalStatus::Approved => "approved",
        ApprovalStatus::Denied => "denied",
        ApprovalStatus::Cancelled => "cancelled",
        ApprovalStatus::Used => "used",
        ApprovalStatus::Expired => "expired",
    }
}

/// Slack's three control characters, plus the backtick so a value cannot close its code span.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "'")
}

#[cfg(test)]
mod tests {
    use super::*;
    use capgate_core::scope::Verb;
    use std::collections::BTreeMap;

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let header = sign(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        let ok =
            |h: &str, body: &[u8], now| verify(b"s3cret", h, body, now, Duration::from_secs(300));
        assert_eq!(ok(&header, b"{\"a\":1}", 1_700_000_010), Ok(()));
        assert_eq!(
            ok(&header, b"{\"a\":2}", 1_700_000_010),
            Err("no matching v1 signature")
        );
        assert_eq!(
            ok(&header, b"{\"a\":1}", 1_700_001_000),
            Err("timestamp outside tolerance")
        );
        let moved = header.replace("t=1700000000", "t=1700000005");
        assert_eq!(
            ok(&moved, b"{\"a\":1}", 1_700_000_010),
            Err("no matching v1 signature")
        );
        assert_eq!(
            verify(
                b"other",
                &header,
                b"{\"a\":1}",
                1_700_000_010,
                Duration::from_secs(300)
            ),
            Err("no matching v1 signature")
        );
    }

    #[test]
    fn slack_text_cannot_carry_links_or_mentions_from_the_request() {
        let event = ApprovalEvent {
            id: "e".into(),
            kind: "approval.requested".into(),
            created_at: 0,
            approval_id: "a1".into(),
            status: ApprovalStatus::Pending,
            agent: "bot".into(),
            environment: Some("prod".into()),
            operation: Operation {
                adapter: "pg".into(),
                resource: "pg://prod/public.t".into(),
                verb: Verb::Delete,
                detail: BTreeMap::from([(
                    "sql".to_owned(),
                    "DELETE FROM t -- <https://evil.example|click> <!channel> `x`".to_owned(),
                )]),
            },
            digest: "d".into(),
            expires_at: 0,
            required: 1,
            approvers: vec![],
            decided_by: None,
            url: "http://broker/ui/approvals/a1".into(),
        };
        let text = slack_message(&event)["text"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(!text.contains("<https://evil"), "{text}");
        assert!(!text.contains("<!channel>"), "{text}");
        assert!(text.contains("&lt;!channel&gt;"), "{text}");
        assert!(
            text.contains("<http://broker/ui/approvals/a1|Open approval a1>"),
            "{text}"
        );
        assert_eq!(text.matches('<').count(), 1, "{text}");
    }
}
