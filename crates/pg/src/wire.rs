//! PostgreSQL protocol 3.0 framing: read and write messages with length caps and NUL checks,
//! and build the few backend messages the proxy speaks itself.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
pub const PROTOCOL_3_0: i32 = 196_608;
/// Startup packets are small; anything bigger is refused before it is read.
pub const MAX_STARTUP_BYTES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// A typed message: its tag byte and body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// Reads one typed message, refusing frames over `max`.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Message, WireError> {
    let tag = reader.read_u8().await?;
    let len = reader.read_i32().await?;
    let len = usize::try_from(len).map_err(|_| WireError::Malformed("negative length"))?;
    if len < 4 {
        return Err(WireError::Malformed("length below 4"));
    }
    if len - 4 > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut body = vec![0; len - 4];
    reader.read_exact(&mut body).await?;
    Ok(Message { tag, body })
}

/// Frames typed messages out of a byte stream. Reads go through `read_buf`, which is
/// cancel-safe, so a relay may wait on a socket and another event at once without losing a
/// half-read frame; frames are handed out whole (tag, length word and body) so passing one
/// on costs a copy into the outgoing buffer and nothing more.
pub struct Framer {
    buf: BytesMut,
    max: usize,
}

impl Framer {
    pub fn new(max: usize) -> Self {
        Framer {
            buf: BytesMut::with_capacity(16 * 1024),
            max,
        }
    }

    /// The next complete frame already buffered, if any.
    pub fn next_frame(&mut self) -> Result<Option<BytesMut>, WireError> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = usize::try_from(len).map_err(|_| WireError::Malformed("negative length"))?;
        if len < 4 {
            return Err(WireError::Malformed("length below 4"));
        }
        if len - 4 > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(len + 1)))
    }

    /// Reads more bytes; `Ok(0)` is the end of the stream.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        reader.read_buf(&mut self.buf).await
    }

    /// The next frame, reading as much as it takes.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<BytesMut, WireError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(frame);
            }
            if self.fill(reader).await? == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// A whole frame as a [`Message`] (tag and body).
pub fn message_of(frame: &[u8]) -> Message {
    Message {
        tag: frame.first().copied().unwrap_or(0),
        body: frame.get(5..).unwrap_or_default().to_vec(),
    }
}

/// Reads the untyped startup-phase packet: (code, body).
pub async fn read_startup<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<(i32, Vec<u8>), WireError> {
    let len = reader.read_i32().await?;
    let len = usize::try_from(len).map_err(|_| WireError::Malformed("negative length"))?;
    if !(8..=MAX_STARTUP_BYTES).contains(&len) {
        return Err(WireError::TooLarge {
            len,
            max: MAX_STARTUP_BYTES,
        });
    }
    let code = reader.read_i32().await?;
    let mut body = vec![0; len - 8];
    reader.read_exact(&mut body).await?;
    Ok((code, body))
}

pub fn encode(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> Result<(), WireError> {
    writer
        .write_all(&encode(message.tag, &message.body))
        .await?;
    Ok(())
}

/// `key\0value\0…\0` startup parameters; every string must be NUL-terminated.
pub fn parse_parameters(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut strings = Vec::new();
    let mut rest = body;
    while let Some(end) = rest.iter().position(|b| *b == 0) {
        if end == 0 {
            break; // the terminating empty string
        }
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| WireError::Malformed("parameter is not UTF-8"))?;
        strings.push(s.to_owned());
        rest = &rest[end + 1..];
    }
    if rest.first() != Some(&0) || strings.len() % 2 != 0 {
        return Err(WireError::Malformed(
            "startup parameters are not NUL-terminated pairs",
        ));
    }
    Ok(strings
        .chunks(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .collect())
}

pub fn startup_packet(code: i32, parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(code);
    for (key, value) in parameters {
        body.put_slice(key.as_bytes());
        body.put_u8(0);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The first NUL-terminated string of a body (a Query's SQL, a Parse's statement name…).
pub fn cstr(body: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let end = body
        .iter()
        .position(|b| *b == 0)
        .ok_or(WireError::Malformed("string is not NUL-terminated"))?;
    let s = std::str::from_utf8(&body[..end])
        .map_err(|_| WireError::Malformed("string is not UTF-8"))?;
    Ok((s, &body[end + 1..]))
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(sqlstate: &str, message: &str) -> Message {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    Message { tag: b'E', body }
}

pub fn ready_for_query(status: u8) -> Message {
    Message {
        tag: b'Z',
        body: vec![status],
    }
}

pub fn authentication(code: i32) -> Message {
    Message {
        tag: b'R',
        body: code.to_be_bytes().to_vec(),
    }
}

pub fn backend_key(pid: i32, secret: i32) -> Message {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend_from_slice(&secret.to_be_bytes());
    Message { tag: b'K', body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_must_be_nul_terminated_pairs() {
        assert_eq!(
            parse_parameters(b"user\0bot\0database\0db\0\0").expect("ok"),
            vec![
                ("user".to_owned(), "bot".to_owned()),
                ("database".to_owned(), "db".to_owned())
            ]
        );
        assert!(parse_parameters(b"user\0bot").is_err());
        assert!(parse_parameters(b"user\0\0").is_err());
        assert!(cstr(b"select 1").is_err());
        assert_eq!(cstr(b"select 1\0rest").expect("ok").0, "select 1");
    }

    #[tokio::test]
    async fn the_framer_hands_out_whole_frames_and_refuses_bad_lengths() {
        let mut stream: &[u8] = b"Q\0\0\0\x0dselect 1\0S\0\0\0\x04";
        let mut framer = Framer::new(1024);
        let first = framer.read(&mut stream).await.expect("frame");
        assert_eq!(message_of(&first).body, b"select 1\0");
        assert_eq!(framer.read(&mut stream).await.expect("frame")[0], b'S');
        assert!(matches!(
            framer.read(&mut stream).await,
            Err(WireError::Io(_))
        ));
        let mut big: &[u8] = &[b'Q', 0, 0, 8, 0];
        assert!(matches!(
            Framer::new(1024).read(&mut big).await,
            Err(WireError::TooLarge { .. })
        ));
        let mut short: &[u8] = &[b'Q', 0, 0, 0, 3];
        assert!(matches!(
            Framer::new(1024).read(&mut short).await,
            Err(WireError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn oversize_and_short_frames_are_refused() {
        let mut big: &[u8] = &[b'Q', 0x7f, 0, 0, 0];
        assert!(matches!(
            read_message(&mut big, 1 << 20).await,
            Err(WireError::TooLarge { .. })
        ));
        let mut short: &[u8] = &[b'Q', 0, 0, 0, 3];
        assert!(matches!(
            read_message(&mut short, 1 << 20).await,
            Err(WireError::Malformed(_))
        ));
        let mut negative: &[u8] = &[b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_message(&mut negative, 1 << 20).await,
            Err(WireError::Malformed(_))
        ));
    }
}
