//! The approvals console (`/ui`): a server-rendered page where an operator signs in with an
//! operator key, sees pending approvals with their exact operation and preview, approves or
//! denies them under the same rules as the API and the CLI, switches the freeze, and reads
//! the recent audit trail.
//!
//! Browser defences, each on every request: the session is an opaque random id in an
//! `HttpOnly; SameSite=Strict` cookie scoped to `/ui` (kept only as its hash, server-side,
//! for at most an hour); every form carries a CSRF token bound to the session (to a login
//! cookie before sign-in); a POST whose `Sec-Fetch-Site` is present and not `same-origin`
//! is refused; pages are sent with a strict Content-Security-Policy (no script at all; the
//! one stylesheet allowed by its hash), `frame-ancestors 'none'`, `no-store` and
//! `no-referrer`.

mod page;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::approvals::decide_as;
use super::containment::freeze_as;
use super::problem::Body;
use super::BrokerState;
use crate::identity::Operator;
use capgate_core::containment::approval::ApprovalAction;
use capgate_core::token::random_id;

const SESSION_COOKIE: &str = "capgate_console";
const LOGIN_COOKIE: &str = "capgate_console_login";
/// A console session ends this long after sign-in, whatever happens in between.
const SESSION_LIFETIME: Duration = Duration::from_secs(3600);
/// Sessions kept at once; the oldest is dropped beyond this.
const MAX_SESSIONS: usize = 1000;

struct Session {
    operator: Operator,
    csrf: String,
    expires: Instant,
}

/// Signed-in operators, by the SHA-256 of their session id (a leaked memory dump holds no
/// usable cookie).
#[derive(Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<String, Session>>,
}

fn hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// Equal without an early exit, so the comparison time says nothing about the token.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Sessions {
    fn start(&self, operator: Operator) -> Option<(String, String)> {
        let id = random_id();
        let csrf = random_id();
        let mut sessions = self.by_hash.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            hash(&id),
            Session {
                operator,
                csrf: csrf.clone(),
                expires: now + SESSION_LIFETIME,
            },
        );
        Some((id, csrf))
    }

    /// The operator and CSRF token of a live session.
    fn get(&self, id: &str) -> Option<(Operator, String)> {
        let sessions = self.by_hash.lock().ok()?;
        sessions
            .get(&hash(id))
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.operator.clone(), s.csrf.clone()))
    }

    fn end(&self, id: &str) {
        if let Ok(mut sessions) = self.by_hash.lock() {
            sessions.remove(&hash(id));
        }
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("capgate_console=; Path=/ui; Max-Age=0"))
}

/// Why a console request is refused: shown as a page, never as a redirect loop.
fn refused(status: StatusCode, why: &str) -> Response {
    page::respond(status, page::message("Refused", why), Vec::new())
}

/// A POST from another site (or a frame of one) is refused outright; a browser that sends
/// no `Sec-Fetch-Site` still has to present the CSRF token.
fn same_origin(headers: &HeaderMap) -> Result<(), Box<Response>> {
    match headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or(""))
    {
        None | Some("same-origin") => Ok(()),
        Some(other) => Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            &format!("cross-site request refused (Sec-Fetch-Site: {other})"),
        ))),
    }
}

fn form<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, Box<Response>> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return Err(Box::new(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "forms are sent as application/x-www-form-urlencoded",
        )));
    }
    serde_urlencoded::from_bytes(body).map_err(|_| {
        Box::new(refused(
            StatusCode::BAD_REQUEST,
            "the form could not be read",
        ))
    })
}

fn see_other(to: &str, cookies: Vec<HeaderValue>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response();
    for c in cookies {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

/// The signed-in operator of a request, with the session's CSRF token.
fn signed_in(state: &BrokerState, headers: &HeaderMap) -> Option<(String, Operator, String)> {
    let id = cookie(headers, SESSION_COOKIE)?;
    let (operator, csrf) = state.console.get(id)?;
    Some((id.to_owned(), operator, csrf))
}

/// For a POST: same origin, a live session, and its CSRF token in the form.
fn authorized_post(
    state: &BrokerState,
    headers: &HeaderMap,
    presented: &str,
) -> Result<Operator, Box<Response>> {
    same_origin(headers)?;
    let Some((_, operator, csrf)) = signed_in(state, headers) else {
        return Err(Box::new(refused(
            StatusCode::UNAUTHORIZED,
            "not signed in (or the session ended); sign in again",
        )));
    };
    if !same(presented, &csrf) {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is not this session's",
        )));
    }
    Ok(operator)
}

pub async fn home(State(state): State<Arc<BrokerState>>, headers: HeaderMap) -> Response {
    let Some((_, operator, csrf)) = signed_in(&state, &headers) else {
        return see_other("/ui/login", Vec::new());
    };
    render_home(&state, &operator, &csrf, None).await
}

async fn render_home(
    state: &BrokerState,
    operator: &Operator,
    csrf: &str,
    problem: Option<(StatusCode, String)>,
) -> Response {
    let loaded = async {
        let approvals = state.store.approvals().await?;
        let frozen = state.store.frozen().await?;
        let head = state.store.audit_head().await?;
        let audit = state
            .store
            .audit_since(
                head.saturating_sub(page::AUDIT_SHOWN as u64),
                page::AUDIT_SHOWN,
            )
            .await?;
        Ok::<_, crate::store::StoreError>((approvals, frozen, audit))
    };
    match loaded.await {
        Ok((approvals, frozen, audit)) => {
            let (status, error) = match problem {
                Some((status, why)) => (status, Some(why)),
                None => (StatusCode::OK, None),
            };
            let view = page::Home {
                operator: &operator.name,
                csrf,
                approvals: &approvals,
                frozen,
                audit: &audit,
                error: error.as_deref(),
                environment_of: &|resource: &str| {
                    resource
                        .parse()
                        .ok()
                        .and_then(|p| state.config.environment_of(&p).map(str::to_owned))
                },
            };
            page::respond(status, page::home(&view), Vec::new())
        }
        Err(e) => {
            tracing::error!(error = %e, "console cannot read the store");
            refused(StatusCode::SERVICE_UNAVAILABLE, "the store cannot be read")
        }
    }
}

pub async fn login_form(State(_state): State<Arc<BrokerState>>) -> Response {
    let token = random_id();
    page::respond(
        StatusCode::OK,
        page::login(&token, None),
        vec![set_cookie(LOGIN_COOKIE, &token, 600)],
    )
}

#[derive(Deserialize)]
struct LoginForm {
    operator_key: String,
    csrf: String,
}

pub async fn login(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    if let Err(refusal) = same_origin(&headers) {
        return *refusal;
    }
    let form: LoginForm = match form(&headers, &body) {
        Ok(form) => form,
        Err(refusal) => return *refusal,
    };
    if !cookie(&headers, LOGIN_COOKIE).is_some_and(|c| same(c, &form.csrf)) {
        return refused(
            StatusCode::FORBIDDEN,
            "the sign-in form is stale or was not served here; open /ui/login again",
        );
    }
    match state
        .authenticator
        .authenticate_operator(&form.operator_key)
    {
        Ok(operator) => {
            tracing::warn!(operator = %operator.name, "console sign-in");
            match state.console.start(operator) {
                Some((id, _)) => see_other(
                    "/ui",
                    vec![
                        set_cookie(SESSION_COOKIE, &id, SESSION_LIFETIME.as_secs()),
                        set_cookie(LOGIN_COOKIE, "", 0),
                    ],
                ),
                None => refused(StatusCode::SERVICE_UNAVAILABLE, "sessions are unavailable"),
            }
        }
        Err(e) => {
            tracing::warn!(code = e.code(), "console sign-in refused");
            let token = random_id();
            page::respond(
                StatusCode::UNAUTHORIZED,
                page::login(&token, Some("that is not an operator key")),
                vec![set_cookie(LOGIN_COOKIE, &token, 600)],
            )
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let form: CsrfForm = match form(&headers, &body) {
        Ok(form) => form,
        Err(refusal) => return *refusal,
    };
    if let Err(refusal) = authorized_post(&state, &headers, &form.csrf) {
        return *refusal;
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.console.end(id);
    }
    see_other("/ui/login", vec![set_cookie(SESSION_COOKIE, "", 0)])
}

async fn decide(
    state: &BrokerState,
    headers: &HeaderMap,
    body: &[u8],
    id: &str,
    action: impl FnOnce(String) -> ApprovalAction,
    what: &str,
) -> Response {
    let form: CsrfForm = match form(headers, body) {
        Ok(form) => form,
        Err(refusal) => return *refusal,
    };
    let operator = match authorized_post(state, headers, &form.csrf) {
        Ok(operator) => operator,
        Err(refusal) => return *refusal,
    };
    match decide_as(state, &operator, id, action(operator.name.clone()), what).await {
        Ok(_) => see_other("/ui", Vec::new()),
        Err(e) => {
            let why = format!("{}: {}", e.code, e.detail);
            render_home(state, &operator, &form.csrf, Some((e.status, why))).await
        }
    }
}

pub async fn approve(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let ttl_seconds = state.config.containment.approval_ttl.as_secs();
    decide(
        &state,
        &headers,
        &body,
        &id,
        |operator| ApprovalAction::Approve {
            operator,
            ttl_seconds,
        },
        "approved",
    )
    .await
}

pub async fn deny(
    State(state): State<Arc<BrokerState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    decide(
        &state,
        &headers,
        &body,
        &id,
        |operator| ApprovalAction::Deny { operator },
        "denied",
    )
    .await
}

#[derive(Deserialize)]
struct FreezeForm {
    csrf: String,
    frozen: String,
}

pub async fn freeze(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Response {
    let form: FreezeForm = match form(&headers, &body) {
        Ok(form) => form,
        Err(refusal) => return *refusal,
    };
    let operator = match authorized_post(&state, &headers, &form.csrf) {
        Ok(operator) => operator,
        Err(refusal) => return *refusal,
    };
    let frozen = match form.frozen.as_str() {
        "on" => true,
        "off" => false,
        _ => return refused(StatusCode::BAD_REQUEST, "freeze is on or off"),
    };
    match freeze_as(&state, &operator.name, frozen).await {
        Ok(()) => see_other("/ui", Vec::new()),
        Err(e) => {
            let why = format!("{}: {}", e.code, e.detail);
            render_home(&state, &operator, &form.csrf, Some((e.status, why))).await
        }
    }
}
