//! Concurrency and idempotency: overdrafts under contention, retries with the same key
//! (sequential and concurrent), a reused key with another body, a message delivered twice.

mod common;

use common::{DirectBroker, TestSystem, assert_error};
use futures_util::future::join_all;
use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::json;
use shared::broker::Topology;
use shared::partition::partition_of;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purchases_never_overdraw() {
    let system = TestSystem::start().await;
    let token = system.player("buyer").await;
    assert_eq!(system.top_up(&token, 100).await.status, StatusCode::OK);

    // 25 purchases of 10 GEMS each against a balance of 100: exactly 10 can succeed.
    let replies = join_all((0..25).map(|index| {
        let system = &system;
        let token = token.clone();
        async move {
            system
                .post(
                    "/purchase",
                    Some(&token),
                    Some(&format!("buy-{index}")),
                    json!({ "item": "gold_coin" }),
                )
                .await
        }
    }))
    .await;
    let succeeded = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::OK)
        .count();
    let refused: Vec<_> = replies
        .iter()
        .filter(|reply| reply.status != StatusCode::OK)
        .collect();
    assert_eq!(succeeded, 10);
    assert_eq!(refused.len(), 15);
    for reply in refused {
        assert_error(reply, 409, "insufficient_funds");
    }
    let balance = system.balance(&token).await;
    assert_eq!(balance["balance"], 0);
    assert_eq!(balance["inventory"]["goldCoins"], 10);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_retries_with_one_key_apply_once() {
    let system = TestSystem::start().await;
    let token = system.player("retrier").await;
    let first = system
        .post(
            "/top-up",
            Some(&token),
            Some("top-up-1"),
            json!({ "amount": 70 }),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    for _ in 0..3 {
        let retry = system
            .post(
                "/top-up",
                Some(&token),
                Some("top-up-1"),
                json!({ "amount": 70 }),
            )
            .await;
        assert_eq!(retry.status, StatusCode::OK);
        assert_eq!(retry.body, first.body, "same status and body");
        assert_eq!(retry.header("idempotent-replayed"), Some("true"));
        assert_eq!(retry.header("x-command-id"), first.header("x-command-id"));
    }
    assert_eq!(system.balance(&token).await["balance"], 70);

    // A rejected command is a result too, and replays as such.
    let refused = system
        .post(
            "/purchase",
            Some(&token),
            Some("buy-box"),
            json!({ "item": "treasure_box", "quantity": 2 }),
        )
        .await;
    assert_error(&refused, 409, "insufficient_funds");
    assert_eq!(system.top_up(&token, 100).await.status, StatusCode::OK);
    let replayed = system
        .post(
            "/purchase",
            Some(&token),
            Some("buy-box"),
            json!({ "item": "treasure_box", "quantity": 2 }),
        )
        .await;
    assert_eq!(
        replayed.status,
        StatusCode::CONFLICT,
        "the stored refusal, not a new attempt"
    );
    assert_eq!(replayed.body, refused.body);
    assert_eq!(system.balance(&token).await["balance"], 170);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_key_apply_once() {
    let system = TestSystem::start().await;
    let token = system.player("racer").await;
    let replies = join_all((0..12).map(|_| {
        let system = &system;
        let token = token.clone();
        async move {
            system
                .post(
                    "/top-up",
                    Some(&token),
                    Some("same-key"),
                    json!({ "amount": 25 }),
                )
                .await
        }
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(
            reply.body, replies[0].body,
            "every retry gets the same result"
        );
    }
    let originals = replies
        .iter()
        .filter(|reply| reply.header("idempotent-replayed") == Some("false"))
        .count();
    assert_eq!(
        originals, 1,
        "exactly one request applied it; the rest are replays"
    );
    assert_eq!(system.balance(&token).await["balance"], 25);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_for_another_request_is_refused() {
    let system = TestSystem::start().await;
    let token = system.player("reuser").await;
    assert_eq!(
        system
            .post("/top-up", Some(&token), Some("k"), json!({ "amount": 5 }))
            .await
            .status,
        StatusCode::OK
    );
    let reply = system
        .post("/top-up", Some(&token), Some("k"), json!({ "amount": 6 }))
        .await;
    assert_error(&reply, 422, "idempotency_key_reused");
    let reply = system
        .post(
            "/purchase",
            Some(&token),
            Some("k"),
            json!({ "item": "gold_coin" }),
        )
        .await;
    assert_error(&reply, 422, "idempotency_key_reused");
    // Keys belong to their principal: another player may use the same key.
    let other = system.player("other").await;
    assert_eq!(
        system
            .post("/top-up", Some(&other), Some("k"), json!({ "amount": 6 }))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(system.balance(&token).await["balance"], 5);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_is_applied_once() {
    let system = TestSystem::start().await;
    let token = system.player("twice").await;
    let player_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM users WHERE username = 'twice'")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    let topology = Topology::from_config(&system.common);
    let envelope = CommandEnvelope {
        v: COMMAND_VERSION,
        id: uuid::Uuid::new_v4(),
        principal: format!("player:{player_id}"),
        fingerprint: "duplicate-delivery-test".to_string(),
        request_id: None,
        command: Command::TopUp {
            player_id,
            amount: 40,
        },
    };

    let mut direct = DirectBroker::open(&system).await;
    let payload = serde_json::to_vec(&envelope).unwrap();
    let routing_key = Topology::partition_routing_key(partition_of(player_id, topology.partitions));
    for delivery in 0..2 {
        direct
            .publish(
                &routing_key,
                &payload,
                BasicProperties::default()
                    .with_correlation_id(format!("delivery-{delivery}").as_str().into()),
            )
            .await;
    }
    let answers: Vec<_> = direct
        .replies(2)
        .await
        .into_iter()
        .map(|(_, reply)| reply)
        .collect();
    assert_eq!(answers.iter().filter(|answer| !answer.replay).count(), 1);
    assert_eq!(answers[0].body, answers[1].body);
    assert!(answers.iter().all(|answer| answer.status == 200));
    assert_eq!(system.balance(&token).await["balance"], 40);
    let journals: i64 = sqlx::query_scalar("SELECT count(*) FROM journal_entries WHERE id = $1")
        .bind(envelope.id)
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(journals, 1);
    direct.close().await;
    system.finish().await;
}
