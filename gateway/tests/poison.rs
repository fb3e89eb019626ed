//! Poison messages go to the dead-letter queue with the reason, are answered as errors, never
//! block their partition, and can be listed and replayed.

mod common;

use std::time::Duration;

use common::{DirectBroker, TestSystem};
use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::json;
use shared::broker::Topology;
use shared::partition::partition_of;
use shared::wire::{
    AddressedCommand, COMMAND_VERSION, COMMANDS_MESSAGE_TYPE, COMMANDS_VERSION, Command,
    CommandBatch, CommandEnvelope, CommandReply,
};

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

    let mut direct = DirectBroker::open(&system).await;
    let unknown_version = json!({ "v": 99, "id": uuid::Uuid::new_v4(), "command": {} }).to_string();
    for payload in [
        b"\xff not json at all".to_vec(),
        unknown_version.into_bytes(),
    ] {
        direct
            .publish(
                &routing_key,
                &payload,
                BasicProperties::default().with_correlation_id("poison".into()),
            )
            .await;
    }
    // The replies of one batch to one reply queue come as one message.
    let answers: Vec<CommandReply> = direct
        .replies(2)
        .await
        .into_iter()
        .map(|(correlation_id, reply)| {
            assert_eq!(correlation_id, "poison");
            reply
        })
        .collect();
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
    direct.close().await;
    system.finish().await;
}

/// A message from a gateway may carry several commands (`shared::wire::CommandBatch`): each is
/// applied and answered on its own, an unreadable one goes to the dead letters alone, and the
/// message delivered twice applies nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_messages_settle_each_command_on_its_own() {
    let system = TestSystem::start().await;
    let token = system.player("batched").await;
    let player_id = system.player_id("batched").await;
    let topology = Topology::from_config(&system.common);
    let routing_key = Topology::partition_routing_key(partition_of(player_id, topology.partitions));
    let mut direct = DirectBroker::open(&system).await;

    let top_up = |amount| {
        let envelope = CommandEnvelope {
            v: COMMAND_VERSION,
            id: uuid::Uuid::new_v4(),
            principal: format!("player:{player_id}"),
            fingerprint: format!("batched-{amount}"),
            request_id: None,
            command: Command::TopUp { player_id, amount },
        };
        serde_json::value::to_raw_value(&envelope).unwrap()
    };
    let (five, seven) = (top_up(5), top_up(7));
    let unreadable =
        serde_json::value::RawValue::from_string(r#"{"v":1,"id":"not a uuid"}"#.to_string())
            .unwrap();
    let message = CommandBatch {
        v: COMMANDS_VERSION,
        commands: vec![
            AddressedCommand {
                correlation_id: "five".into(),
                envelope: &five,
            },
            AddressedCommand {
                correlation_id: "unreadable".into(),
                envelope: &unreadable,
            },
            AddressedCommand {
                correlation_id: "seven".into(),
                envelope: &seven,
            },
        ],
    };
    let payload = serde_json::to_vec(&message).unwrap();
    let mut rounds = Vec::new();
    // The same message twice, as after a redelivery.
    for _ in 0..2 {
        direct
            .publish(
                &routing_key,
                &payload,
                BasicProperties::default().with_type(COMMANDS_MESSAGE_TYPE.into()),
            )
            .await;
        let mut answers = direct.replies(3).await;
        answers.sort_by(|left, right| left.0.cmp(&right.0));
        rounds.push(answers);
    }
    for (round, answers) in rounds.iter().enumerate() {
        let replay = round == 1;
        let by_id: Vec<(&str, u16, bool)> = answers
            .iter()
            .map(|(id, reply)| (id.as_str(), reply.status, reply.replay))
            .collect();
        assert_eq!(
            by_id,
            vec![
                ("five", 200, replay),
                ("seven", 200, replay),
                ("unreadable", 500, false)
            ],
            "round {round}"
        );
        assert_eq!(answers[2].1.body["code"], "command_dead_lettered");
    }
    // The first round's answers and the replayed ones are the same results.
    assert_eq!(rounds[0][0].1.body, rounds[1][0].1.body);
    assert_eq!(rounds[0][1].1.body, rounds[1][1].1.body);
    assert_eq!(
        system.balance(&token).await["balance"],
        12,
        "each command applied once"
    );

    // Only the unreadable command is set aside, once per delivery, as a message of its own.
    let parked: Vec<(String, Vec<u8>)> = loop {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT reason, payload FROM dead_letters ORDER BY id")
                .fetch_all(&system.pool)
                .await
                .unwrap();
        if rows.len() >= 2 {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(parked.len(), 2, "{parked:?}");
    for (reason, payload) in &parked {
        assert!(reason.starts_with("undecodable command"), "{reason}");
        assert_eq!(payload, unreadable.get().as_bytes());
    }
    direct.close().await;
    system.finish().await;
}
