//! The HTTP proxy against the same upstream called directly, on loopback: latency p50/p99
//! (sequential requests) and throughput (concurrent keep-alive clients), printed as ratios.
//! Goals: p50 added <= 0.3 ms, throughput >= 80% of direct.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use capgate::adapters::http::routes::RouteConfig;
use capgate::adapters::http::{Proxy, ProxyConfig, UpstreamConfig};
use capgate::adapters::Mode;
use capgate::config::RunLimits;
use capgate::guard::{ContainmentView, Ledger};
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::token::{encode, mint, random_id, GrantedRight, Keyring, TokenSpec};
use capgate_test_support::NoBroker;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

async fn get(client: &HttpClient, url: &str, token: &str) {
    let request = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .expect("request");
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
}

async fn latencies(client: &HttpClient, url: &str, token: &str, n: usize) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        get(client, url, token).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

async fn throughput(
    client: &HttpClient,
    url: &str,
    token: &str,
    concurrency: usize,
    window: Duration,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, token, done) = (
            client.clone(),
            url.to_owned(),
            token.to_owned(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                get(&client, &url, &token).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
}

/// A TCP relay that checks nothing: what one more hop costs on this machine, and so the
/// ceiling for any proxy's throughput here.
async fn relay(upstream: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keyring, _) = Keyring::open_or_create(dir.path()).expect("keys");
    let now = SystemTime::now();
    let token = encode(
        &mint(
            &TokenSpec {
                row_budget: None,
                use_budget: None,
                agent: "bench".into(),
                session_id: random_id(),
                rights: vec![GrantedRight {
                    resource: "http://railway/volumes/".parse().expect("r"),
                    verb: Verb::Read,
                    environment: "prod".into(),
                }],
                issued_at: now,
                expires_at: now + Duration::from_secs(3600),
            },
            keyring.active_key_id(),
            keyring.signing_key(),
        )
        .expect("mint"),
    )
    .expect("encode");

    let upstream = serve(axum::Router::new().fallback(|| async { "ok" })).await;
    // A more realistic upstream: 1 ms of service time per request.
    let slow_upstream = serve(axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        "ok"
    }))
    .await;
    let credential = dir.path().join("credential");
    std::fs::write(&credential, "upstream-secret").expect("credential");
    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        broker: "http://127.0.0.1:1".into(),
        environment: "prod".into(),
        name: "bench".into(),
        mode: Mode::Enforce,
        adapter_policies: Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/adapters"),
        max_staleness: Duration::from_secs(7200),
        max_token_bytes: 16 * 1024,
        datalog: RunLimits::default(),
        adapter_key_env: None,
        audit_spool: dir.path().join("spool.jsonl"),
        metrics_listen: None,
        connections: Default::default(),
        upstream: UpstreamConfig {
            url: format!("http://{upstream}"),
            credential_header: "authorization".into(),
            credential_prefix: "Bearer ".into(),
            credential_env: None,
            credential_file: Some(credential),
            forward_headers: Vec::new(),
            routing_headers: Default::default(),
        },
        routes: vec![RouteConfig {
            method: "GET".into(),
            path: "/v2/volumes/{id}".into(),
            resource: "http://railway/volumes/{id}".into(),
            verb: Verb::Read,
            mode: None,
        }],
        graphql: vec![],
    };
    let view = Arc::new(RevocationView::new());
    view.apply(&[], Instant::now() + Duration::from_secs(3600));
    let keys = Arc::new(RwLock::new(Arc::new(
        keyring.public_keys().expect("public"),
    )));
    let mut slow_config = config.clone();
    slow_config.upstream.url = format!("http://{slow_upstream}");
    let containment = Arc::new(ContainmentView::new());
    let ledger: Arc<dyn Ledger> = Arc::new(NoBroker);
    let proxy = Arc::new(
        Proxy::new(
            config,
            keys.clone(),
            view.clone(),
            containment.clone(),
            ledger.clone(),
        )
        .expect("proxy"),
    );
    let proxied = serve(proxy.router()).await;
    let slow_proxy =
        Arc::new(Proxy::new(slow_config, keys, view, containment, ledger).expect("proxy"));
    let slow_proxied = serve(slow_proxy.router()).await;

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let direct_url = format!("http://{upstream}/v2/volumes/vol_1");
    let proxy_url = format!("http://{proxied}/v2/volumes/vol_1");
    latencies(&client, &direct_url, &token, 500).await;
    latencies(&client, &proxy_url, &token, 500).await;
    let (d50, d99) = latencies(&client, &direct_url, &token, 5000).await;
    let (p50, p99) = latencies(&client, &proxy_url, &token, 5000).await;
    let window = Duration::from_secs(3);
    let direct_rps = throughput(&client, &direct_url, &token, 16, window).await;
    let proxy_rps = throughput(&client, &proxy_url, &token, 16, window).await;
    let relayed = relay(upstream).await;
    let relay_url = format!("http://{relayed}/v2/volumes/vol_1");
    let relay_rps = throughput(&client, &relay_url, &token, 16, window).await;
    let slow_direct_rps = throughput(
        &client,
        &format!("http://{slow_upstream}/v2/volumes/vol_1"),
        &token,
        16,
        window,
    )
    .await;
    let slow_proxy_rps = throughput(
        &client,
        &format!("http://{slow_proxied}/v2/volumes/vol_1"),
        &token,
        16,
        window,
    )
    .await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "latency direct: p50 {:.3} ms  p99 {:.3} ms",
        ms(d50),
        ms(d99)
    );
    println!(
        "latency proxy:  p50 {:.3} ms  p99 {:.3} ms",
        ms(p50),
        ms(p99)
    );
    println!(
        "p50 added by the proxy: {:.3} ms (goal <= 0.3 ms), p50 ratio {:.2}x, p99 ratio {:.2}x",
        ms(p50) - ms(d50),
        ms(p50) / ms(d50),
        ms(p99) / ms(d99)
    );
    println!("throughput, no-op upstream: direct {:.0} req/s, proxy {:.0} req/s: {:.0}% of direct (goal >= 80%)", direct_rps, proxy_rps, 100.0 * proxy_rps / direct_rps);
    println!("  a byte relay checking nothing: {:.0} req/s, {:.0}% of direct (the ceiling here); the proxy does {:.0}% of it", relay_rps, 100.0 * relay_rps / direct_rps, 100.0 * proxy_rps / relay_rps);
    println!("throughput, 1 ms upstream:  direct {:.0} req/s, proxy {:.0} req/s: {:.0}% of direct (goal >= 80%)", slow_direct_rps, slow_proxy_rps, 100.0 * slow_proxy_rps / slow_direct_rps);
    println!(
        "(the load generator, proxy and upstream share {} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
}
