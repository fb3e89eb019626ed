//! The baseline speaks the gateway's HTTP contract: the same request sequence sent to the real
//! system and to the baseline gets the same status codes, the same JSON shapes and the same
//! figures (ids, tokens and request ids aside), including replays, refusals and referral bonuses.

mod common;

use std::time::Duration;

use common::{Running, start_baseline, start_system};
use reqwest::Method;
use serde_json::{Value, json};

/// Fields whose values differ between two runs by nature (ids, tokens, request ids).
const VOLATILE_FIELDS: [&str; 6] = [
    "userId",
    "referralCode",
    "request_id",
    "token",
    "referrerId",
    "refereeId",
];

struct Answer {
    status: u16,
    replayed: Option<String>,
    body: Value,
}

async fn call(
    client: &reqwest::Client,
    running: &Running,
    method: Method,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut request = client.request(method, format!("{}{path}", running.target.base_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request
            .header("Content-Type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
    Answer {
        status,
        replayed,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// The body with volatile values replaced, so two targets' answers compare equal.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let value = if VOLATILE_FIELDS.contains(&key.as_str()) && !value.is_null() {
                        json!("<volatile>")
                    } else {
                        normalized(value)
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// Polls a player's balance until it reaches `expected` (follow-ups are asynchronous in the
/// system), bounded.
async fn balance_reaches(
    client: &reqwest::Client,
    running: &Running,
    token: &str,
    expected: i64,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = call(
            client,
            running,
            Method::GET,
            "/balance",
            Some(token),
            None,
            None,
        )
        .await
        .body;
        if last["balance"] == expected {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{}: the balance never reached {expected}: {last}",
        running.target.label
    );
}

/// The sequence, as (step, status, replay header, normalized body).
async fn transcript(running: &Running) -> Vec<(String, u16, Option<String>, Value)> {
    let client = reqwest::Client::new();
    let mut steps = Vec::new();
    let mut step = |name: &str, answer: &Answer| {
        steps.push((
            name.to_string(),
            answer.status,
            answer.replayed.clone(),
            normalized(&answer.body),
        ));
    };
    let post = |path: &'static str,
                token: Option<String>,
                key: Option<&'static str>,
                body: &'static str| {
        let client = client.clone();
        async move {
            call(
                &client,
                running,
                Method::POST,
                path,
                token.as_deref(),
                key,
                Some(body),
            )
            .await
        }
    };
    let alice_signup = r#"{"username":"alice","password":"correct horse"}"#;
    step(
        "signup",
        &post("/signup", None, Some("s1"), alice_signup).await,
    );
    step(
        "signup retried",
        &post("/signup", None, Some("s1"), alice_signup).await,
    );
    step(
        "signup taken",
        &post(
            "/signup",
            None,
            Some("s2"),
            r#"{"username":"Alice","password":"correct horse"}"#,
        )
        .await,
    );
    step(
        "signup bad name",
        &post(
            "/signup",
            None,
            None,
            r#"{"username":"x","password":"correct horse"}"#,
        )
        .await,
    );
    step(
        "login wrong password",
        &post(
            "/login",
            None,
            None,
            r#"{"username":"alice","password":"wrong horse"}"#,
        )
        .await,
    );
    let login = post(
        "/login",
        None,
        None,
        r#"{"username":"alice","password":"correct horse"}"#,
    )
    .await;
    step("login", &login);
    let alice = login.body["token"].as_str().expect("token").to_string();
    let code = call(
        &client,
        running,
        Method::GET,
        "/balance",
        Some(&alice),
        None,
        None,
    )
    .await
    .body["referralCode"]
        .as_str()
        .expect("referral code")
        .to_string();
    step(
        "balance without token",
        &call(&client, running, Method::GET, "/balance", None, None, None).await,
    );
    step(
        "balance",
        &call(
            &client,
            running,
            Method::GET,
            "/balance",
            Some(&alice),
            None,
            None,
        )
        .await,
    );
    let token = || Some(alice.clone());
    step(
        "top-up",
        &post("/top-up", token(), Some("t1"), r#"{"amount":100}"#).await,
    );
    step(
        "top-up retried",
        &post("/top-up", token(), Some("t1"), r#"{"amount":100}"#).await,
    );
    step(
        "top-up zero",
        &post("/top-up", token(), None, r#"{"amount":0}"#).await,
    );
    step(
        "key reused",
        &post("/top-up", token(), Some("t1"), r#"{"amount":50}"#).await,
    );
    step("malformed body", &post("/top-up", token(), None, "{").await);
    step(
        "purchase",
        &post(
            "/purchase",
            token(),
            Some("p1"),
            r#"{"item":"gold_coin","quantity":2}"#,
        )
        .await,
    );
    step(
        "purchase over funds",
        &post(
            "/purchase",
            token(),
            Some("p2"),
            r#"{"item":"treasure_box","quantity":2}"#,
        )
        .await,
    );
    step(
        "refusal retried",
        &post(
            "/purchase",
            token(),
            Some("p2"),
            r#"{"item":"treasure_box","quantity":2}"#,
        )
        .await,
    );
    step(
        "unknown item",
        &post("/purchase", token(), None, r#"{"item":"dragon"}"#).await,
    );
    step(
        "bad quantity",
        &post(
            "/purchase",
            token(),
            None,
            r#"{"item":"goldCoin","quantity":"0"}"#,
        )
        .await,
    );
    let bob_signup =
        json!({ "username": "bob", "password": "correct horse", "referralCode": code }).to_string();
    step(
        "signup with referral",
        &call(
            &client,
            running,
            Method::POST,
            "/signup",
            None,
            None,
            Some(&bob_signup),
        )
        .await,
    );
    step(
        "unknown referral code",
        &post(
            "/signup",
            None,
            None,
            r#"{"username":"carol","password":"correct horse","referralCode":"ZZZZZZZZZZZZ"}"#,
        )
        .await,
    );
    let bob = post(
        "/login",
        None,
        None,
        r#"{"username":"bob","password":"correct horse"}"#,
    )
    .await
    .body["token"]
        .as_str()
        .expect("bob's token")
        .to_string();
    // Both shares of the referral bonus (50 each): in the system the referrer's is a follow-up.
    let bob_balance = balance_reaches(&client, running, &bob, 50).await;
    step(
        "referee balance",
        &Answer {
            status: 200,
            replayed: None,
            body: bob_balance,
        },
    );
    let alice_balance = balance_reaches(&client, running, &alice, 130).await;
    // The version counts the changes applied to the account: the same in both designs.
    step(
        "referrer balance",
        &Answer {
            status: 200,
            replayed: None,
            body: alice_balance,
        },
    );
    step(
        "unknown route",
        &call(&client, running, Method::GET, "/nope", None, None, None).await,
    );
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_answers_like_the_system() {
    shared::telemetry::init("text");
    let system = start_system().await;
    let baseline = start_baseline().await;
    let expected = transcript(&system).await;
    let actual = transcript(&baseline).await;
    assert_eq!(expected.len(), actual.len());
    for (system_step, baseline_step) in expected.iter().zip(&actual) {
        assert_eq!(
            system_step, baseline_step,
            "step {:?}: system (left) and baseline (right) differ",
            system_step.0
        );
    }
    // The answers are the real ones, not two identical mistakes.
    let status = |name: &str| {
        expected
            .iter()
            .find(|step| step.0 == name)
            .map(|step| step.1)
            .unwrap()
    };
    assert_eq!(status("signup"), 200);
    assert_eq!(
        expected[1].2.as_deref(),
        Some("true"),
        "the retry is a replay"
    );
    assert_eq!(status("signup taken"), 409);
    assert_eq!(status("purchase over funds"), 409);
    assert_eq!(status("key reused"), 422);
    assert_eq!(status("unknown referral code"), 422);
    for running in [&system, &baseline] {
        let report = shared::audit::run(&running.pool).await.expect("audit ran");
        assert!(report.passed, "audit of the {}", running.target.label);
    }
    system.stop().await;
    baseline.stop().await;
}
