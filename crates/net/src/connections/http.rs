//! The accept loop the broker and the HTTP proxy share: hyper's HTTP/1 server with a header
//! read timeout, a deadline for each request body, an idle keep-alive deadline, the connection
//! cap of [`Tracker`], and back-off on accept errors.
//!
//! Why not `axum::serve`: it builds hyper's connection without a timer (so no header read
//! timeout can be set), has no hook per connection for an idle deadline or a cap, and offers
//! no way to close one connection to make room for another. It does back off on accept
//! errors; this loop keeps that.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;
use tower::ServiceExt;

use super::{accept_backoff, Activity, ConnectionLimits, Tracker};

/// How long in-flight requests get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` under `limits` until `shutdown` completes.
/// `fds_per_connection` is what one client connection costs in descriptors (see
/// [`ConnectionLimits::cap`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    fds_per_connection: u64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let tracker = Tracker::new(limits.cap(fds_per_connection));
    tracing::info!(
        max_connections = tracker.cap(),
        header_read_timeout = ?limits.header_read_timeout,
        body_read_timeout = ?limits.body_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        "connection limits"
    );
    let limits = Arc::new(limits);
    let (stop, stopping) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => {
                failures = 0;
                accepted
            }
            Err(e) => {
                accept_backoff(&e, &mut failures).await;
                continue;
            }
        };
        let Some(admission) = tracker.admit() else {
            // Every slot has a request in flight: refusing the newcomer keeps their answers.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let limits = limits.clone();
        let stopping = stopping.clone();
        tasks.spawn(async move {
            connection(stream, router, &limits, &admission.activity, stopping).await;
            drop(admission);
        });
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the shutdown grace period were closed");
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: &ConnectionLimits,
    activity: &Arc<Activity>,
    mut stopping: watch::Receiver<bool>,
) {
    let body_timeout = limits.body_read_timeout;
    let per_request = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = per_request.begin();
        let request = request.map(|body| Body::new(DeadlineBody::new(body, body_timeout)));
        let router = router.clone();
        async move {
            let response: Result<_, Infallible> = router.oneshot(request).await;
            drop(busy);
            response
        }
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    // Checked at a fraction of the deadline: an idle connection lives at most ~1.25x of it.
    let period = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    let mut idle_check = tokio::time::interval(period);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            () = activity.shed() => return,
            _ = idle_check.tick() => {
                if activity.is_quiet() && activity.idle_for() >= limits.idle_timeout {
                    return;
                }
            }
            changed = stopping.changed() => {
                if changed.is_err() || *stopping.borrow() {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
            }
        }
    }
}

/// The client's socket, noting every byte that moves so the connection's idleness is known.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body was not received within the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
pub struct BodyTimedOut(Duration);

/// Whether `error` (an extractor's rejection, say) was caused by a body read timeout.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A request body that fails once its deadline passes, however slowly its bytes trickle in
/// (a per-frame timeout would let one byte a second keep it alive).
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
