//! Connection-flood resistance shared by the broker and both proxies: the limits operators
//! configure (`[connections]`), and the tracker that keeps the number of open client
//! connections under a cap by shedding the longest-idle one when a new client arrives.
//!
//! Why shed rather than refuse: a flood of idle sockets would otherwise take every slot and an
//! operator's `capgate revoke` (or an adapter's revocation poll) could not get in. Shedding the
//! connection that has been silent longest costs an attacker a slot per new connection while a
//! client that is actually talking keeps its own.

pub mod http;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Notify;

/// File descriptors kept back from the connection cap by default: logs, the store, the
/// listener, key files, upstream pools, and an operator's own connection.
pub const DEFAULT_RESERVED_FDS: u64 = 128;
/// Cap used when the file limit cannot be read (or is unlimited).
const FALLBACK_MAX_CONNECTIONS: usize = 4096;

/// `[connections]` in the broker's and the proxies' configuration files.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// HTTP: a request's headers must arrive within this time of its first byte.
    #[serde(
        default = "defaults::header_read",
        deserialize_with = "capgate_core::settings::duration"
    )]
    pub header_read_timeout: Duration,
    /// HTTP: a request's whole body must arrive within this time of its headers.
    #[serde(
        default = "defaults::body_read",
        deserialize_with = "capgate_core::settings::duration"
    )]
    pub body_read_timeout: Duration,
    /// A connection with no request in flight and no bytes either way for this long is
    /// closed (HTTP keep-alive; the PostgreSQL proxy's sessions between statements).
    #[serde(
        default = "defaults::idle",
        deserialize_with = "capgate_core::settings::duration"
    )]
    pub idle_timeout: Duration,
    /// PostgreSQL: the client must finish startup and login within this time of connecting.
    #[serde(
        default = "defaults::startup",
        deserialize_with = "capgate_core::settings::duration"
    )]
    pub startup_timeout: Duration,
    /// PostgreSQL: a logged-in session with nothing in flight that sends nothing for this
    /// long is ended (SQLSTATE 57P05), as PostgreSQL's `idle_session_timeout`. Unset: never,
    /// as PostgreSQL's default (pooled clients hold sessions open on purpose).
    #[serde(default, deserialize_with = "optional_duration")]
    pub session_idle_timeout: Option<Duration>,
    /// Most client connections open at once. Unset: derived from the process's file limit
    /// (`RLIMIT_NOFILE` minus `reserved_fds`, halved for proxies, which hold an upstream
    /// connection per client).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// File descriptors kept back from the derived cap.
    #[serde(default = "defaults::reserved_fds")]
    pub reserved_fds: u64,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    capgate_core::settings::duration(d).map(Some)
}

mod defaults {
    use std::time::Duration;
    pub fn header_read() -> Duration {
        Duration::from_secs(10)
    }
    pub fn body_read() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle() -> Duration {
        Duration::from_secs(60)
    }
    pub fn startup() -> Duration {
        Duration::from_secs(10)
    }
    pub fn reserved_fds() -> u64 {
        super::DEFAULT_RESERVED_FDS
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: defaults::header_read(),
            body_read_timeout: defaults::body_read(),
            idle_timeout: defaults::idle(),
            startup_timeout: defaults::startup(),
            session_idle_timeout: None,
            max_connections: None,
            reserved_fds: defaults::reserved_fds(),
        }
    }
}

impl ConnectionLimits {
    /// The cap in force: the configured one, or what the file limit leaves after the reserve,
    /// divided among the descriptors each client connection costs (1 for the broker, 2 for a
    /// proxy with its upstream connection). Never below 1.
    pub fn cap(&self, fds_per_connection: u64) -> usize {
        if let Some(max) = self.max_connections {
            return max.max(1);
        }
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        match soft {
            Some(limit) => {
                let per = fds_per_connection.max(1);
                let usable = limit.saturating_sub(self.reserved_fds) / per;
                usize::try_from(usable).unwrap_or(usize::MAX).max(1)
            }
            None => FALLBACK_MAX_CONNECTIONS,
        }
    }
}

/// What a connection's task shares with the tracker: when it last moved bytes, whether a
/// request is in flight, whether it is past its startup phase, and how to tell it to go.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
    established: AtomicBool,
    shed: Notify,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        let activity = Activity {
            epoch,
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            established: AtomicBool::new(false),
            shed: Notify::new(),
        };
        activity.touch();
        activity
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes moved: the connection is not idle.
    pub fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }

    /// Idle and with nothing in flight: closing it loses no answer.
    pub fn is_quiet(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
    }

    /// Past startup (a PostgreSQL session that logged in): shed only after every connection
    /// still in startup.
    pub fn establish(&self) {
        self.established.store(true, Ordering::Relaxed);
    }

    /// A request is in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    /// Completes when the tracker has shed this connection to make room for a new one.
    pub async fn shed(&self) {
        self.shed.notified().await;
    }
}

/// One request in flight on a connection.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The open connections of one listener, under one cap.
#[derive(Debug)]
pub struct Tracker {
    cap: usize,
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// A connection's place in the tracker; dropping it frees the slot.
#[derive(Debug)]
pub struct Admission {
    id: u64,
    pub activity: Arc<Activity>,
    tracker: Arc<Tracker>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut open) = self.tracker.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl Tracker {
    pub fn new(cap: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            cap: cap.max(1),
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn open(&self) -> usize {
        self.open.lock().map(|open| open.len()).unwrap_or(0)
    }

    /// Admits a new connection. At the cap, the quiet connection idle longest (those still in
    /// startup first) is told to close and its slot goes to the newcomer; with no quiet
    /// connection to shed, the newcomer is refused (`None`): every slot is doing work.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let mut open = self.open.lock().ok()?;
        if open.len() >= self.cap {
            let victim = open
                .iter()
                .filter(|(_, a)| a.is_quiet())
                .min_by_key(|(_, a)| {
                    (
                        a.established.load(Ordering::Relaxed),
                        a.last_ms.load(Ordering::Relaxed),
                    )
                })
                .map(|(id, _)| *id)?;
            if let Some(shed) = open.remove(&victim) {
                tracing::debug!(idle = ?shed.idle_for(), "connection cap reached: shedding the longest-idle connection");
                shed.shed.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        open.insert(id, activity.clone());
        Some(Admission {
            id,
            activity,
            tracker: self.clone(),
        })
    }
}

/// Sleeps after an accept error so that a listener out of descriptors (EMFILE, ENFILE) backs
/// off instead of spinning; errors about one connection (reset before accept) do not wait.
pub async fn accept_backoff(error: &std::io::Error, failures: &mut u32) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    *failures = failures.saturating_add(1);
    let exponent = (*failures).min(7);
    let wait =
        Duration::from_millis(10u64.saturating_mul(1u64 << exponent)).min(Duration::from_secs(1));
    if *failures == 1 || failures.is_power_of_two() {
        tracing::error!(error = %error, failures = *failures, ?wait, "accept failed; backing off");
    }
    tokio::time::sleep(wait).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_quiet_connection_is_shed() {
        let tracker = Tracker::new(2);
        let first = tracker.admit().expect("first");
        std::thread::sleep(Duration::from_millis(5));
        let second = tracker.admit().expect("second");
        let _busy = second.activity.begin();
        let third = tracker.admit().expect("third sheds the first");
        assert_eq!(tracker.open(), 2);
        // The first was shed: its notification is waiting for it.
        let shed = futures_util::FutureExt::now_or_never(first.activity.shed());
        assert!(shed.is_some(), "the idle connection was not told to close");
        // Both remaining slots are busy or new; a fourth sheds the quiet newcomer, not the
        // one with a request in flight.
        let _fourth = tracker.admit().expect("fourth");
        assert!(futures_util::FutureExt::now_or_never(third.activity.shed()).is_some());
        assert!(futures_util::FutureExt::now_or_never(second.activity.shed()).is_none());
    }

    #[test]
    fn with_every_slot_busy_a_newcomer_is_refused() {
        let tracker = Tracker::new(1);
        let only = tracker.admit().expect("first");
        let _busy = only.activity.begin();
        assert!(tracker.admit().is_none());
    }

    #[test]
    fn connections_in_startup_are_shed_before_established_ones() {
        let tracker = Tracker::new(2);
        let session = tracker.admit().expect("session");
        session.activity.establish();
        std::thread::sleep(Duration::from_millis(5));
        let starting = tracker.admit().expect("starting");
        let _new = tracker.admit().expect("new");
        assert!(futures_util::FutureExt::now_or_never(starting.activity.shed()).is_some());
        assert!(futures_util::FutureExt::now_or_never(session.activity.shed()).is_none());
    }

    #[test]
    fn the_cap_leaves_the_reserve_and_counts_upstream_descriptors() {
        let limits = ConnectionLimits {
            max_connections: Some(7),
            ..ConnectionLimits::default()
        };
        assert_eq!(limits.cap(2), 7);
        let derived = ConnectionLimits::default();
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        if let Some(soft) = soft {
            let expected = usize::try_from(soft.saturating_sub(DEFAULT_RESERVED_FDS) / 2)
                .unwrap_or(usize::MAX)
                .max(1);
            assert_eq!(derived.cap(2), expected);
        }
    }
}
