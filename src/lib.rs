//! Capgate: a capability-token permission broker for autonomous agents.
//!
//! Agents never hold standing credentials. They ask the [`broker`] for a short-lived,
//! attenuable Biscuit [`token`] naming exactly which resources they may touch with which verbs;
//! adapters in front of real infrastructure ask the [`guard`] about every call.
//!
//! This crate is the CLI and one name for the workspace's members, for examples, tests and
//! in-process users (the tower layer). See `ARCHITECTURE.md` for the code map.

pub use capgate_broker::server as broker;
pub use capgate_broker::{config, store};
pub use capgate_client as client;
pub use capgate_core::{
    containment, guard, operation, policy, revocation, scope, settings, token, wire,
};
pub use capgate_net::connections;

/// Who an agent is (core) and how the broker authenticates it (broker).
pub mod identity {
    pub use capgate_broker::identity::*;
}

/// Decision and server metrics (core) and their HTTP exposition (net).
pub mod metrics {
    pub use capgate_core::metrics::*;
    pub use capgate_net::exposition::*;
}

/// The adapters; the PostgreSQL one only when built with `--features pg`.
pub mod adapters {
    pub use capgate_adapters::*;
    #[cfg(feature = "pg")]
    pub use capgate_pg as pg;
}
