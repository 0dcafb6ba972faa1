//! What an agent's HTTP request must be before the SDK parses it, and what becomes of it
//! when the agent leaves. A POST body is one JSON-RPC message of at most
//! `max_message_bytes`: larger is refused on its declared length or as soon as the body
//! crosses the cap (413 problem+json `message_too_large`), and a batch (a JSON array) is
//! refused whole (400 with JSON-RPC error -32600, `data.code` `batch_refused`), so no part
//! of one is ever decided or forwarded.
//!
//! A request inside a 2025-era session is answered on its own SSE stream, which the SDK
//! keeps running when the client closes it (a session may resume). The gateway does not
//! wait: a stream closed before its answer was sent cancels the request in its session
//! (`notifications/cancelled`), which drops the upstream call, as the SDK already does for
//! a stateless request whose client went away.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, Method, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use rmcp::model::ClientJsonRpcMessage;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{SessionId, SessionManager};
use serde_json::{json, Value};

use crate::{problem, Mode};

/// The JSON-RPC code for a message that is not one request object.
const INVALID_REQUEST: i64 = -32600;

#[derive(Clone)]
pub struct Intake {
    pub max_bytes: usize,
    /// The sessions of the server this intake fronts, to cancel into.
    pub sessions: Arc<LocalSessionManager>,
}

/// The middleware: screens POST bodies, then watches the answer's stream.
pub async fn screen(State(intake): State<Intake>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > intake.max_bytes as u64) {
        return too_large(intake.max_bytes);
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, intake.max_bytes).await {
        Ok(bytes) => bytes,
        Err(e) if over_limit(&e) => return too_large(intake.max_bytes),
        Err(e) => {
            tracing::debug!(error = %e, "request body unreadable");
            return problem(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the request body could not be read",
                None,
                Mode::Enforce,
            );
        }
    };
    if is_batch(&bytes) {
        return batch_refused();
    }
    let watch = session_request(&parts.headers, &bytes);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    match watch {
        Some((session, id)) if is_event_stream(&response) => response.map(|body| {
            Body::new(Watched {
                inner: body,
                cancel: Cancel {
                    sessions: intake.sessions.clone(),
                    session,
                    id,
                    armed: true,
                },
            })
        }),
        _ => response,
    }
}

/// A JSON array after optional JSON whitespace.
fn is_batch(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'[')
}

fn over_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn too_large(max_bytes: usize) -> Response {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "message_too_large",
        &format!("a message is at most {max_bytes} bytes"),
        None,
        Mode::Enforce,
    )
}

fn batch_refused() -> Response {
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": INVALID_REQUEST,
            "message": "capgate refused (batch_refused): JSON-RPC batches are not accepted; send one message per request",
            "data": {"code": "batch_refused"},
        }
    });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// The session and JSON-RPC id of a request made inside a session.
fn session_request(headers: &http::HeaderMap, body: &[u8]) -> Option<(SessionId, Value)> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        id: Option<Value>,
        method: Option<serde::de::IgnoredAny>,
    }
    let session = headers.get("mcp-session-id")?.to_str().ok()?;
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    envelope.method?;
    let id = envelope.id.filter(|id| id.is_string() || id.is_number())?;
    Some((SessionId::from(session), id))
}

fn is_event_stream(response: &Response) -> bool {
    response.status() == StatusCode::OK
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Cancels request `id` in `session` when dropped armed.
struct Cancel {
    sessions: Arc<LocalSessionManager>,
    session: SessionId,
    id: Value,
    armed: bool,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let notification = json!({
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": self.id, "reason": "the client closed its stream"},
        });
        let Ok(message) = serde_json::from_value::<ClientJsonRpcMessage>(notification) else {
            tracing::error!("cannot build a cancellation");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (sessions, session) = (self.sessions.clone(), self.session.clone());
        tracing::info!(session = %session, id = %self.id, "client closed its stream mid-request: cancelling it");
        runtime.spawn(async move {
            // The session may be gone already (closed with DELETE): nothing left to cancel.
            if let Err(e) = sessions.accept_message(&session, message).await {
                tracing::debug!(error = %e, "cancellation not delivered");
            }
        });
    }
}

/// An answer's SSE stream that cancels its request if dropped before the answer passed.
struct Watched {
    inner: Body,
    cancel: Cancel,
}

impl Watched {
    /// Disarms once a frame carries the response (or error) for the watched id.
    fn observe(&mut self, data: &Bytes) {
        let cancel = &mut self.cancel;
        if !cancel.armed {
            return;
        }
        let answered = data
            .split(|b| *b == b'\n')
            .filter_map(|line| line.strip_prefix(b"data:"))
            .filter_map(|payload| serde_json::from_slice::<Value>(payload.trim_ascii()).ok())
            .any(|message| {
                message.get("id") == Some(&cancel.id)
                    && (message.get("result").is_some() || message.get("error").is_some())
            });
        if answered {
            cancel.armed = false;
        }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    this.observe(&data);
                }
            }
            // The stream ended: the answer went out (or the session ended it).
            Poll::Ready(None) => this.cancel.armed = false,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_an_array_whatever_whitespace_precedes_it() {
        assert!(is_batch(b"[{\"jsonrpc\":\"2.0\"}]"));
        assert!(is_batch(b" \r\n\t[]"));
        assert!(!is_batch(b"{\"jsonrpc\":\"2.0\",\"method\":\"x\"}"));
        assert!(!is_batch(b""));
    }

    #[test]
    fn only_requests_inside_a_session_are_watched() {
        let mut headers = http::HeaderMap::new();
        let request = br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{}}"#;
        assert_eq!(session_request(&headers, request), None);
        headers.insert("mcp-session-id", http::HeaderValue::from_static("s1"));
        assert_eq!(
            session_request(&headers, request),
            Some((SessionId::from("s1"), json!(5)))
        );
        let notification = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        assert_eq!(session_request(&headers, notification), None);
        let response = br#"{"jsonrpc":"2.0","id":5,"result":{}}"#;
        assert_eq!(session_request(&headers, response), None);
    }
}
