//! Capgate: a capability-token permission broker for autonomous agents.
//!
//! Agents never hold standing credentials. They ask the [`broker`] for a short-lived,
//! attenuable Biscuit [`token`] naming exactly which resources they may touch with which verbs;
//! adapters in front of real infrastructure ask the [`guard`] about every call.
//! See `ARCHITECTURE.md` for the code map and the invariants.

pub mod adapters;
pub mod broker;
pub mod client;
pub mod config;
pub mod connections;
pub mod containment;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod operation;
pub mod policy;
pub mod revocation;
pub mod scope;
pub mod store;
pub mod token;

#[cfg(test)]
mod testing;
