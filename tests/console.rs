//! The approvals console (`/ui`) of the real broker: its browser defences over plain HTTP,
//! and the whole flow in a real browser (headless Chromium driven through chromedriver):
//! sign in, see the pending SQL with its preview, approve, and the agent's retry succeeds.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;
use common::*;
use fantoccini::{ClientBuilder, Locator};
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

const APPROVE_WRITES: &str = "[containment]\napproval_verbs = [\"write\", \"delete\"]\n";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The value of `name=` in a response's Set-Cookie headers.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v[name.len() + 1..]
                .split(';')
                .next()
                .unwrap_or("")
                .to_owned();
            (value, v.to_owned())
        })
}

/// The CSRF token embedded in a page's forms.
fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a form with a CSRF token") + marker.len();
    html[start..].split('"').next().expect("token").to_owned()
}

/// A browser-like session with the console: its cookies and CSRF token.
struct Console {
    url: String,
    session: String,
    csrf: String,
}

async fn sign_in(broker: &Broker, key: &str) -> Console {
    let form = http()
        .get(format!("{}/ui/login", broker.url))
        .send()
        .await
        .expect("login form");
    let (login_cookie, _) = set_cookie(&form, "capgate_console_login").expect("login cookie");
    let csrf = csrf_of(&form.text().await.expect("html"));
    let signed = http()
        .post(format!("{}/ui/login", broker.url))
        .header(COOKIE, format!("capgate_console_login={login_cookie}"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .body(serde_urlencoded::to_string([("operator_key", key), ("csrf", &csrf)]).expect("form"))
        .send()
        .await
        .expect("login");
    assert_eq!(signed.status(), 303, "{:?}", signed.text().await);
    let (session, _) = set_cookie(&signed, "capgate_console").expect("session cookie");
    let page = http()
        .get(format!("{}/ui", broker.url))
        .header(COOKIE, format!("capgate_console={session}"))
        .send()
        .await
        .expect("home");
    let csrf = csrf_of(&page.text().await.expect("html"));
    Console {
        url: broker.url.clone(),
        session,
        csrf,
    }
}

impl Console {
    async fn post(&self, path: &str, fields: &[(&str, &str)], site: &str) -> (u16, String) {
        let response = http()
            .post(format!("{}{path}", self.url))
            .header(COOKIE, format!("capgate_console={}", self.session))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("sec-fetch-site", site)
            .body(serde_urlencoded::to_string(fields).expect("form"))
            .send()
            .await
            .expect("post");
        (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        )
    }
}

/// A pending approval of ops-bot's, through the HTTP-free path (the broker's own API).
async fn pending_approval(broker: &Broker, token: &str, resource: &str) -> String {
    let (status, created) = broker
        .post_json(
            "/v1/approvals",
            Some(token),
            json!({"operation": {"adapter": "pg-staging", "resource": resource, "verb": "delete",
                   "detail": {"sql": "DROP TABLE <script>alert(1)</script>"}}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn the_console_refuses_what_a_browser_attack_would_send() {
    const SELF_OPERATOR_KEY: &str = "cgo_test_self_ops_bot_0123456789abcd";
    let extra = format!(
        "{APPROVE_WRITES}approvers_required = 2\n\n[[operators]]\nname = \"ops-bot\"\nsha256 = \"{}\"\n",
        sha256(SELF_OPERATOR_KEY)
    );
    let broker = Broker::start_custom(OPS_POLICY, &extra).await;
    let token = token_of(&broker.issue(OPS_KEY, &["pg://staging/:delete"], None).await);
    let id = pending_approval(&broker, &token, "pg://staging/public.t").await;

    // Not signed in: sent to the sign-in form, which is served with a strict policy.
    let home = http()
        .get(format!("{}/ui", broker.url))
        .send()
        .await
        .expect("home");
    assert_eq!(home.status(), 303);
    assert_eq!(home.headers()[LOCATION], "/ui/login");
    let form = http()
        .get(format!("{}/ui/login", broker.url))
        .send()
        .await
        .expect("form");
    let csp = form.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let (_, login_cookie) = set_cookie(&form, "capgate_console_login").expect("cookie");
    assert!(
        login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"),
        "{login_cookie}"
    );

    // Sign-in: an agent key is not an operator key; a forged form token or a cross-site
    // post is refused before the key is even looked at.
    let attempt = |key: &'static str, csrf: &'static str, site: &'static str| {
        let url = broker.url.clone();
        async move {
            let response = http()
                .post(format!("{url}/ui/login"))
                .header(COOKIE, "capgate_console_login=known")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("sec-fetch-site", site)
                .body(
                    serde_urlencoded::to_string([("operator_key", key), ("csrf", csrf)])
                        .expect("f"),
                )
                .send()
                .await
                .expect("login");
            (
                response.status().as_u16(),
                set_cookie(&response, "capgate_console").is_some(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    let (status, session, body) = attempt(OPS_KEY, "known", "same-origin").await;
    assert_eq!((status, session), (401, false));
    assert!(body.contains("not an operator key"), "{body}");
    let (status, session, body) = attempt(OPERATOR_KEY, "forged", "same-origin").await;
    assert_eq!((status, session), (403, false));
    assert!(body.contains("sign-in form is stale"), "{body}");
    let (status, session, body) = attempt(OPERATOR_KEY, "known", "cross-site").await;
    assert_eq!((status, session), (403, false));
    assert!(body.contains("cross-site request refused"), "{body}");

    // Signed in: the page escapes what it shows, and decisions need the session's token,
    // from this origin.
    let alice = sign_in(&broker, OPERATOR_KEY).await;
    let page = http()
        .get(format!("{}/ui", broker.url))
        .header(COOKIE, format!("capgate_console={}", alice.session))
        .send()
        .await
        .expect("home")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("DROP TABLE &lt;script&gt;alert(1)&lt;/script&gt;"),
        "escaped"
    );
    assert!(!page.contains("<script>"), "no script reaches the page");
    let approve = format!("/ui/approvals/{id}/approve");
    let (status, body) = alice
        .post(&approve, &[("csrf", "forged")], "same-origin")
        .await;
    assert_eq!(status, 403);
    assert!(body.contains("CSRF token is not this session"), "{body}");
    let (status, body) = alice
        .post(&approve, &[("csrf", &alice.csrf)], "cross-site")
        .await;
    assert_eq!(status, 403);
    assert!(body.contains("cross-site"), "{body}");
    let (status, body) = alice
        .post(&approve, &[("csrf", &alice.csrf)], "same-origin")
        .await;
    assert_eq!(status, 303, "{body}");

    // The same rules as the API: no second approval by the same operator, none by the
    // agent's own name.
    let (status, body) = alice
        .post(&approve, &[("csrf", &alice.csrf)], "same-origin")
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("approval_same_operator"), "{body}");
    let agent_as_operator = sign_in(&broker, SELF_OPERATOR_KEY).await;
    let (status, body) = agent_as_operator
        .post(
            &approve,
            &[("csrf", &agent_as_operator.csrf)],
            "same-origin",
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_self"), "{body}");
    let (status, shown) = broker
        .get_as(&format!("/v1/approvals/{id}"), OPERATOR_KEY)
        .await;
    assert_eq!(
        (status, shown["status"].clone(), shown["approvers"].clone()),
        (200, json!("pending"), json!(["alice"]))
    );

    // Signing out ends the session server-side: the old cookie no longer decides anything.
    let (status, _) = alice
        .post("/ui/logout", &[("csrf", &alice.csrf)], "same-origin")
        .await;
    assert_eq!(status, 303);
    let (status, body) = alice
        .post(
            "/ui/freeze",
            &[("csrf", &alice.csrf), ("frozen", "on")],
            "same-origin",
        )
        .await;
    assert_eq!(status, 401, "{body}");
    let (_, freeze) = broker.get("/v1/freeze").await;
    assert_eq!(freeze["frozen"], false, "{freeze}");
}

/// chromium and chromedriver on PATH (Debian's `chromium`, `chromium-driver`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
    };
    Some((
        find(&["chromium", "chromium-browser", "google-chrome"])?,
        find(&["chromedriver"])?,
    ))
}

struct Chromedriver {
    child: Child,
    port: u16,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chromedriver(path: &PathBuf) -> Chromedriver {
    let port = free_port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Chromedriver { child, port }
}

fn artifacts() -> PathBuf {
    let dir = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

/// Waits until approval `id` carries a preview, and returns it.
async fn preview_of(broker: &Broker, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, approval) = broker
            .get_as(&format!("/v1/approvals/{id}"), OPERATOR_KEY)
            .await;
        if let Some(text) = approval["preview"]["text"].as_str() {
            return text.to_owned();
        }
        assert!(Instant::now() < deadline, "no preview attached: {approval}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_operator_approves_in_a_real_browser_and_the_agents_retry_succeeds() {
    let Some((chromium, chromedriver)) = browser() else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "chromium and chromedriver are required under CI (Debian packages chromium, chromium-driver; .ci/run installs them)"
        );
        eprintln!("\n*** NOT RUN: the browser test needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver) ***\n");
        return;
    };
    let broker = Broker::start_custom(OPS_POLICY, APPROVE_WRITES).await;
    let proxy = start_pg_proxy(&broker).await;
    let t = table_with(3).await;
    let token = token_of(
        &broker
            .issue(
                OPS_KEY,
                &[
                    "pg://staging/:delete",
                    "pg://staging/:write",
                    "pg://staging/:read",
                ],
                None,
            )
            .await,
    );
    let agent = connect_when_ready(proxy.port, "ops-bot", &token).await;
    let sql = format!("DELETE FROM {t} WHERE id <= 2");
    let asked = agent.batch_execute(&sql).await.expect_err("needs approval");
    let id = approval_id(&db_message(&asked)).expect("approval id");
    assert_eq!(preview_of(&broker, &id).await, "2 of 3 rows");

    let driver = start_chromedriver(&chromedriver);
    let profile = tempfile::tempdir().expect("profile");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session");
    let flow = async {
        browser.goto(&format!("{}/ui", broker.url)).await?;
        assert!(browser.current_url().await?.path().ends_with("/ui/login"));
        browser
            .find(Locator::Id("operator_key"))
            .await?
            .send_keys(OPERATOR_KEY)
            .await?;
        browser.find(Locator::Id("sign_in")).await?.click().await?;
        let who = browser.wait().for_element(Locator::Id("operator")).await?;
        assert_eq!(who.text().await?, "alice");
        let row = browser
            .find(Locator::Id(&format!("approval-{id}")))
            .await?
            .text()
            .await?;
        for shown in [
            sql.as_str(),
            "ops-bot",
            "staging",
            "2 of 3 rows",
            "pg-staging",
        ] {
            assert!(row.contains(shown), "{shown:?} in {row}");
        }
        let shot = browser.screenshot().await?;
        std::fs::write(artifacts().join("console-pending.png"), &shot).expect("screenshot");
        browser
            .find(Locator::Css(&format!("#approval-{id} button.approve")))
            .await?
            .click()
            .await?;
        browser.wait().for_element(Locator::Id("decided")).await?;
        let page = browser.source().await?;
        assert!(
            !page.contains(&format!("approval-{id}")),
            "no longer pending"
        );
        let decided = browser.find(Locator::Id("decided")).await?.text().await?;
        assert!(
            decided.contains(&id) && decided.contains("approved"),
            "{decided}"
        );
        let shot = browser.screenshot().await?;
        std::fs::write(artifacts().join("console-approved.png"), &shot).expect("screenshot");
        Ok::<_, fantoccini::error::CmdError>(())
    };
    let outcome = flow.await;
    let _ = browser.close().await;
    outcome.expect("the browser flow");

    // The agent collects its approval and retries: the statement runs, once.
    let (status, grant) = broker
        .post_as(&format!("/v1/approvals/{id}/grant"), &token)
        .await;
    assert_eq!(status, 200, "{grant}");
    let approved = grant["token"].as_str().expect("token");
    let agent = connect_when_ready(proxy.port, "ops-bot", approved).await;
    let messages = agent
        .simple_query(&sql)
        .await
        .expect("the approved retry runs");
    let deleted = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    assert_eq!(
        deleted, 2,
        "the preview's count is what the statement changed"
    );
    assert_eq!(rows(&t).await, 1);
}
