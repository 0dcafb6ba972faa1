//! What an agent does at startup: prove who it is, ask for exactly the scopes it needs, and
//! keep the short-lived token fresh while it runs. No standing credential is ever held.
//!
//! ```sh
//! cargo run -- serve &                      # the broker, with ./capgate.toml
//! CAPGATE_CREDENTIAL=cgk_ef3d9d5f0792cebce732585f5521f2be \
//!   cargo run --example agent_startup -- pg://staging/:write http://railway/volumes/:read
//! ```

use std::time::Duration;

use capgate::client::{Client, TokenRefresher};
use capgate::scope::Scope;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::var("CAPGATE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let credential = std::env::var("CAPGATE_CREDENTIAL")
        .map_err(|_| "set CAPGATE_CREDENTIAL to the agent's API key or identity JWT")?;
    let scopes = std::env::args()
        .skip(1)
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()?;
    if scopes.is_empty() {
        return Err("name the scopes you need, e.g. pg://staging/:write".into());
    }

    // A short TTL so the refresh is visible; the refresher renews at two thirds of the lifetime.
    let refresher = TokenRefresher::start(
        Client::new(&broker)?,
        credential,
        scopes,
        Some(Duration::from_secs(30)),
    )
    .await?;
    for _ in 0..3 {
        let current = refresher.current();
        println!(
            "session {} token {}… valid until {}",
            current.session_id,
            &refresher.token()?[..16],
            humantime::format_rfc3339_seconds(current.expires_at)
        );
        tokio::time::sleep(Duration::from_secs(21)).await;
    }
    Ok(())
}
