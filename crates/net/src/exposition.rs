//! `/metrics` over HTTP: the broker's route and an adapter's own small server, both answering
//! with the core's OpenMetrics rendering.

use std::fmt::Write as _;

use capgate_core::metrics::{render, Sources, CONTENT_TYPE};

/// A small `/metrics` server for an adapter process, on its own address so that agents, who
/// reach the proxy's listener, never see it and no upstream route is shadowed.
pub async fn serve_adapter_metrics(
    listener: tokio::net::TcpListener,
    sources: Sources,
) -> std::io::Result<()> {
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let sources = sources.clone();
                async move { response(sources) }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "only /metrics is served here\n",
            )
        });
    axum::serve(listener, router).await
}

/// The exposition as an HTTP response (500 only if encoding itself failed).
pub fn response(sources: Sources) -> axum::response::Response {
    use axum::response::IntoResponse;
    match render(sources) {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => {
            let mut body = String::new();
            let _ = writeln!(body, "metrics could not be encoded");
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
        }
    }
}
