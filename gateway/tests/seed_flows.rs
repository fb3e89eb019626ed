//! The three seed flows end to end over HTTP, with the seed's response shapes.

mod common;

use common::{TestSystem, assert_error};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_every_dependency() {
    let system = TestSystem::start().await;
    let reply = system.get("/health", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({ "status": "UP", "database": "CONNECTED", "broker": "CONNECTED" })
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_login_top_up_and_purchase() {
    let system = TestSystem::start().await;

    // Flow 1: sign up, log in, see an empty wallet.
    let reply = system.signup("alice", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["status"], "Created");
    assert!(
        reply.body["userId"]
            .as_str()
            .is_some_and(|id| id.parse::<uuid::Uuid>().is_ok())
    );
    let token = system.login("alice").await;
    let balance = system.balance(&token).await;
    assert_eq!(balance["username"], "alice");
    assert_eq!(balance["balance"], 0);
    assert_eq!(
        balance["inventory"],
        json!({ "goldCoins": 0, "treasureBoxes": 0 })
    );
    assert!(
        balance["referralCode"]
            .as_str()
            .is_some_and(|code| code.len() == 12)
    );
    assert!(balance["version"].is_i64());

    // Flow 2: top up; the answer is the new balance.
    let reply = system.top_up(&token, 100).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 100);
    assert_eq!(reply.body["username"], "alice");
    assert_eq!(reply.header("idempotent-replayed"), Some("false"));
    assert!(
        reply.header("idempotency-key").is_some(),
        "a generated key is returned"
    );

    // Flow 3: buy items; the answer is the new balance and inventory.
    let reply = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "gold_coin" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 90);
    assert_eq!(reply.body["inventory"]["goldCoins"], 1);
    let reply = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "treasure_box", "quantity": 1 }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 40);
    assert_eq!(
        reply.body["inventory"],
        json!({ "goldCoins": 1, "treasureBoxes": 1 })
    );

    // Not enough left for another box: 409, and nothing moved.
    let reply = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "treasure_box" }),
        )
        .await;
    assert_error(&reply, 409, "insufficient_funds");
    let reply = system
        .post("/purchase", Some(&token), None, json!({ "item": "dragon" }))
        .await;
    assert_error(&reply, 422, "unknown_item");

    let balance = system.balance(&token).await;
    assert_eq!(balance["balance"], 40);
    assert_eq!(
        balance["inventory"],
        json!({ "goldCoins": 1, "treasureBoxes": 1 })
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usernames_are_unique_regardless_of_case() {
    let system = TestSystem::start().await;
    assert_eq!(system.signup("Carol", None).await.status, StatusCode::OK);
    assert_error(&system.signup("Carol", None).await, 409, "username_taken");
    assert_error(&system.signup("carol", None).await, 409, "username_taken");
    // Login is case-insensitive on the username too.
    system.login("CAROL").await;
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_bonuses_are_paid_once_each() {
    let system = TestSystem::start().await;
    let referrer = system.player("referrer").await;
    let code = system.balance(&referrer).await["referralCode"]
        .as_str()
        .unwrap()
        .to_string();

    let body = json!({ "username": "referee", "password": common::PASSWORD, "referralCode": code });
    let first = system
        .post("/signup", None, Some("signup-1"), body.clone())
        .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    // A retry of the same signup is answered with the same result and pays nothing again.
    let retry = system.post("/signup", None, Some("signup-1"), body).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));

    let referee = system.login("referee").await;
    assert_eq!(system.balance(&referee).await["balance"], 50);
    // The referrer's share arrives as a follow-up command in the referrer's partition.
    system
        .eventually_balance(&referrer, |balance| balance["balance"] == 50)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        system.balance(&referrer).await["balance"],
        50,
        "paid exactly once"
    );

    // A code is case-insensitive; an unknown code is refused and creates nobody.
    let reply = system.signup("second", Some(&code.to_lowercase())).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    system
        .eventually_balance(&referrer, |balance| balance["balance"] == 100)
        .await;
    assert_error(
        &system.signup("nobody", Some("NOSUCHCODE")).await,
        422,
        "unknown_referral_code",
    );
    let reply = system
        .post(
            "/login",
            None,
            None,
            json!({ "username": "nobody", "password": common::PASSWORD }),
        )
        .await;
    assert_error(&reply, 401, "unauthorized");

    let bonuses: i64 =
        sqlx::query_scalar("SELECT count(*) FROM journal_entries WHERE kind = 'referral_bonus'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(bonuses, 4, "two referee shares and two referrer shares");
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_from_the_front_end_passes() {
    let system = TestSystem::start().await;
    let response = system
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/top-up", system.base_url),
        )
        .header("Origin", "http://localhost:5173")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("http://localhost:5173")
    );
    let allowed = response
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    let response = system
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/top-up", system.base_url),
        )
        .header("Origin", "http://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "other origins are not allowed"
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_status_is_visible_to_its_owner_only() {
    let system = TestSystem::start().await;
    let alice = system.player("alice").await;
    let bob = system.player("bob").await;
    let reply = system.top_up(&alice, 10).await;
    let command_id = reply.header("x-command-id").unwrap().to_string();
    let status = system
        .get(&format!("/v1/commands/{command_id}"), Some(&alice))
        .await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.body["status"], "applied");
    assert_eq!(status.body["statusCode"], 200);
    assert_eq!(status.body["result"]["balance"], 10);
    assert_error(
        &system
            .get(&format!("/v1/commands/{command_id}"), Some(&bob))
            .await,
        404,
        "unknown_command",
    );
    assert_error(
        &system.get("/v1/commands/not-a-uuid", Some(&alice)).await,
        404,
        "unknown_command",
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_not_answered_in_time_is_accepted_and_applied_later() {
    let mut system = TestSystem::start_with(common::Options {
        start_worker: false,
        reply_timeout_ms: 300,
        ..common::Options::default()
    })
    .await;
    // No worker yet: signup itself waits in the queue, so create the player directly.
    let reply = system.signup("patient", None).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let location = reply.header("location").unwrap().to_string();
    assert!(location.starts_with("/v1/commands/"));
    assert_eq!(reply.body["status"], "pending");

    system.start_worker();
    // Once applied, the same signup retried answers with the stored result.
    let token = loop {
        let reply = system
            .post(
                "/login",
                None,
                None,
                json!({ "username": "patient", "password": common::PASSWORD }),
            )
            .await;
        if reply.status == StatusCode::OK {
            break reply.body["token"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let status = system.get(&location, Some(&token)).await;
    assert_eq!(status.status, StatusCode::OK, "{:?}", status.body);
    assert_eq!(status.body["status"], "applied");
    assert_eq!(status.body["result"]["status"], "Created");
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_is_for_admins_and_passes() {
    let system = TestSystem::start().await;
    let player = system.player("plain").await;
    assert_error(
        &system.get("/v1/admin/audit", Some(&player)).await,
        403,
        "forbidden",
    );
    assert_error(
        &system.get("/v1/admin/audit", None).await,
        401,
        "unauthorized",
    );
    system.top_up(&player, 500).await;
    let admin = system.make_admin("plain").await;
    let reply = system.get("/v1/admin/audit", Some(&admin)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["passed"], true, "{}", reply.body);
    let names: Vec<&str> = reply.body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "journals_balance",
            "account_balances_match_postings",
            "hot_balances_match_postings",
            "assets_sum_to_zero",
            "postings_reference_their_accounts",
            "postings_reference_their_journals",
            "no_negative_player_balance"
        ]
    );
    system.finish().await;
}
