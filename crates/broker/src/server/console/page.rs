//! The console's HTML, rendered with `maud` (every interpolated value is escaped by it) and
//! sent with the headers that keep a browser from running or framing anything else.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use maud::{html, Markup, DOCTYPE};
use sha2::{Digest, Sha256};

use capgate_core::containment::approval::{Approval, ApprovalStatus};
use capgate_core::containment::audit::AuditRecord;
use capgate_core::token::{from_unix_seconds, rfc3339};

/// Newest audit records shown.
pub const AUDIT_SHOWN: usize = 25;
/// Longest audit detail shown per record.
const DETAIL_SHOWN: usize = 240;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#111}\
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.35em .5em;vertical-align:top;text-align:left}\
th{background:#f3f3f3}code,pre{font:12px ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;margin:0}\
.preview{font-weight:600}.frozen{color:#a00;font-weight:700}.error{background:#fee;border:1px solid #c00;padding:.5em}\
form{display:inline}button{margin:.1em .2em;padding:.25em .8em}.approve{background:#dfd}.deny{background:#fdd}";

/// The Content-Security-Policy: nothing but this page's own stylesheet (by its hash) and
/// form posts to this origin.
fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE));
        format!(
            "default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        )
    })
}

/// A complete answer: the page, its status, cookies, and the protective headers.
pub fn respond(status: StatusCode, body: Markup, cookies: Vec<HeaderValue>) -> Response {
    let mut response = (status, body.into_string()).into_response();
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(value) = HeaderValue::from_str(csp()) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
    response
}

fn layout(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Capgate" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body { (content) }
        }
    }
}

pub fn message(title: &str, text: &str) -> Markup {
    layout(
        title,
        html! {
            h1 { (title) }
            p.error { (text) }
            p { a href="/ui" { "Back to the console" } }
        },
    )
}

pub fn login(csrf: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        html! {
            h1 { "Capgate approvals: sign in" }
            @if let Some(error) = error { p.error { (error) } }
            form method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Operator key " input #operator_key type="password" name="operator_key" autocomplete="off" required; }
                " "
                button #sign_in type="submit" { "Sign in" }
            }
        },
    )
}

pub struct Home<'a> {
    pub operator: &'a str,
    pub csrf: &'a str,
    pub approvals: &'a [Approval],
    pub frozen: bool,
    pub audit: &'a [AuditRecord],
    pub error: Option<&'a str>,
    pub environment_of: &'a dyn Fn(&str) -> Option<String>,
}

fn time(at: u64) -> String {
    rfc3339(from_unix_seconds(at))
}

fn approval_row(view: &Home<'_>, a: &Approval) -> Markup {
    let environment = (view.environment_of)(&a.operation.resource);
    html! {
        tr.approval id={ "approval-" (a.id) } {
            td { code { (a.id) } br; "requested " (time(a.created_at)) br; "expires " (time(a.expires_at)) }
            td { (a.agent) br; "session " code { (a.session.chars().take(12).collect::<String>()) } }
            td { (environment.as_deref().unwrap_or("(no environment)")) }
            td {
                strong { (a.operation.verb) } " " code { (a.operation.resource) } br;
                "via " (a.operation.adapter)
                @for (key, value) in &a.operation.detail {
                    br; (key) ": " pre.detail { (value) }
                }
            }
            td.preview {
                @match &a.preview {
                    Some(preview) => { (preview.text) br; small { "measured by " (preview.by) } }
                    None => { "no preview" }
                }
            }
            td { (a.approvers.len()) " of " (a.required) @if !a.approvers.is_empty() { br; (a.approvers.join(", ")) } }
            td {
                form method="post" action={ "/ui/approvals/" (a.id) "/approve" } {
                    input type="hidden" name="csrf" value=(view.csrf);
                    button.approve type="submit" { "Approve" }
                }
                form method="post" action={ "/ui/approvals/" (a.id) "/deny" } {
                    input type="hidden" name="csrf" value=(view.csrf);
                    button.deny type="submit" { "Deny" }
                }
            }
        }
    }
}

fn status(status: ApprovalStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{status:?}"))
}

fn detail(record: &AuditRecord) -> String {
    let text = record.event.detail.to_string();
    if text.chars().count() <= DETAIL_SHOWN {
        return text;
    }
    let cut: String = text.chars().take(DETAIL_SHOWN).collect();
    format!("{cut}…")
}

pub fn home(view: &Home<'_>) -> Markup {
    let mut pending: Vec<&Approval> = view
        .approvals
        .iter()
        .filter(|a| a.status == ApprovalStatus::Pending)
        .collect();
    pending.sort_by_key(|a| std::cmp::Reverse(a.created_at));
    let mut decided: Vec<&Approval> = view
        .approvals
        .iter()
        .filter(|a| a.status != ApprovalStatus::Pending)
        .collect();
    decided.sort_by_key(|a| std::cmp::Reverse(a.created_at));
    decided.truncate(20);
    layout(
        "Approvals",
        html! {
            h1 { "Capgate approvals" }
            p {
                "Signed in as " strong #operator { (view.operator) } ". "
                form method="post" action="/ui/logout" {
                    input type="hidden" name="csrf" value=(view.csrf);
                    button type="submit" { "Sign out" }
                }
            }
            @if let Some(error) = view.error { p.error #error { (error) } }
            h2 { "Freeze" }
            p #freeze {
                @if view.frozen { span.frozen { "All writes are frozen." } } @else { "Writes are not frozen." }
                " "
                form method="post" action="/ui/freeze" {
                    input type="hidden" name="csrf" value=(view.csrf);
                    input type="hidden" name="frozen" value=(if view.frozen { "off" } else { "on" });
                    button #toggle_freeze type="submit" { (if view.frozen { "Unfreeze" } else { "Freeze all writes" }) }
                }
            }
            h2 { "Pending approvals (" (pending.len()) ")" }
            @if pending.is_empty() {
                p { "Nothing is waiting." }
            } @else {
                table #pending {
                    tr { th { "request" } th { "agent" } th { "environment" } th { "operation" } th { "preview" } th { "approvals" } th { "decide" } }
                    @for a in &pending { (approval_row(view, a)) }
                }
            }
            h2 { "Recently decided" }
            table #decided {
                tr { th { "request" } th { "agent" } th { "operation" } th { "status" } th { "by" } }
                @for a in &decided {
                    tr {
                        td { code { (a.id) } }
                        td { (a.agent) }
                        td { (a.operation.verb) " " code { (a.operation.resource) } }
                        td { (status(a.status)) }
                        td { (a.decided_by.as_deref().unwrap_or("")) }
                    }
                }
            }
            h2 { "Recent audit trail" }
            table #audit {
                tr { th { "seq" } th { "at" } th { "kind" } th { "actor" } th { "detail" } }
                @for record in view.audit.iter().rev() {
                    tr {
                        td { (record.seq) }
                        td { (time(record.at)) }
                        td { (format!("{:?}", record.event.kind).to_lowercase()) }
                        td { (record.event.actor.as_deref().unwrap_or("")) }
                        td { code { (detail(record)) } }
                    }
                }
            }
        },
    )
}
