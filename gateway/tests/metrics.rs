//! The Prometheus series an operator relies on: commands by kind and outcome, queue depths,
//! batch sizes, partition ownership and the treasury lag. In tests every process runs in one
//! process with one recorder, so the gateway's `/metrics` shows the worker's and the treasury's
//! series too (in production each process serves its own on METRICS_ADDR).

mod common;

use std::time::Duration;

use common::TestSystem;
use reqwest::StatusCode;
use serde_json::json;

/// The value of the first series of `name` (with or without labels) whose labels include every
/// `labels` pair.
fn series_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The gateway's `/metrics` page, which answers 200.
async fn metrics_text(system: &TestSystem) -> String {
    let reply = system.get("/metrics", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.body.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_by_kind_and_queue_depths_are_exported() {
    let system = TestSystem::start().await;
    let token = system.player("metered").await;
    assert_eq!(system.top_up(&token, 100).await.status, StatusCode::OK);
    let reply = system.purchase(&token, "gold_coin").await;
    assert_eq!(reply.status, StatusCode::OK);
    let refused = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "treasure_box", "quantity": 2 }),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);

    let partition_queue = format!("{}wallet.commands.p0", system.common.queue_prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics_text(&system).await;
        let found = [
            series_value(
                &text,
                "wallet_commands_total",
                &[("kind", "top_up"), ("outcome", "applied")],
            ),
            series_value(
                &text,
                "wallet_commands_total",
                &[("kind", "purchase"), ("outcome", "applied")],
            ),
            series_value(
                &text,
                "wallet_commands_total",
                &[("kind", "purchase"), ("outcome", "rejected")],
            ),
            series_value(
                &text,
                "wallet_queue_messages",
                &[("queue", &partition_queue), ("kind", "partition")],
            ),
            series_value(
                &text,
                "wallet_queue_consumers",
                &[("queue", &partition_queue), ("kind", "partition")],
            ),
            series_value(&text, "wallet_batch_size_count", &[]),
            series_value(&text, "wallet_command_confirmed_seconds_count", &[]),
            series_value(&text, "wallet_command_replied_seconds_count", &[]),
            series_value(&text, "wallet_publish_confirm_seconds_count", &[]),
        ];
        if found.iter().all(Option::is_some) {
            // Counters are shared by the tests of this binary, so they are at least ours.
            assert!(found[0].unwrap_or_default() >= 1.0, "top-ups counted");
            assert!(found[1].unwrap_or_default() >= 1.0, "purchases counted");
            assert!(found[2].unwrap_or_default() >= 1.0, "refusals counted");
            // Three commands were answered, each after its message's confirm.
            assert!(found[6].unwrap_or_default() >= 3.0, "confirms timed");
            assert!(found[7].unwrap_or_default() >= 3.0, "replies timed");
            assert!(found[8].unwrap_or_default() >= 1.0, "messages timed");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "series missing from /metrics: {found:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    system.finish().await;
}

/// Purchases credit the treasury through `hot_credits`; the worker tells the treasury about them
/// with coalesced nudges, and the treasury folds them from those nudges (its sweep, which folds
/// only credits older than half a second, would otherwise be the only way they get folded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nudges_get_hot_credits_folded() {
    let system = TestSystem::start().await;
    let token = system.player("nudging").await;
    assert_eq!(system.top_up(&token, 1_000).await.status, StatusCode::OK);
    for _ in 0..3 {
        let reply = system.purchase(&token, "gold_coin").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let unfolded: i64 = sqlx::query_scalar("SELECT count(*) FROM hot_credits")
            .fetch_one(&system.pool)
            .await
            .expect("counting hot credits");
        let text = metrics_text(&system).await;
        let published = series_value(&text, "wallet_treasury_nudges_published_total", &[]);
        let folded = series_value(&text, "wallet_treasury_credits_folded_total", &[]);
        if unfolded == 0
            && published.is_some_and(|count| count >= 1.0)
            && folded.is_some_and(|count| count >= 1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "credits still unfolded: {unfolded}, nudges published: {published:?}, folded: {folded:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    system.finish().await;
}
