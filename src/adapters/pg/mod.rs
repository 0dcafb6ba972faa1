//! The PostgreSQL adapter: statement classification with PostgreSQL's own parser.
pub mod classify;
