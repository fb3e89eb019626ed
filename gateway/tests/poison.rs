//! Poison messages go to the dead-letter queue with the reason, are answered as errors, never
//! block their partition, and can be listed and replayed.

mod common;

use std::time::Duration;

use common::TestSystem;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::json;
use shared::broker::Topology;
use shared::partition::partition_of;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope, CommandReply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_listed_and_replayable() {
    let system = TestSystem::start().await;
    let token = system.player("victim").await;
    let admin = system.make_admin("victim").await;
    let player_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'victim'")
            .fetch_one(&system.pool)
            .await
            .unwrap();
    let topology = Topology::from_config(&system.common);
    let routing_key = Topology::partition_routing_key(partition_of(player_id, topology.partitions));

    let connection = shared::broker::connect(&system.common.amqp_url, "poison test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let replies_queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = channel
        .basic_consume(
            replies_queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let unknown_version = json!({ "v": 99, "id": uuid::Uuid::new_v4(), "command": {} }).to_string();
    for payload in [
        b"\xff not json at all".to_vec(),
        unknown_version.into_bytes(),
    ] {
        channel
            .basic_publish(
                topology.commands_exchange().as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_reply_to(replies_queue.name().clone())
                    .with_correlation_id("poison".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut answers: Vec<CommandReply> = Vec::new();
    while answers.len() < 2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        // The replies of one batch to one reply queue come as one message.
        answers.extend(common::read_replies(&delivery).into_iter().map(
            |(correlation_id, reply)| {
                assert_eq!(correlation_id, "poison");
                reply
            },
        ));
    }
    assert_eq!(answers.len(), 2);
    for reply in answers {
        assert_eq!(reply.status, 500);
        assert_eq!(reply.body["code"], "command_dead_lettered");
    }

    // The partition is not blocked.
    assert_eq!(system.top_up(&token, 30).await.status, StatusCode::OK);

    // Both are archived with their reasons.
    let listing = loop {
        let reply = system.get("/v1/admin/dead-letters", Some(&admin)).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        if reply.body["items"]
            .as_array()
            .is_some_and(|items| items.len() == 2)
        {
            break reply.body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reasons: Vec<&str> = listing["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].starts_with("undecodable message"), "{reasons:?}");
    assert_eq!(reasons[1], "unknown command version 99");
    assert_eq!(listing["items"][0]["routingKey"], routing_key);

    // A dead letter that is a valid command (say, after a fix was deployed) applies on replay.
    let envelope = CommandEnvelope {
        v: COMMAND_VERSION,
        id: uuid::Uuid::new_v4(),
        principal: format!("player:{player_id}"),
        fingerprint: "replayed".to_string(),
        request_id: None,
        command: Command::TopUp {
            player_id,
            amount: 12,
        },
    };
    let parked: i64 = sqlx::query_scalar("INSERT INTO dead_letters (routing_key, reason, payload) VALUES ($1, 'test', $2) RETURNING id")
        .bind(&routing_key)
        .bind(serde_json::to_vec(&envelope).unwrap())
        .fetch_one(&system.pool)
        .await
        .unwrap();
    let reply = system
        .post(
            &format!("/v1/admin/dead-letters/{parked}/replay"),
            Some(&admin),
            None,
            json!({}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    system
        .eventually_balance(&token, |balance| balance["balance"] == 42)
        .await;
    let again = system
        .post(
            &format!("/v1/admin/dead-letters/{parked}/replay"),
            Some(&admin),
            None,
            json!({}),
        )
        .await;
    common::assert_error(&again, 409, "already_replayed");
    common::assert_error(
        &system
            .post(
                "/v1/admin/dead-letters/999999/replay",
                Some(&admin),
                None,
                json!({}),
            )
            .await,
        404,
        "unknown_dead_letter",
    );

    // Replaying real poison sends it back to the dead letters, and still blocks nothing.
    let first_id = listing["items"][0]["id"].as_i64().unwrap();
    assert_eq!(
        system
            .post(
                &format!("/v1/admin/dead-letters/{first_id}/replay"),
                Some(&admin),
                None,
                json!({})
            )
            .await
            .status,
        StatusCode::OK
    );
    for _ in 0..100 {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&system.pool)
            .await
            .unwrap();
        if count == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(
        count, 4,
        "the replayed poison came back as a new dead letter"
    );
    assert_eq!(system.top_up(&token, 1).await.body["balance"], 43);
    drop(connection.close(200, "done".into()).await);
    system.finish().await;
}
