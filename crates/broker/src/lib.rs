//! The broker: authenticates agents, evaluates grant policies, mints tokens, and keeps the
//! state every adapter follows (revocations, freeze, approvals, counters, audit) in a store.

pub mod config;
pub mod identity;
pub mod server;
pub mod store;
