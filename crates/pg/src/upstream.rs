//! The proxy's own connection to the real PostgreSQL: its startup parameters (forced settings,
//! never the client's `options`) and its authentication (trust, cleartext, md5, SCRAM-SHA-256)
//! with the credential from configuration, which the agent never sees.

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use std::collections::HashSet;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::wire::{encode, read_message, startup_packet, Message, WireError, PROTOCOL_3_0};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("upstream refused: {0}")]
    Refused(String),
    #[error("upstream asked for unsupported authentication {0}")]
    UnsupportedAuth(i32),
    #[error("upstream needs a password and none is configured")]
    NoPassword,
    #[error("SCRAM exchange failed: {0}")]
    Scram(String),
}

/// An authenticated upstream session, ready for queries.
pub struct Upstream {
    pub stream: TcpStream,
    /// ParameterStatus messages to relay to the client.
    pub parameters: Vec<Message>,
    /// The real backend's cancel key (never shown to the client).
    pub backend_key: Option<(i32, i32)>,
}

pub struct UpstreamLogin<'a> {
    pub addr: &'a str,
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
    pub application_name: &'a str,
    pub default_schema: &'a str,
    pub read_only: bool,
}

const MAX_UPSTREAM_FRAME: usize = 1 << 20;

pub async fn connect(login: &UpstreamLogin<'_>) -> Result<Upstream, UpstreamError> {
    let mut stream = TcpStream::connect(login.addr)
        .await
        .map_err(WireError::Io)?;
    stream.set_nodelay(true).map_err(WireError::Io)?;
    let read_only = if login.read_only { "on" } else { "off" };
    let parameters = [
        ("user", login.user),
        ("database", login.database),
        ("application_name", login.application_name),
        // Pinned so that what the classifier parsed is what the server executes.
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("search_path", login.default_schema),
        ("default_transaction_read_only", read_only),
    ];
    stream
        .write_all(&startup_packet(PROTOCOL_3_0, &parameters))
        .await
        .map_err(WireError::Io)?;
    let mut scram: Option<ScramSha256> = None;
    let mut statuses = Vec::new();
    let mut backend_key = None;
    loop {
        let message = read_message(&mut stream, MAX_UPSTREAM_FRAME).await?;
        match message.tag {
            b'R' => {
                let code = message
                    .body
                    .get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(WireError::Malformed("short authentication message"))?;
                let data = &message.body[4..];
                match code {
                    0 => {}
                    3 => {
                        let password = login.password.ok_or(UpstreamError::NoPassword)?;
                        send(&mut stream, b'p', &nul_terminated(password.as_bytes())).await?;
                    }
                    5 => {
                        let password = login.password.ok_or(UpstreamError::NoPassword)?;
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(WireError::Malformed("md5 salt"))?;
                        let hash = md5_hash(login.user.as_bytes(), password.as_bytes(), salt);
                        send(&mut stream, b'p', &nul_terminated(hash.as_bytes())).await?;
                    }
                    10 => {
                        let password = login.password.ok_or(UpstreamError::NoPassword)?;
                        let offers_scram = data
                            .split(|b| *b == 0)
                            .any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(UpstreamError::UnsupportedAuth(code));
                        }
                        let exchange =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        let mut body = nul_terminated(SCRAM_SHA_256.as_bytes());
                        body.extend_from_slice(&(exchange.message().len() as i32).to_be_bytes());
                        body.extend_from_slice(exchange.message());
                        send(&mut stream, b'p', &body).await?;
                        scram = Some(exchange);
                    }
                    11 => {
                        let exchange = scram
                            .as_mut()
                            .ok_or(WireError::Malformed("SASL continue without start"))?;
                        exchange
                            .update(data)
                            .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                        let reply = exchange.message().to_vec();
                        send(&mut stream, b'p', &reply).await?;
                    }
                    12 => {
                        let exchange = scram
                            .as_mut()
                            .ok_or(WireError::Malformed("SASL final without start"))?;
                        exchange
                            .finish(data)
                            .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                    }
                    other => return Err(UpstreamError::UnsupportedAuth(other)),
                }
            }
            b'S' => statuses.push(message),
            b'K' => {
                let b = &message.body;
                if b.len() >= 8 {
                    backend_key = Some((
                        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                    ));
                }
            }
            b'Z' => {
                return Ok(Upstream {
                    stream,
                    parameters: statuses,
                    backend_key,
                })
            }
            b'E' => return Err(UpstreamError::Refused(error_text(&message.body))),
            b'N' => {}
            _ => {
                return Err(
                    WireError::Malformed("unexpected message during upstream startup").into(),
                )
            }
        }
    }
}

/// Which pure built-ins' names the session's schema overloads. PostgreSQL resolves an
/// unqualified call against `pg_catalog` and the session's `search_path` together, and an
/// overload whose argument types match better wins: `bit_length(1)` runs
/// `public.bit_length(integer)` when one exists, whatever the built-in does. Asked once per
/// session, before the client's first message; any doubt fails the login.
pub async fn overloaded_builtins(
    stream: &mut TcpStream,
    schema: &str,
) -> Result<HashSet<String>, UpstreamError> {
    // standard_conforming_strings is pinned on: doubling quotes is the whole escape.
    let query = format!(
        "SELECT DISTINCT proname FROM pg_catalog.pg_proc WHERE pronamespace = \
         (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = '{}')",
        schema.replace('\'', "''")
    );
    send(stream, b'Q', &nul_terminated(query.as_bytes())).await?;
    let mut overloaded = HashSet::new();
    let mut failure = None;
    loop {
        let message = read_message(stream, MAX_UPSTREAM_FRAME).await?;
        match message.tag {
            b'D' => {
                let name = data_row_text(&message.body)
                    .ok_or(WireError::Malformed("function name row"))?;
                if super::classify::is_pure_builtin(name) {
                    overloaded.insert(name.to_owned());
                }
            }
            b'T' | b'C' | b'N' | b'S' => {}
            b'E' => failure = Some(error_text(&message.body)),
            b'Z' => break,
            _ => return Err(WireError::Malformed("unexpected reply to the catalog query").into()),
        }
    }
    match failure {
        Some(reason) => Err(UpstreamError::Refused(reason)),
        None => Ok(overloaded),
    }
}

/// The text of a one-column DataRow's value.
fn data_row_text(body: &[u8]) -> Option<&str> {
    let columns = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if columns != 1 {
        return None;
    }
    let length = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let length = usize::try_from(length).ok()?;
    let value = body.get(6..6usize.checked_add(length)?)?;
    std::str::from_utf8(value).ok()
}

/// Sends a CancelRequest for the real backend on a fresh connection.
pub async fn cancel(addr: &str, pid: i32, secret: i32) -> Result<(), WireError> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&super::wire::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    stream.write_all(&packet).await?;
    Ok(())
}

async fn send(stream: &mut TcpStream, tag: u8, body: &[u8]) -> Result<(), WireError> {
    stream.write_all(&encode(tag, body)).await?;
    Ok(())
}

fn nul_terminated(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.push(0);
    out
}

/// The `M` (message) field of an ErrorResponse body.
pub fn error_text(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find(|field| field.first() == Some(&b'M'))
        .map(|field| String::from_utf8_lossy(&field[1..]).into_owned())
        .unwrap_or_else(|| "error".into())
}

#[cfg(test)]
mod tests {
    use super::data_row_text;

    #[test]
    fn a_data_row_is_read_only_when_it_is_well_formed() {
        let mut row = 1i16.to_be_bytes().to_vec();
        row.extend_from_slice(&5i32.to_be_bytes());
        row.extend_from_slice(b"lower");
        assert_eq!(data_row_text(&row), Some("lower"));
        assert_eq!(data_row_text(&row[..row.len() - 1]), None);
        let mut null = 1i16.to_be_bytes().to_vec();
        null.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row_text(&null), None);
        let mut huge = 1i16.to_be_bytes().to_vec();
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(data_row_text(&huge), None);
        assert_eq!(data_row_text(&[0, 2]), None);
    }
}
