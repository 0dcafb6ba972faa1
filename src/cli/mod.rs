//! The command groups of `capgate`, one file each; `main.rs` parses and dispatches.

pub mod audit;
pub mod common;
pub mod keys;
pub mod operator;
pub mod policy;
pub mod proxy;
pub mod serve;
pub mod token;
