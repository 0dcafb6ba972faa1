//! What every Capgate server shares on the network side: the accept loop with its timeouts
//! and connection cap, and `/metrics` over HTTP.

pub mod connections;
pub mod exposition;
