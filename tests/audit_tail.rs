//! `capgate audit tail` through the real binary against a real broker's store: the newest
//! records with no filter, filters narrowing them, and `--follow` printing records appended
//! after it started.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn tail(broker: &Broker, args: &[&str]) -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args(["audit", "tail", "--config"])
        .arg(broker.config_path())
        .args(args)
        .output()
        .expect("run tail");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `#seq` of a tail line.
fn seq(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix('#'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no #seq in {line}"))
}

#[tokio::test]
async fn tail_shows_the_newest_records_without_a_filter_and_narrows_with_one() {
    let broker = Broker::start().await;
    for _ in 0..3 {
        broker
            .issue(READER_KEY, &["pg://staging/:read"], None)
            .await;
    }
    broker
        .issue(DEPLOY_BOT_KEY, &["pg://staging/:read"], None)
        .await;
    let (status, _) = broker.revoke("agent", "someone-else").await;
    assert_eq!(status, 201);

    let all = tail(&broker, &[]);
    assert!(all.len() >= 5, "{all:?}");
    let newest = all.last().expect("a record");
    assert!(newest.contains("revocation"), "{newest}");
    let seqs: Vec<u64> = all.iter().map(|l| seq(l)).collect();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{seqs:?}");

    // -n keeps the newest n, oldest first.
    let two = tail(&broker, &["-n", "2"]);
    assert_eq!(two, all[all.len() - 2..].to_vec());

    // Filters narrow, and -n counts matching records.
    let reporting = tail(&broker, &["--agent", "reporting-bot"]);
    assert_eq!(reporting.len(), 3, "{reporting:?}");
    assert!(reporting
        .iter()
        .all(|l| l.contains("reporting-bot") && l.contains("issuance")));
    let last_reporting = tail(&broker, &["--agent", "reporting-bot", "-n", "1"]);
    assert_eq!(last_reporting, reporting[2..].to_vec());
    let revocations = tail(&broker, &["--kind", "revocation"]);
    assert_eq!(revocations.len(), 1, "{revocations:?}");
    assert!(tail(&broker, &["--agent", "nobody"]).is_empty());
}

#[tokio::test]
async fn tail_follow_streams_records_appended_after_it_started() {
    let broker = Broker::start().await;
    broker
        .issue(READER_KEY, &["pg://staging/:read"], None)
        .await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_capgate"))
        .args([
            "audit",
            "tail",
            "-n",
            "1",
            "--follow",
            "--interval",
            "100ms",
            "--config",
        ])
        .arg(broker.config_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tail -f");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the newest record first");
    assert!(
        first.contains("issuance") && first.contains("reporting-bot"),
        "{first}"
    );

    // New records appear as they are appended: a token of another agent, then a revocation.
    broker
        .issue(DEPLOY_BOT_KEY, &["pg://staging/:read"], None)
        .await;
    let (status, _) = broker.revoke("agent", "someone-else").await;
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.len(), 2, "followed: {seen:?}");
    assert!(
        seen[0].contains("issuance") && seen[0].contains("deploy-bot"),
        "{seen:?}"
    );
    assert!(seen[1].contains("revocation"), "{seen:?}");
    assert_eq!(seq(&seen[0]), seq(&first) + 1);
    assert_eq!(seq(&seen[1]), seq(&first) + 2);
}
