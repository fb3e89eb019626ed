//! The ops page end to end: a whole system with some activity and a dead letter, then Debian's
//! headless Chromium (driven by playwright-core, gateway/tests/ops/drive.mjs) logs in, sees the
//! partitions with their owners and queue depths, the treasury figures, commands per second,
//! latency and the audit, replays the dead letter, and saves a screenshot to
//! `target/test-artifacts/ops-page.png`. The overview endpoint is checked over HTTP first.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{DirectBroker, PASSWORD, TestSystem};
use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::broker::Topology;
use shared::partition::partition_of;
use tokio_util::sync::CancellationToken;

/// Installing Chromium and playwright-core on a new machine (apt-get and npm ci).
const ENSURE_BROWSER_TIMEOUT: Duration = Duration::from_secs(900);
/// The whole browser session (the script bounds each of its steps to 20 s).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);
/// Background load while the page is open, so it has a rate and latencies to show.
const LOAD_INTERVAL: Duration = Duration::from_millis(150);
const LOAD_REQUESTS_MAX: usize = 2_000;
/// Waiting for the treasury to archive the dead letter.
const DEAD_LETTER_WAIT_ATTEMPTS: usize = 200;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn screenshot_path() -> PathBuf {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    target.join("test-artifacts").join("ops-page.png")
}

/// Runs a command to its end within `limit`, echoing what it printed; returns (success, stdout).
async fn run_bounded(mut command: tokio::process::Command, limit: Duration) -> (bool, String) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("the command started");
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {limit:?}"))
        .expect("the command ran");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    println!("--- stdout of {command:?}\n{stdout}");
    println!("--- stderr\n{}", String::from_utf8_lossy(&output.stderr));
    (output.status.success(), stdout)
}

/// Chromium and playwright-core, installed when missing (harmless when present).
async fn ensure_browser() {
    let mut command = tokio::process::Command::new("bash");
    command.arg(workspace_root().join("scripts/ensure-browser.sh"));
    let (ok, _) = run_bounded(command, ENSURE_BROWSER_TIMEOUT).await;
    assert!(ok, "scripts/ensure-browser.sh failed");
}

/// Publishes a message no worker can decode (an unknown envelope version) to the player's
/// partition; the worker dead-letters it and the treasury archives it.
async fn publish_poison(system: &TestSystem, player_id: uuid::Uuid) -> String {
    let topology = Topology::from_config(&system.common);
    let routing_key = Topology::partition_routing_key(partition_of(player_id, topology.partitions));
    let payload = json!({ "v": 99, "id": uuid::Uuid::new_v4(), "command": {} }).to_string();
    let direct = DirectBroker::open(system).await;
    direct
        .publish(&routing_key, payload.as_bytes(), BasicProperties::default())
        .await;
    direct.close().await;
    routing_key
}

/// Tops up and buys every `LOAD_INTERVAL` until `stop` (bounded in count).
fn keep_load_going(
    base_url: String,
    token: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut sent = 0;
        for round in 0..LOAD_REQUESTS_MAX {
            if stop.is_cancelled() {
                break;
            }
            let (path, body) = if round % 3 == 2 {
                ("/purchase", json!({ "item": "gold_coin", "quantity": 1 }))
            } else {
                ("/top-up", json!({ "amount": 25 }))
            };
            let response = client
                .post(format!("{base_url}{path}"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await;
            if response.is_ok_and(|response| response.status().is_success()) {
                sent += 1;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(LOAD_INTERVAL) => {}
            }
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_page_in_headless_chromium() {
    ensure_browser().await;
    let system = TestSystem::start().await;
    let partitions = system.common.partitions;

    // An admin, a player, and some activity.
    system.player("ops_admin").await;
    let admin = system.make_admin("ops_admin").await;
    let player = system.player("ops_player").await;
    for amount in [500, 250, 125] {
        assert_eq!(system.top_up(&player, amount).await.status, StatusCode::OK);
    }
    for (item, quantity) in [("gold_coin", 3), ("treasure_box", 1)] {
        let reply = system
            .post(
                "/purchase",
                Some(&player),
                None,
                json!({ "item": item, "quantity": quantity }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }

    // One poison message, dead-lettered and archived.
    let routing_key = publish_poison(&system, system.player_id("ops_player").await).await;
    let mut archived = false;
    for _ in 0..DEAD_LETTER_WAIT_ATTEMPTS {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&system.pool)
            .await
            .unwrap();
        if count == 1 {
            archived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(archived, "the poison message was never archived");

    // The page is public, self-contained and holds no data.
    let page = system.get("/ops", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.headers[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.body.as_str().expect("the page as text");
    assert!(html.contains("Wallet ops"));
    assert!(
        !html.contains("://"),
        "the page refers to something outside the gateway"
    );

    // The overview: admins only, with every part.
    let anonymous = system.get("/v1/admin/overview", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let refused = system.get("/v1/admin/overview", Some(&player)).await;
    common::assert_error(&refused, 403, "forbidden");
    let overview = system.get("/v1/admin/overview", Some(&admin)).await;
    assert_eq!(overview.status, StatusCode::OK, "{:?}", overview.body);
    let body = &overview.body;
    let queues = body["queues"]["data"].as_array().expect("queue depths");
    assert_eq!(queues.len(), usize::from(partitions) + 2, "{body}");
    assert!(
        queues.iter().all(|queue| queue["messages"].is_u64()),
        "every queue exists: {body}"
    );
    let dead_letter_queue = queues
        .iter()
        .find(|queue| queue["kind"] == "dead_letters")
        .unwrap();
    assert_eq!(
        dead_letter_queue["consumers"], 1,
        "the treasury archives: {body}"
    );
    let treasury = body["hotAccounts"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|account| account["owner"] == "treasury" && account["asset"] == "GEMS")
        .cloned()
        .expect("the treasury's GEMS account");
    // A hot account's cached balance lags by design (the genesis supply itself arrives as a hot
    // credit that the treasury folds within about a second); what the books promise is that the
    // cached balance plus the unfolded credits is the treasury's holding, which is positive.
    let holding =
        treasury["balance"].as_i64().unwrap() + treasury["unfoldedCredits"].as_i64().unwrap();
    assert!(holding > 0, "{treasury}");
    assert_eq!(
        body["deadLetters"]["data"],
        json!({ "total": 1, "notReplayed": 1 })
    );
    assert_eq!(body["audit"]["report"]["passed"], true, "{body}");
    assert_eq!(body["partitions"], partitions);
    assert!(
        body["latency"]["data"]["requests"].as_u64().unwrap() >= 5,
        "{body}"
    );

    // The browser, with load going on so the rate and the latencies have something to show.
    let stop = CancellationToken::new();
    let load = keep_load_going(system.base_url.clone(), player.clone(), stop.clone());
    let screenshot = screenshot_path();
    drop(std::fs::remove_file(&screenshot));
    let mut command = tokio::process::Command::new("node");
    command
        .arg("drive.mjs")
        .current_dir(workspace_root().join("gateway/tests/ops"))
        .env("OPS_BASE_URL", &system.base_url)
        .env("OPS_ADMIN_USER", "ops_admin")
        .env("OPS_ADMIN_PASSWORD", PASSWORD)
        .env("OPS_PLAYER_USER", "ops_player")
        .env("OPS_PLAYER_PASSWORD", PASSWORD)
        .env("OPS_PARTITIONS", partitions.to_string())
        .env("OPS_SCREENSHOT", &screenshot);
    let (ok, stdout) = run_bounded(command, BROWSER_TIMEOUT).await;
    stop.cancel();
    let sent = load.await.unwrap();
    assert!(ok, "the browser test failed (see its output above)");
    assert!(sent > 0, "the background load sent nothing");

    let result: Value = stdout
        .lines()
        .find_map(|line| line.strip_prefix("OPS-PAGE-RESULT "))
        .map(|json| serde_json::from_str(json).expect("the result line is JSON"))
        .expect("the script printed its result");
    assert_eq!(result["audit"], "PASSED", "{result}");
    assert_eq!(result["partitionRows"], partitions);
    assert!(
        result["owners"]
            .as_array()
            .is_some_and(|owners| !owners.is_empty()),
        "{result}"
    );
    let treasury_balance = result["treasuryBalance"].as_str().unwrap().replace(',', "");
    assert!(
        treasury_balance
            .parse::<i64>()
            .is_ok_and(|balance| balance > 0),
        "{result}"
    );
    let replayed = result["replayedDeadLetter"]
        .as_i64()
        .expect("a dead letter id");
    let (replayed_key, replayed_at): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT routing_key, replayed_at FROM dead_letters WHERE id = $1")
            .bind(replayed)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(replayed_key, routing_key);
    assert!(replayed_at.is_some(), "the replay reached the database");

    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is a PNG"
    );
    assert!(png.len() > 10_000, "the screenshot is not empty");
    println!("screenshot: {}", screenshot.display());

    // The replayed poison is dead-lettered again (a second row); the books are untouched.
    system.finish().await;
}
