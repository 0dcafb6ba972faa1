//! Keeps an adapter's local views fresh: the revocation set (long-polling the broker's feed,
//! so a revocation arrives within milliseconds) and the published root keys. Runs in the
//! background; the request path only reads the views. When the broker cannot be reached the
//! views simply age, and the guard denies once they are older than their bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capgate_client::Client;
use capgate_core::guard::{ContainmentView, KeyView};
use capgate_core::revocation::RevocationView;
use capgate_core::token::PublicKeySet;

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub broker: String,
    /// Long-poll wait per feed request; keep it well under the staleness bound, since the view
    /// counts as fresh only from the moment each request was sent.
    pub poll_wait: Duration,
    pub key_refresh: Duration,
}

impl SyncConfig {
    pub fn new(broker: &str) -> Self {
        SyncConfig {
            broker: broker.to_owned(),
            poll_wait: Duration::from_secs(1),
            key_refresh: Duration::from_secs(30),
        }
    }
}

/// Starts both loops; dropping the returned handles does not stop them, aborting does.
pub fn spawn(
    config: SyncConfig,
    revocations: Arc<RevocationView>,
    keys: KeyView,
    containment: Arc<ContainmentView>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, capgate_client::ClientError> {
    let client = Client::new(&config.broker)?;
    let feed_client = client.clone();
    let wait = config.poll_wait;
    let feed_containment = containment.clone();
    let feed = tokio::spawn(async move {
        loop {
            let sent = Instant::now();
            match feed_client
                .revocations_since(revocations.cursor(), wait)
                .await
            {
                Ok(page) => {
                    // The freeze flag first: the view must never look fresh with an old flag.
                    feed_containment.set_frozen(page.frozen);
                    // A reset view asks again at once, from cursor 0.
                    revocations.apply_feed(&page.generation, page.head, &page.revocations, sent);
                }
                Err(capgate_client::ClientError::Refused { code, .. }) if code == "store_lost" => {
                    tracing::error!(
                        "the broker's store was lost; denying everything until it is recovered"
                    );
                    revocations.reset();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed unreachable; the view is ageing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let refresh = config.key_refresh;
    let key_task = tokio::spawn(async move {
        loop {
            match client.containment().await {
                Ok(document) => {
                    if let Err(e) = containment.set_document(document) {
                        tracing::error!(error = %e, "broker published unusable containment settings");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch containment settings; non-read verbs stay denied")
                }
            }
            match client
                .keys()
                .await
                .map(|doc| PublicKeySet::from_document(&doc))
            {
                Ok(Ok(set)) => {
                    if let Ok(mut view) = keys.write() {
                        *view = Arc::new(set);
                    }
                    tokio::time::sleep(refresh).await;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "broker published an unusable key set; keeping the previous one");
                    tokio::time::sleep(refresh).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch root keys; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Ok(vec![feed, key_task])
}

/// An empty key view: every token is an unknown key until the first sync lands.
pub fn empty_keys() -> KeyView {
    Arc::new(std::sync::RwLock::new(Arc::new(PublicKeySet::empty())))
}
