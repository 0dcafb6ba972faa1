//! An existing axum service protected in-process by the Capgate guard (tower layer).
//! Keys and revocations are synced from the broker in the background; every request is
//! mapped to (resource, verb) and decided locally.
//!
//! ```sh
//! cargo run -- serve &
//! cargo run --example axum_guarded &
//! TOKEN=$(CAPGATE_CREDENTIAL=cgk_3252f20addd8d686f4d01f2896a5df20 cargo run -q -- token request --scope http://railway/volumes/:read)
//! curl -H "Authorization: Bearer $TOKEN" localhost:3000/volumes/vol_1    # 200
//! curl -X DELETE -H "Authorization: Bearer $TOKEN" localhost:3000/volumes/vol_1   # 403
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::{Extension, Router};
use capgate::adapters::sync::{empty_keys, spawn, SyncConfig};
use capgate::adapters::tower::{GuardLayer, GuardedRequest};
use capgate::config::RunLimits;
use capgate::guard::{ContainmentView, Guard, GuardConfig, Request};
use capgate::policy::PolicySet;
use capgate::revocation::RevocationView;
use capgate::scope::Verb;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::var("CAPGATE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let keys = empty_keys();
    let revocations = Arc::new(RevocationView::new());
    let containment = Arc::new(ContainmentView::new());
    let _sync = spawn(
        SyncConfig::new(&broker),
        revocations.clone(),
        keys.clone(),
        containment.clone(),
    )?;
    let guard = Arc::new(
        Guard::new(
            GuardConfig {
                adapter: "volumes-app".into(),
                max_token_bytes: 16 * 1024,
                max_staleness: Duration::from_secs(5),
                limits: RunLimits::default(),
                cache_capacity: 10_000,
            },
            keys,
            revocations,
            PolicySet::load_dir(std::path::Path::new("policies/adapters"))?,
        )
        .with_containment(containment),
    );
    // The mapper decides what each request means; anything it cannot map is denied.
    let mapper = |parts: &axum::http::request::Parts| {
        let id = parts.uri.path().strip_prefix("/volumes/")?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let verb = match parts.method.as_str() {
            "GET" => Verb::Read,
            "DELETE" => Verb::Delete,
            _ => return None,
        };
        Some(Request {
            resource: format!("http://railway/volumes/{id}"),
            verb,
            environment: "prod".into(),
            attributes: vec![],
        })
    };
    let app = Router::new()
        .route(
            "/volumes/{id}",
            get(|Path(id): Path<String>, Extension(decision): Extension<GuardedRequest>| async move {
                format!("volume {id} (decision {})\n", decision.decision_id)
            })
            .delete(|Path(id): Path<String>| async move { format!("deleted {id}\n") }),
        )
        .layer(GuardLayer::new(guard, mapper));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("guarded app on http://127.0.0.1:3000");
    axum::serve(listener, app).await?;
    Ok(())
}
