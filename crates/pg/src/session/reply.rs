//! A session's reply order: upstream's answers go to the client in the order its requests
//! were made, the proxy's own replies (a denial, a ReadyForQuery it owes) queued among them,
//! and answers the session asked for itself (a row budget's transaction) taken aside.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::super::names;
use super::super::wire::{self, Message, WireError};
use super::{lock, Shared};

/// What the client is owed next, in the order the client must see it. Replies the proxy makes
/// itself (a denial) wait behind upstream answers to anything forwarded before them, so a
/// pipelining client never reads them out of order.
pub(super) enum Owed {
    /// Upstream's answers up to and including its next ReadyForQuery.
    Upstream,
    /// The same, delivered to the session instead of the client (a row-budget check).
    Intercepted(mpsc::UnboundedSender<Message>),
    /// Bytes the proxy answers itself.
    Local(Vec<u8>),
    /// A ReadyForQuery of the proxy's own, with upstream's transaction status at that point.
    Ready,
}

/// Upstream to client: forwards upstream's answers, interleaving the proxy's own replies in
/// order, and writes whatever is already buffered in one go.
pub(super) async fn deliver(
    mut upstream: impl AsyncRead + Unpin,
    mut client: impl AsyncWrite + Unpin,
    mut owed: mpsc::UnboundedReceiver<Owed>,
    shared: &Shared,
    max: usize,
) -> Result<(), WireError> {
    let mut framer = wire::Framer::new(max);
    let mut queue: VecDeque<Owed> = VecDeque::new();
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut open = true;
    loop {
        while let Ok(entry) = owed.try_recv() {
            queue.push_back(entry);
        }
        pay_local(&mut queue, &mut out, shared);
        while let Some(frame) = framer.next_frame()? {
            route(frame, &mut queue, &mut out, shared);
        }
        if !out.is_empty() {
            client.write_all(&out).await?;
            out.clear();
        }
        if !open && queue.is_empty() {
            return Ok(());
        }
        tokio::select! {
            biased;
            entry = owed.recv(), if open => match entry {
                Some(entry) => queue.push_back(entry),
                None => open = false,
            },
            read = framer.fill(&mut upstream) => {
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// Moves the proxy's own replies at the head of the queue into `out`.
fn pay_local(queue: &mut VecDeque<Owed>, out: &mut Vec<u8>, shared: &Shared) {
    while let Some(Owed::Local(_) | Owed::Ready) = queue.front() {
        match queue.pop_front() {
            Some(Owed::Local(bytes)) => out.extend_from_slice(&bytes),
            Some(Owed::Ready) => {
                let ready = wire::ready_for_query(shared.status.load(Ordering::SeqCst));
                out.extend_from_slice(&wire::encode(ready.tag, &ready.body));
            }
            _ => {}
        }
    }
}

fn route(frame: BytesMut, queue: &mut VecDeque<Owed>, out: &mut Vec<u8>, shared: &Shared) {
    let tag = frame[0];
    match tag {
        b'Z' => {
            let status = frame.get(5).copied().unwrap_or(b'I');
            shared.status.store(status, Ordering::SeqCst);
            shared.copy_in.store(false, Ordering::SeqCst);
            if status == b'I' {
                shared.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
        b'G' => shared.copy_in.store(true, Ordering::SeqCst),
        // The real backend's key must never reach the client.
        b'K' => return,
        _ => {}
    }
    if names::matters(tag) {
        lock(&shared.names).observe(tag);
    }
    match queue.front() {
        Some(Owed::Intercepted(session)) => {
            let _ = session.send(wire::message_of(&frame));
        }
        _ => out.extend_from_slice(&frame),
    }
    if tag == b'Z' && matches!(queue.front(), Some(Owed::Upstream | Owed::Intercepted(_))) {
        queue.pop_front();
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        pay_local(queue, out, shared);
    }
}
