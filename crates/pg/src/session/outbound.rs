//! The session's write half towards the server. It sends only two kinds of bytes: the
//! client's messages as the guard authorised them (an `Authorized` wraps them, and only the
//! guard makes one) and the proxy's own control messages, which this module encodes itself
//! from a closed list. No other byte of the client's can reach the server, whatever the code
//! around it does.

use bytes::BytesMut;
use capgate_core::guard::Authorized;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::super::wire;

/// Messages the proxy sends on its own account.
pub(super) enum Control {
    /// Ends an extended-protocol sequence: the client's own Sync while copying in (which the
    /// server ignores), or the Sync owed for a batch that was refused.
    Sync,
    /// The client's Flush while copying in (the server ignores it too).
    Flush,
    /// The client's goodbye.
    Terminate,
    /// A statement of the proxy's own (a row budget's transaction, a rollback after an
    /// audit record could not be stored).
    Statement(OwnStatement),
    /// COPY data, done or fail from the client: the data of a COPY the guard authorised, or,
    /// outside copy-in mode, messages the server ignores.
    Copy(CopyMessage),
}

/// The statements the proxy runs itself, and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OwnStatement {
    Begin,
    Commit,
    Rollback,
    Savepoint,
    ReleaseSavepoint,
    RollbackToSavepoint,
}

impl OwnStatement {
    fn sql(self) -> &'static str {
        match self {
            OwnStatement::Begin => "BEGIN",
            OwnStatement::Commit => "COMMIT",
            OwnStatement::Rollback => "ROLLBACK",
            OwnStatement::Savepoint => "SAVEPOINT capgate_row_budget",
            OwnStatement::ReleaseSavepoint => "RELEASE SAVEPOINT capgate_row_budget",
            OwnStatement::RollbackToSavepoint => "ROLLBACK TO SAVEPOINT capgate_row_budget",
        }
    }
}

/// A client frame that is CopyData, CopyDone or CopyFail, and nothing else.
pub(super) struct CopyMessage(BytesMut);

impl CopyMessage {
    pub(super) fn new(frame: BytesMut) -> Option<Self> {
        matches!(frame.first(), Some(b'd' | b'c' | b'f')).then_some(CopyMessage(frame))
    }
}

/// Bytes on their way upstream; made only from an `Authorized` or a [`Control`].
pub(super) struct Outgoing<'a>(Bytes<'a>);

enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Frame(BytesMut),
}

impl<'a, B: AsRef<[u8]>> From<&'a Authorized<B>> for Outgoing<'a> {
    fn from(authorized: &'a Authorized<B>) -> Self {
        Outgoing(Bytes::Borrowed(authorized.get().as_ref()))
    }
}

impl From<Control> for Outgoing<'static> {
    fn from(control: Control) -> Self {
        Outgoing(match control {
            Control::Sync => Bytes::Owned(wire::encode(b'S', &[])),
            Control::Flush => Bytes::Owned(wire::encode(b'H', &[])),
            Control::Terminate => Bytes::Owned(wire::encode(b'X', &[])),
            Control::Statement(statement) => {
                let mut body = statement.sql().as_bytes().to_vec();
                body.push(0);
                Bytes::Owned(wire::encode(b'Q', &body))
            }
            Control::Copy(CopyMessage(frame)) => Bytes::Frame(frame),
        })
    }
}

/// The write half itself.
pub(super) struct Upstream<W> {
    write: W,
}

impl<W: AsyncWrite + Unpin> Upstream<W> {
    pub(super) fn new(write: W) -> Self {
        Upstream { write }
    }

    pub(super) async fn send(&mut self, outgoing: impl Into<Outgoing<'_>>) -> std::io::Result<()> {
        match &outgoing.into().0 {
            Bytes::Borrowed(bytes) => self.write.write_all(bytes).await,
            Bytes::Owned(bytes) => self.write.write_all(bytes).await,
            Bytes::Frame(frame) => self.write.write_all(frame).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_messages_are_only_copy_messages() {
        for tag in [b'd', b'c', b'f'] {
            assert!(CopyMessage::new(BytesMut::from(&[tag, 0, 0, 0, 4][..])).is_some());
        }
        for tag in [b'Q', b'P', b'E', b'S', b'X'] {
            assert!(
                CopyMessage::new(BytesMut::from(&[tag, 0, 0, 0, 4][..])).is_none(),
                "{}",
                tag as char
            );
        }
        assert!(CopyMessage::new(BytesMut::new()).is_none());
    }

    #[tokio::test]
    async fn control_messages_are_encoded_by_the_proxy() {
        let mut upstream = Upstream::new(Vec::new());
        upstream.send(Control::Sync).await.expect("write");
        upstream
            .send(Control::Statement(OwnStatement::Rollback))
            .await
            .expect("write");
        assert_eq!(&upstream.write[..5], b"S\0\0\0\x04");
        assert_eq!(&upstream.write[5..], b"Q\0\0\0\x0dROLLBACK\0");
    }
}
