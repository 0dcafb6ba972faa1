//! The agent side: ask the broker for a token at startup, and keep it fresh for long-running
//! agents by refreshing before expiry. Also the few operator and adapter calls the CLI needs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use capgate_core::containment::approval::Approval;
use capgate_core::containment::audit::AuditEvent;
use capgate_core::containment::{ContainmentDocument, Operation};
use capgate_core::revocation::{Revocation, RevocationKind};
use capgate_core::scope::Scope;
use capgate_core::scope::Verb;
use capgate_core::token::KeySetDocument;
use capgate_core::wire::{
    AuditPage, CountResponse, FeedPage, FreezeState, GrantResponse, TokenResponse,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the broker: {0}")]
    Unreachable(String),
    #[error("broker refused ({status} {code}): {detail}")]
    Refused {
        status: u16,
        code: String,
        detail: String,
        /// Refused scopes and reasons, for `scope_refused`.
        refused: Vec<String>,
    },
    #[error("unexpected broker response: {0}")]
    BadResponse(String),
    #[error("token expired and could not be refreshed")]
    Expired,
}

#[derive(Debug, Deserialize)]
struct Problem {
    code: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    refused: Vec<RefusedScope>,
}

#[derive(Debug, Deserialize)]
struct RefusedScope {
    resource: String,
    verb: String,
    reason: String,
}

/// A token as issued, with when to stop using it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub session_id: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    broker: String,
}

impl Client {
    pub fn new(broker_url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(Client {
            http,
            broker: broker_url.trim_end_matches('/').to_owned(),
        })
    }

    /// Requests a token for `scopes` with the agent's credential (API key or JWT).
    pub async fn request_token(
        &self,
        credential: &str,
        scopes: &[Scope],
        ttl: Option<Duration>,
    ) -> Result<IssuedToken, ClientError> {
        self.request_token_with_uses(credential, scopes, ttl, None)
            .await
    }

    /// As `request_token`, for a token usable at most `max_uses` times in all (1 = one-shot).
    pub async fn request_token_with_uses(
        &self,
        credential: &str,
        scopes: &[Scope],
        ttl: Option<Duration>,
        max_uses: Option<u64>,
    ) -> Result<IssuedToken, ClientError> {
        let details: Vec<_> = scopes
            .iter()
            .map(|s| json!({"type": "capgate", "locations": [s.resource], "actions": [s.verb]}))
            .collect();
        let mut body = json!({ "authorization_details": details });
        if let Some(ttl) = ttl {
            body["ttl_seconds"] = json!(ttl.as_secs().max(1));
        }
        if let Some(uses) = max_uses {
            body["max_uses"] = json!(uses);
        }
        let issued_at = SystemTime::now();
        let response = self
            .http
            .post(format!("{}/v1/tokens", self.broker))
            .bearer_auth(credential)
            .json(&body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let response: TokenResponse = decode(response).await?;
        Ok(IssuedToken {
            token: response.access_token,
            session_id: response.session_id,
            issued_at,
            // Our own clock, not the broker's string: a refresh must never come too late.
            expires_at: issued_at
                .checked_add(Duration::from_secs(response.expires_in))
                .ok_or_else(|| ClientError::BadResponse("expires_in is out of range".into()))?,
        })
    }

    pub async fn keys(&self) -> Result<KeySetDocument, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/keys", self.broker))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }

    /// One page of the revocation feed after `cursor`, waiting up to `wait` for news.
    pub async fn revocations_since(
        &self,
        cursor: u64,
        wait: Duration,
    ) -> Result<FeedPage, ClientError> {
        let response = self
            .http
            .get(format!(
                "{}/v1/revocations?since={cursor}&wait={}",
                self.broker,
                wait.as_secs()
            ))
            // A broker that stops answering must not hold the feed past the staleness bound.
            .timeout(wait + Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bearer: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let response = self
            .http
            .post(format!("{}{path}", self.broker))
            .bearer_auth(bearer)
            .timeout(Duration::from_secs(5))
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<T, ClientError> {
        let mut request = self
            .http
            .get(format!("{}{path}", self.broker))
            .timeout(Duration::from_secs(5));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }

    pub async fn containment(&self) -> Result<ContainmentDocument, ClientError> {
        self.get_json("/v1/containment", None).await
    }

    /// Adapter: create an approval request for an operation, with the agent's token.
    pub async fn request_approval(
        &self,
        token: &str,
        operation: &Operation,
    ) -> Result<Approval, ClientError> {
        self.post_json("/v1/approvals", token, &json!({ "operation": operation }))
            .await
    }

    pub async fn consume_approval(
        &self,
        token: &str,
        id: &str,
        digest: &str,
    ) -> Result<Approval, ClientError> {
        self.post_json(
            &format!("/v1/approvals/{id}/consume"),
            token,
            &json!({ "digest": digest }),
        )
        .await
    }

    pub async fn count(&self, token: &str, verb: Verb) -> Result<CountResponse, ClientError> {
        self.post_json("/v1/velocity", token, &json!({ "verb": verb }))
            .await
    }

    pub async fn count_use(&self, token: &str) -> Result<CountResponse, ClientError> {
        self.post_json("/v1/uses", token, &json!({})).await
    }

    pub async fn append_audit(
        &self,
        adapter_key: &str,
        events: &[AuditEvent],
    ) -> Result<serde_json::Value, ClientError> {
        self.post_json("/v1/audit", adapter_key, &json!({ "events": events }))
            .await
    }

    /// Adapter: stores records already serialised, one `AuditEvent` JSON text each (the
    /// audit spool's lines), without parsing them into values and serialising them again.
    pub async fn append_audit_serialised(
        &self,
        adapter_key: &str,
        events: &[&str],
    ) -> Result<serde_json::Value, ClientError> {
        let length = events.iter().map(|e| e.len() + 1).sum::<usize>() + 16;
        let mut body = String::with_capacity(length);
        body.push_str("{\"events\":[");
        for (index, event) in events.iter().enumerate() {
            if index > 0 {
                body.push(',');
            }
            body.push_str(event);
        }
        body.push_str("]}");
        let response = self
            .http
            .post(format!("{}/v1/audit", self.broker))
            .bearer_auth(adapter_key)
            .timeout(Duration::from_secs(5))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }

    /// Adapter: attaches what a pending approval's operation would touch.
    pub async fn attach_preview(
        &self,
        adapter_key: &str,
        id: &str,
        preview: &str,
    ) -> Result<Approval, ClientError> {
        self.post_json(
            &format!("/v1/approvals/{id}/preview"),
            adapter_key,
            &json!({ "preview": preview }),
        )
        .await
    }

    /// Agent: the approval's state, and once approved, the token carrying the approval block.
    pub async fn approval(&self, token: &str, id: &str) -> Result<Approval, ClientError> {
        self.get_json(&format!("/v1/approvals/{id}"), Some(token))
            .await
    }

    pub async fn grant(&self, token: &str, id: &str) -> Result<GrantResponse, ClientError> {
        self.post_json(&format!("/v1/approvals/{id}/grant"), token, &json!({}))
            .await
    }

    /// Operator calls.
    pub async fn approvals(&self, operator_key: &str) -> Result<Vec<Approval>, ClientError> {
        self.get_json("/v1/approvals", Some(operator_key)).await
    }

    pub async fn decide_approval(
        &self,
        operator_key: &str,
        id: &str,
        action: &str,
    ) -> Result<Approval, ClientError> {
        self.post_json(
            &format!("/v1/approvals/{id}/{action}"),
            operator_key,
            &json!({}),
        )
        .await
    }

    pub async fn set_freeze(
        &self,
        operator_key: &str,
        frozen: bool,
    ) -> Result<FreezeState, ClientError> {
        self.post_json("/v1/freeze", operator_key, &json!({ "frozen": frozen }))
            .await
    }

    pub async fn audit_page(
        &self,
        operator_key: &str,
        since: u64,
    ) -> Result<AuditPage, ClientError> {
        self.get_json(
            &format!("/v1/audit?since={since}&limit=1000"),
            Some(operator_key),
        )
        .await
    }

    pub async fn revoke(
        &self,
        operator_key: &str,
        kind: RevocationKind,
        value: &str,
        reason: &str,
    ) -> Result<Revocation, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/revocations", self.broker))
            .bearer_auth(operator_key)
            .json(&json!({"kind": kind, "value": value, "reason": reason}))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        decode(response).await
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()));
    }
    match serde_json::from_slice::<Problem>(&bytes) {
        Ok(problem) => Err(ClientError::Refused {
            status: status.as_u16(),
            code: problem.code,
            detail: problem.detail,
            refused: problem
                .refused
                .into_iter()
                .map(|r| format!("{}:{}: {}", r.resource, r.verb, r.reason))
                .collect(),
        }),
        Err(_) => Err(ClientError::BadResponse(format!(
            "HTTP {status} without a problem body"
        ))),
    }
}

/// Keeps a token fresh for a long-running agent: refreshes when two thirds of its life have
/// passed, retries on failure, and stops handing out the token once it has expired.
pub struct TokenRefresher {
    current: watch::Receiver<Arc<IssuedToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenRefresher {
    /// Requests the first token (failing if the broker refuses) and starts refreshing.
    pub async fn start(
        client: Client,
        credential: String,
        scopes: Vec<Scope>,
        ttl: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let first = client.request_token(&credential, &scopes, ttl).await?;
        let (sender, current) = watch::channel(Arc::new(first));
        let task = tokio::spawn(async move {
            loop {
                let (issued_at, expires_at) = {
                    let token = sender.borrow();
                    (token.issued_at, token.expires_at)
                };
                let lifetime = expires_at.duration_since(issued_at).unwrap_or_default();
                let refresh_at = issued_at + lifetime / 3 * 2;
                if let Ok(wait) = refresh_at.duration_since(SystemTime::now()) {
                    tokio::time::sleep(wait).await;
                }
                let mut backoff = Duration::from_millis(200);
                loop {
                    match client.request_token(&credential, &scopes, ttl).await {
                        Ok(token) => {
                            if sender.send(Arc::new(token)).is_err() {
                                return; // nobody listens any more
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "token refresh failed; retrying");
                            if matches!(
                                e,
                                ClientError::Refused {
                                    status: 401 | 403,
                                    ..
                                }
                            ) {
                                return; // revoked or no longer granted: stop, let it expire
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        });
        Ok(TokenRefresher { current, task })
    }

    /// The current token, unless it has expired.
    pub fn token(&self) -> Result<String, ClientError> {
        let token = self.current.borrow();
        if token.expires_at <= SystemTime::now() {
            return Err(ClientError::Expired);
        }
        Ok(token.token.clone())
    }

    pub fn current(&self) -> Arc<IssuedToken> {
        self.current.borrow().clone()
    }
}

impl Drop for TokenRefresher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
