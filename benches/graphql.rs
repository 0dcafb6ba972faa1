//! What the GraphQL adapter adds per request. First the judging path alone (decode, parse and
//! validate against Railway's schema with apollo-compiler, select the operation, expand root
//! fields, map them), with criterion, for Railway CLI documents of different sizes. Then a
//! GraphQL query through the real proxy against the same upstream called directly, on
//! loopback: latency p50/p99 and throughput, printed as ratios (as `benches/proxy.rs` does for
//! a REST route).
//!
//! Needs Railway's schema: `CAPGATE_RAILWAY_DATA` or `../shared/data/railway`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use capgate::adapters::graphql::{Endpoint, GraphqlConfig, Upstream};
use capgate::adapters::http::{Proxy, ProxyConfig, UpstreamConfig};
use capgate::adapters::Mode;
use capgate::config::RunLimits;
use capgate::guard::{ContainmentView, Ledger};
use capgate::revocation::RevocationView;
use capgate::scope::Verb;
use capgate::token::{encode, mint, random_id, GrantedRight, Keyring, TokenSpec};
use capgate_test_support::NoBroker;
use criterion::Criterion;
use http::{HeaderName, HeaderValue, Method};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn data() -> PathBuf {
    std::env::var_os("CAPGATE_RAILWAY_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/railway"))
}

#[derive(serde::Deserialize)]
struct ExampleFile {
    graphql: Vec<GraphqlConfig>,
}

/// Railway's example endpoint. Judging does no I/O, so it keeps every field; the proxy run
/// keeps only fields without an environment lookup, as it measures forwarding, not the
/// provider's lookups.
fn example_config(with_lookups: bool) -> GraphqlConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/railway-graphql.toml")).expect("read");
    let file: ExampleFile = toml::from_str(&text).expect("example");
    let mut config = file.graphql.into_iter().next().expect("endpoint");
    config.schema = data().join("schema.json");
    if !with_lookups {
        config.fields.retain(|f| f.environment.is_none());
    }
    config
}

fn body(query: &str, variables: serde_json::Value) -> Vec<u8> {
    serde_json::json!({"query": query, "variables": variables})
        .to_string()
        .into_bytes()
}

fn judging(c: &mut Criterion) {
    let upstream = Upstream {
        url: "http://127.0.0.1:9/graphql/v2".into(),
        credential: (
            HeaderName::from_static("authorization"),
            HeaderValue::from_static("Bearer unused"),
        ),
        timeout: Duration::from_secs(1),
    };
    let started = Instant::now();
    let endpoint =
        Endpoint::new(&example_config(true), Path::new("."), upstream).expect("endpoint");
    println!(
        "schema load (introspection JSON -> SDL -> validated schema) and config check: {:?}",
        started.elapsed()
    );
    let operations = data().join("operations");
    let read = |name: &str| std::fs::read_to_string(operations.join(name)).expect("document");
    let cases = [
        ("me (1 field)", body("{ me { id } }", serde_json::json!({}))),
        (
            "VolumeDelete (mutation, variable)",
            body(
                &read("VolumeDelete.graphql"),
                serde_json::json!({"id": "vol_1"}),
            ),
        ),
        (
            "Project (CLI, medium)",
            body(&read("Project.graphql"), serde_json::json!({"id": "p"})),
        ),
        (
            "EnvironmentInstances (CLI, largest)",
            body(
                &read("EnvironmentInstances.graphql"),
                serde_json::json!({"environmentId": "e", "projectId": "p"}),
            ),
        ),
    ];
    let mut group = c.benchmark_group("graphql_judge");
    for (name, bytes) in &cases {
        println!("{name}: {} bytes", bytes.len());
        group.bench_function(*name, |b| {
            b.iter(|| {
                let judged = endpoint
                    .judge(
                        &Method::POST,
                        Some("application/json"),
                        None,
                        black_box(bytes),
                    )
                    .expect("judged");
                black_box(judged)
            })
        });
    }
    group.finish();
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

const QUERY: &str = r#"{"query":"query Me { me { id name email } }"}"#;

async fn post(client: &HttpClient, url: &str, token: &str) {
    let request = http::Request::post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(QUERY))
        .expect("request");
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
}

async fn latencies(client: &HttpClient, url: &str, token: &str, n: usize) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        post(client, url, token).await;
        samples.push(start.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

async fn throughput(client: &HttpClient, url: &str, token: &str, window: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, url, token, done) = (
            client.clone(),
            url.to_owned(),
            token.to_owned(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                post(&client, &url, &token).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / window.as_secs_f64()
}

async fn through_the_proxy() {
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
                    resource: "railway://prod/api/".parse().expect("r"),
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
    let upstream = serve(axum::Router::new().fallback(|| async {
        axum::Json(serde_json::json!({"data": {"me": {"id": "u", "name": "n", "email": "e"}}}))
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
        metrics_listen: None,
        connections: Default::default(),
        adapter_key_env: None,
        audit_spool: dir.path().join("spool.jsonl"),
        upstream: UpstreamConfig {
            url: format!("http://{upstream}"),
            credential_header: "authorization".into(),
            credential_prefix: "Bearer ".into(),
            credential_env: None,
            credential_file: Some(credential),
            forward_headers: Vec::new(),
            routing_headers: Default::default(),
        },
        routes: vec![],
        graphql: vec![example_config(false)],
    };
    let view = Arc::new(RevocationView::new());
    view.apply(&[], Instant::now() + Duration::from_secs(3600));
    let keys = Arc::new(RwLock::new(Arc::new(
        keyring.public_keys().expect("public"),
    )));
    let ledger: Arc<dyn Ledger> = Arc::new(NoBroker);
    let proxy = Arc::new(
        Proxy::new(config, keys, view, Arc::new(ContainmentView::new()), ledger).expect("proxy"),
    );
    let proxied = serve(proxy.router()).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let direct_url = format!("http://{upstream}/graphql/v2");
    let proxy_url = format!("http://{proxied}/graphql/v2");
    latencies(&client, &direct_url, &token, 500).await;
    latencies(&client, &proxy_url, &token, 500).await;
    let (d50, d99) = latencies(&client, &direct_url, &token, 3000).await;
    let (p50, p99) = latencies(&client, &proxy_url, &token, 3000).await;
    let window = Duration::from_secs(3);
    let direct_rps = throughput(&client, &direct_url, &token, window).await;
    let proxy_rps = throughput(&client, &proxy_url, &token, window).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "GraphQL query, latency direct: p50 {:.3} ms  p99 {:.3} ms",
        ms(d50),
        ms(d99)
    );
    println!(
        "GraphQL query, latency proxy:  p50 {:.3} ms  p99 {:.3} ms (p50 added {:.3} ms)",
        ms(p50),
        ms(p99),
        ms(p50) - ms(d50)
    );
    println!(
        "GraphQL query, throughput: direct {direct_rps:.0} req/s, proxy {proxy_rps:.0} req/s: {:.0}% of direct ({} cores shared by client, proxy and upstream)",
        100.0 * proxy_rps / direct_rps,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
}

fn main() {
    if !data().join("schema.json").is_file() {
        eprintln!(
            "!!! Railway data missing at {} (set CAPGATE_RAILWAY_DATA): nothing measured",
            data().display()
        );
        std::process::exit(1);
    }
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    judging(&mut criterion);
    criterion.final_summary();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(through_the_proxy());
}
