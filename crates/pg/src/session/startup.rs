//! A session's first job: startup (TLS and GSS refused, cancel requests mapped to the real
//! backend, parameters filtered) and login with the Capgate token as password, then the
//! upstream session opened for it. Nothing of the client's reaches upstream here except what
//! the proxy itself derives from a verified token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::super::upstream::{self, UpstreamLogin};
use super::super::wire::{self, cstr, error_response, read_message, read_startup, WireError};
use super::super::PgProxy;

/// Startup parameters a client may send; anything else (notably `options`) is refused.
const ALLOWED_PARAMETERS: [&str; 8] = [
    "user",
    "database",
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "fallback_application_name",
];

/// A client that finished startup and login: its upstream session and cancel key.
pub(super) struct Established {
    pub(super) upstream: TcpStream,
    pub(super) token: String,
    /// Pure built-ins' names the session's schema overloads (see `upstream::overloaded_builtins`).
    pub(super) overloaded: HashSet<String>,
    _cancel: CancelKey,
}

/// A cancel key minted for a session; dropping it (the session ended, or its startup timed
/// out after the key was minted) forgets the mapping to the real backend.
struct CancelKey {
    proxy: Arc<PgProxy>,
    minted: (i32, i32),
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.proxy.unregister_cancel(self.minted);
    }
}

/// Startup and login, bounded by the caller's startup timeout. `None`: the client was
/// answered (refused, or a cancel request) and the connection ends.
pub(super) async fn start(
    client: &mut TcpStream,
    peer: SocketAddr,
    proxy: &Arc<PgProxy>,
) -> Result<Option<Established>, WireError> {
    let parameters = loop {
        let (code, body) = read_startup(client).await?;
        match code {
            // No TLS or GSS encryption in this version: say so, and the client continues in
            // plaintext (or gives up). Nothing sent before this answer is ever processed.
            wire::SSL_REQUEST | wire::GSSENC_REQUEST => client.write_all(b"N").await?,
            wire::CANCEL_REQUEST => {
                if body.len() == 8 {
                    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    proxy.forward_cancel(pid, secret).await;
                }
                return Ok(None);
            }
            wire::PROTOCOL_3_0 => break wire::parse_parameters(&body)?,
            _ => {
                return refuse_startup(client, "0A000", "unsupported frontend protocol version")
                    .await;
            }
        }
    };
    let get = |key: &str| {
        parameters
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    };
    if let Some((key, _)) = parameters
        .iter()
        .find(|(k, _)| !ALLOWED_PARAMETERS.contains(&k.to_ascii_lowercase().as_str()))
    {
        let message = format!("startup parameter {key:?} is not accepted by the Capgate proxy");
        return refuse_startup(client, "42501", &message).await;
    }
    if let Some(encoding) = get("client_encoding") {
        if !["utf8", "utf-8", "unicode"].contains(&encoding.to_ascii_lowercase().as_str()) {
            return refuse_startup(client, "42501", "only client_encoding UTF8 is accepted").await;
        }
    }
    let Some(user) = get("user").map(str::to_owned) else {
        return refuse_startup(client, "28000", "no user given").await;
    };
    if get("database").is_some_and(|db| db != proxy.config.database) {
        let message = format!(
            "this proxy serves database {:?} only",
            proxy.config.database
        );
        return refuse_startup(client, "3D000", &message).await;
    }
    if !peer.ip().is_loopback() && !proxy.config.allow_non_loopback_plaintext {
        return refuse_startup(
            client,
            "28000",
            "plaintext password from a non-loopback client refused (configure TLS)",
        )
        .await;
    }
    wire::write_message(client, &wire::authentication(3)).await?;
    let password = read_message(client, 64 * 1024).await?;
    if password.tag != b'p' {
        return refuse_startup(client, "08P01", "expected a password message").await;
    }
    let token = cstr(&password.body)?.0.to_owned();
    let verified = match proxy.guard.verify_token(&token) {
        Ok(verified) => verified,
        Err(denial) => {
            tracing::warn!(%peer, %denial, "pg login refused");
            return refuse_startup(client, "28P01", &format!("Capgate token refused: {denial}"))
                .await;
        }
    };
    if verified.agent() != user {
        return refuse_startup(client, "28000", "user name must be the token's agent").await;
    }
    let read_only = !proxy.token_may_change_database(&verified);
    let application_name = get("application_name").unwrap_or("capgate").to_owned();
    let upstream = match upstream::connect(&UpstreamLogin {
        addr: &proxy.config.upstream.addr,
        user: &proxy.config.upstream.user,
        password: proxy.upstream_password.as_deref(),
        database: &proxy.config.upstream.database,
        application_name: &application_name,
        default_schema: &proxy.config.default_schema,
        read_only,
    })
    .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::error!(error = %e, "upstream connection failed");
            return refuse_startup(
                client,
                "08006",
                "the database behind Capgate is unavailable",
            )
            .await;
        }
    };
    let mut upstream = upstream;
    let overloaded =
        match upstream::overloaded_builtins(&mut upstream.stream, &proxy.config.default_schema)
            .await
        {
            Ok(overloaded) => overloaded,
            Err(e) => {
                tracing::error!(error = %e, "reading the session schema's functions failed");
                return refuse_startup(
                    client,
                    "08006",
                    "the database behind Capgate did not say which functions it defines",
                )
                .await;
            }
        };
    wire::write_message(client, &wire::authentication(0)).await?;
    for status in &upstream.parameters {
        wire::write_message(client, status).await?;
    }
    let minted = proxy.register_cancel(upstream.backend_key);
    let cancel = CancelKey {
        proxy: proxy.clone(),
        minted,
    };
    wire::write_message(client, &wire::backend_key(minted.0, minted.1)).await?;
    wire::write_message(client, &wire::ready_for_query(b'I')).await?;
    tracing::info!(%peer, agent = %user, read_only, "pg session started");
    Ok(Some(Established {
        upstream: upstream.stream,
        token,
        overloaded,
        _cancel: cancel,
    }))
}

async fn refuse_startup(
    client: &mut TcpStream,
    sqlstate: &str,
    message: &str,
) -> Result<Option<Established>, WireError> {
    refuse(client, sqlstate, message).await.map(|()| None)
}

pub(super) async fn refuse(
    client: &mut TcpStream,
    sqlstate: &str,
    message: &str,
) -> Result<(), WireError> {
    wire::write_message(client, &error_response(sqlstate, message)).await?;
    Ok(())
}
