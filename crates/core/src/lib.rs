//! Capgate's core: every decision and nothing else. Scopes, tokens (mint, attenuate, verify),
//! policies, the guard and its views, containment rules, the audit chain, replay, and the wire
//! types the broker and its clients share.
//!
//! No I/O beyond reading policy files, and no async runtime: the guard's ledger is a trait the
//! adapters implement. Only this crate can build an [`guard::Authorized`] or a
//! [`token::VerifiedToken`]; see `ARCHITECTURE.md` for the invariants that rest on it.

pub mod containment;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod operation;
pub mod policy;
pub mod revocation;
pub mod scope;
pub mod settings;
pub mod token;
pub mod wire;
