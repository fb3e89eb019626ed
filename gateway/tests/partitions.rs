//! Partition ownership: spread on start, handed over on SIGTERM, taken over after a crash,
//! visible to operators, with every command applied exactly once throughout.

mod common;

use std::time::Duration;

use common::{Options, TestSystem};
use reqwest::StatusCode;
use serde_json::json;

const PARTITIONS: u16 = 8;

fn count(owners: &[Option<String>], worker: &str) -> usize {
    owners
        .iter()
        .filter(|owner| owner.as_deref() == Some(worker))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_hand_over_and_survive_a_crash() {
    let system = TestSystem::start_with(Options {
        partitions: PARTITIONS,
        start_worker: false,
        ..Options::default()
    })
    .await;
    let first = system.spawn_worker("worker-a");
    // Signups go through the worker, so the first owner must be up before anyone exists.
    let admin = {
        let reply = system.signup("operator", None).await;
        assert_eq!(reply.body["status"], "Created");
        system.make_admin("operator").await
    };
    system
        .wait_owners(&admin, Duration::from_secs(10), |owners| {
            count(owners, "worker-a") == 8
        })
        .await;

    let players: Vec<String> = {
        let mut tokens = Vec::new();
        for index in 0..8 {
            tokens.push(system.player(&format!("player{index}")).await);
        }
        tokens
    };
    let top_up_all = |round: usize| {
        let system = &system;
        let players = &players;
        async move {
            for (index, token) in players.iter().enumerate() {
                let reply = system
                    .post(
                        "/top-up",
                        Some(token),
                        Some(&format!("round-{round}-{index}")),
                        json!({ "amount": 10 }),
                    )
                    .await;
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "round {round}: {:?}",
                    reply.body
                );
            }
        }
    };
    top_up_all(0).await;

    // A second worker: the partitions spread evenly within 10 s.
    let second = system.spawn_worker("worker-b");
    let took = system
        .wait_owners(&admin, Duration::from_secs(10), |owners| {
            count(owners, "worker-a") == 4 && count(owners, "worker-b") == 4
        })
        .await;
    eprintln!("spread over two workers in {took:?}");
    top_up_all(1).await;

    // SIGTERM: worker-b finishes its batch and hands its partitions to worker-a.
    second.terminate().await;
    system
        .wait_owners(&admin, Duration::from_secs(10), |owners| {
            count(owners, "worker-a") == 8
        })
        .await;
    top_up_all(2).await;

    // A third worker takes half, then crashes: its partitions are taken over within 10 s.
    let third = system.spawn_worker("worker-c");
    system
        .wait_owners(&admin, Duration::from_secs(10), |owners| {
            count(owners, "worker-c") == 4
        })
        .await;
    top_up_all(3).await;
    third.kill().await;
    let took = system
        .wait_owners(&admin, Duration::from_secs(10), |owners| {
            count(owners, "worker-a") == 8
        })
        .await;
    eprintln!("taken over after a crash in {took:?}");
    top_up_all(4).await;

    for token in &players {
        assert_eq!(
            system.balance(token).await["balance"],
            50,
            "five rounds of 10, each applied once"
        );
    }
    let metrics = system.get("/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().unwrap_or_default();
    assert!(
        text.contains("wallet_partition_owned"),
        "ownership metric exported"
    );
    assert!(
        text.contains("wallet_http_requests_total"),
        "request metric exported"
    );
    first.terminate().await;
    system.finish().await;
}
