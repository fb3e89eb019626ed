//! The v1 API for game backends and players: API keys and scopes, commands, balances, history,
//! catalog, and the rate limits.

mod common;

use std::time::Duration;

use common::{Options, TestSystem, assert_error};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_act_within_their_scopes_and_players_on_their_own_wallet() {
    let system = TestSystem::start().await;
    let player = system.player("hero").await;
    let other = system.player("villain").await;
    let hero = system.player_id("hero").await;
    let villain = system.player_id("villain").await;
    let credit = system.api_key(&["wallet:credit", "wallet:read"]).await;
    let reader = system.api_key(&["wallet:read"]).await;
    let admin = system.api_key(&["admin"]).await;

    // A backend with wallet:credit tops up and grants bonuses to any player.
    let reply = system
        .post(
            &format!("/v1/players/{hero}/top-up"),
            Some(&credit),
            None,
            json!({ "amount": 100 }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 100);
    let reply = system
        .post(
            &format!("/v1/players/{hero}/bonus"),
            Some(&credit),
            Some("bonus-1"),
            json!({ "amount": 25, "reason": "daily login" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 125);
    let command_id = reply.header("x-command-id").unwrap().to_string();
    // Its keys are its own: the same key for another request (another player) is refused.
    let reused = system
        .post(
            &format!("/v1/players/{villain}/bonus"),
            Some(&credit),
            Some("bonus-1"),
            json!({ "amount": 25, "reason": "daily login" }),
        )
        .await;
    assert_error(&reused, 422, "idempotency_key_reused");
    // Without wallet:debit it cannot spend a player's GEMS.
    let reply = system
        .post(
            &format!("/v1/players/{hero}/purchase"),
            Some(&credit),
            None,
            json!({ "item": "gold_coin" }),
        )
        .await;
    assert_error(&reply, 403, "forbidden");

    // A read-only key reads every asset and nothing more.
    let reply = system
        .get(&format!("/v1/players/{hero}/balances"), Some(&reader))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balances"]["GEMS"], 125);
    assert_eq!(reply.body["username"], "hero");
    assert_error(
        &system
            .post(
                &format!("/v1/players/{hero}/top-up"),
                Some(&reader),
                None,
                json!({ "amount": 1 }),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &system
            .post(
                &format!("/v1/players/{hero}/bonus"),
                Some(&reader),
                None,
                json!({ "amount": 1 }),
            )
            .await,
        403,
        "forbidden",
    );

    // Command status: the key that sent it sees it; another key does not.
    let status = system
        .get(&format!("/v1/commands/{command_id}"), Some(&credit))
        .await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.body["kind"], "bonus");
    assert_error(
        &system
            .get(&format!("/v1/commands/{command_id}"), Some(&reader))
            .await,
        404,
        "unknown_command",
    );

    // Players act on their own wallet only, and cannot grant themselves bonuses.
    let reply = system
        .post(
            "/v1/players/me/purchase",
            Some(&player),
            None,
            json!({ "item": "gold_coin", "quantity": 2 }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 105);
    assert_error(
        &system
            .post(
                "/v1/players/me/bonus",
                Some(&player),
                None,
                json!({ "amount": 5 }),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &system
            .get(&format!("/v1/players/{villain}/balances"), Some(&player))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &system
            .get(&format!("/v1/players/{hero}/history"), Some(&other))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &system
            .post(
                &format!("/v1/players/{hero}/top-up"),
                Some(&other),
                None,
                json!({ "amount": 5 }),
            )
            .await,
        403,
        "forbidden",
    );

    // Bad, forged and revoked keys.
    assert_error(
        &system
            .get(&format!("/v1/players/{hero}/balances"), Some("wk_garbage"))
            .await,
        401,
        "unauthorized",
    );
    let (id, _) = reader.trim_start_matches("wk_").split_once('_').unwrap();
    let forged = format!("wk_{id}_{}", "0".repeat(64));
    assert_error(
        &system
            .get(&format!("/v1/players/{hero}/balances"), Some(&forged))
            .await,
        401,
        "unauthorized",
    );
    let doomed = system.api_key(&["wallet:read"]).await;
    let (doomed_id, _) = doomed.trim_start_matches("wk_").split_once('_').unwrap();
    assert!(
        gateway::api_keys::revoke(&system.pool, doomed_id.parse().unwrap())
            .await
            .unwrap()
    );
    assert_error(
        &system
            .get(&format!("/v1/players/{hero}/balances"), Some(&doomed))
            .await,
        401,
        "unauthorized",
    );

    // The admin scope opens the operator endpoints; other scopes do not.
    assert_eq!(
        system.get("/v1/admin/audit", Some(&admin)).await.status,
        StatusCode::OK
    );
    assert_error(
        &system.get("/v1/admin/audit", Some(&credit)).await,
        403,
        "forbidden",
    );
    // Unknown players and malformed ids.
    let nobody = uuid::Uuid::new_v4();
    assert_error(
        &system
            .get(&format!("/v1/players/{nobody}/balances"), Some(&reader))
            .await,
        404,
        "unknown_player",
    );
    assert_error(
        &system
            .get("/v1/players/not-an-id/balances", Some(&reader))
            .await,
        404,
        "unknown_player",
    );
    let reply = system
        .post(
            &format!("/v1/players/{nobody}/top-up"),
            Some(&credit),
            None,
            json!({ "amount": 5 }),
        )
        .await;
    assert_error(&reply, 404, "unknown_player");
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_filters() {
    let system = TestSystem::start().await;
    let token = system.player("historian").await;
    let player = system.player_id("historian").await;
    let credit = system.api_key(&["wallet:credit"]).await;
    system.top_up(&token, 100).await;
    for _ in 0..3 {
        assert_eq!(
            system
                .post(
                    "/purchase",
                    Some(&token),
                    None,
                    json!({ "item": "gold_coin" })
                )
                .await
                .status,
            StatusCode::OK
        );
    }
    system
        .post(
            &format!("/v1/players/{player}/bonus"),
            Some(&credit),
            None,
            json!({ "amount": 7, "reason": "event" }),
        )
        .await;

    // 1 top-up + 3 purchases × 2 player postings + 1 bonus = 8 postings, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(cursor) => format!("/v1/players/me/history?limit=3&cursor={cursor}"),
            None => "/v1/players/me/history?limit=3".to_string(),
        };
        let page = system.get(&path, Some(&token)).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        seen.extend(page.body["entries"].as_array().unwrap().clone());
        match page.body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 8);
    assert_eq!(seen[0]["kind"], "bonus");
    assert_eq!(seen[0]["details"]["reason"], "event");
    assert_eq!(seen.last().unwrap()["kind"], "top_up");
    let coins = system
        .get("/v1/players/me/history?asset=gold_coin", Some(&token))
        .await;
    let coins = coins.body["entries"].as_array().unwrap();
    assert_eq!(coins.len(), 3);
    assert!(
        coins
            .iter()
            .all(|entry| entry["asset"] == "GOLD_COIN" && entry["amount"] == 1)
    );
    let bonuses = system
        .get("/v1/players/me/history?kind=bonus", Some(&token))
        .await;
    assert_eq!(bonuses.body["entries"].as_array().unwrap().len(), 1);
    let future = system
        .get(
            "/v1/players/me/history?from=2999-01-01T00:00:00Z",
            Some(&token),
        )
        .await;
    assert_eq!(future.body["entries"].as_array().unwrap().len(), 0);
    assert_error(
        &system
            .get("/v1/players/me/history?limit=0", Some(&token))
            .await,
        422,
        "invalid_limit",
    );
    assert_error(
        &system
            .get("/v1/players/me/history?limit=101", Some(&token))
            .await,
        422,
        "invalid_limit",
    );
    assert_error(
        &system
            .get("/v1/players/me/history?cursor=abc", Some(&token))
            .await,
        422,
        "invalid_cursor",
    );

    let catalog = system.get("/v1/catalog", None).await;
    assert_eq!(catalog.status, StatusCode::OK);
    assert_eq!(
        catalog.body["items"],
        json!([
            { "item": "gold_coin", "asset": "GOLD_COIN", "priceAsset": "GEMS", "price": 10 },
            { "item": "treasure_box", "asset": "TREASURE_BOX", "priceAsset": "GEMS", "price": 50 },
        ])
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let system = TestSystem::start_with(Options {
        tune_gateway: |config| {
            config.rate_limit_player_per_second = 3;
            config.login_attempts_per_username_per_minute = 4;
        },
        ..Options::default()
    })
    .await;
    let token = system.player("eager").await; // one login attempt used
    let mut limited = None;
    for _ in 0..10 {
        let reply = system.get("/balance", Some(&token)).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("a burst past the per-player limit is refused");
    assert_error(&limited, 429, "rate_limited");
    assert!(
        limited
            .header("retry-after")
            .and_then(|value| value.parse::<u64>().ok())
            .is_some_and(|seconds| seconds >= 1)
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        system.get("/balance", Some(&token)).await.status,
        StatusCode::OK,
        "allowed again after waiting"
    );

    // Logins: 4 per minute per username, whether right or wrong.
    for _ in 0..3 {
        let reply = system
            .post(
                "/login",
                None,
                None,
                json!({ "username": "eager", "password": "wrong password" }),
            )
            .await;
        assert_error(&reply, 401, "unauthorized");
    }
    let reply = system
        .post(
            "/login",
            None,
            None,
            json!({ "username": "eager", "password": common::PASSWORD }),
        )
        .await;
    assert_error(&reply, 429, "rate_limited");
    assert!(reply.header("retry-after").is_some());
    // Another username from the same address is not affected.
    system.player("patient").await;
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_reach_the_receiver_once() {
    let system = TestSystem::start().await;
    let giver = system.player("giver").await;
    let receiver = system.player("receiver").await;
    let receiver_id = system.player_id("receiver").await;
    let giver_id = system.player_id("giver").await;
    system.top_up(&giver, 100).await;
    system
        .post(
            "/purchase",
            Some(&giver),
            None,
            json!({ "item": "gold_coin", "quantity": 2 }),
        )
        .await;

    let gift = json!({ "receiverId": receiver_id, "amount": 30 });
    let reply = system
        .post(
            "/v1/players/me/gifts",
            Some(&giver),
            Some("gift-1"),
            gift.clone(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 50);
    assert_eq!(reply.body["gift"]["status"], "sent");
    let retry = system
        .post("/v1/players/me/gifts", Some(&giver), Some("gift-1"), gift)
        .await;
    assert_eq!(retry.body, reply.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    system
        .eventually_balance(&receiver, |balance| balance["balance"] == 30)
        .await;

    let items = json!({ "receiverId": receiver_id, "asset": "GOLD_COIN", "amount": 1 });
    assert_eq!(
        system
            .post("/v1/players/me/gifts", Some(&giver), None, items)
            .await
            .status,
        StatusCode::OK
    );
    system
        .eventually_balance(&receiver, |balance| balance["inventory"]["goldCoins"] == 1)
        .await;

    assert_error(
        &system
            .post(
                "/v1/players/me/gifts",
                Some(&giver),
                None,
                json!({ "receiverId": receiver_id, "amount": 51 }),
            )
            .await,
        409,
        "insufficient_funds",
    );
    assert_error(
        &system
            .post(
                "/v1/players/me/gifts",
                Some(&giver),
                None,
                json!({ "receiverId": giver_id, "amount": 1 }),
            )
            .await,
        422,
        "invalid_receiver",
    );
    assert_error(
        &system
            .post(
                "/v1/players/me/gifts",
                Some(&giver),
                None,
                json!({ "receiverId": uuid::Uuid::new_v4(), "amount": 1 }),
            )
            .await,
        422,
        "invalid_receiver",
    );
    assert_error(
        &system
            .post(
                "/v1/players/me/gifts",
                Some(&giver),
                None,
                json!({ "receiverId": receiver_id, "asset": "DRAGON", "amount": 1 }),
            )
            .await,
        422,
        "unknown_asset",
    );
    assert_error(
        &system
            .post(
                "/v1/players/me/gifts",
                Some(&giver),
                None,
                json!({ "receiverId": receiver_id, "amount": 0 }),
            )
            .await,
        422,
        "invalid_amount",
    );
    assert_error(
        &system
            .post(
                &format!("/v1/players/{giver_id}/gifts"),
                Some(&receiver),
                None,
                json!({ "receiverId": receiver_id, "amount": 1 }),
            )
            .await,
        403,
        "forbidden",
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let receiver_balance = system.balance(&receiver).await;
    assert_eq!(receiver_balance["balance"], 30, "delivered exactly once");
    assert_eq!(system.balance(&giver).await["inventory"]["goldCoins"], 1);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_happen_once_and_never_overdraw() {
    let system = TestSystem::start().await;
    let token = system.player("reversed").await;
    let player = system.player("bystander").await;
    let admin = system.api_key(&["admin"]).await;

    let top_up = system.top_up(&token, 100).await;
    let top_up_journal = top_up.header("x-command-id").unwrap().to_string();
    let purchase = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "gold_coin", "quantity": 3 }),
        )
        .await;
    let purchase_journal = purchase.header("x-command-id").unwrap().to_string();
    assert_eq!(purchase.body["balance"], 70);

    // Reversing the purchase gives the GEMS back and takes the coins.
    let reply = system
        .post(
            &format!("/v1/journal/{purchase_journal}/reverse"),
            Some(&admin),
            None,
            json!({}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["balance"], 100);
    assert_eq!(reply.body["inventory"]["goldCoins"], 0);
    // Once per journal entry, whatever the key.
    let again = system
        .post(
            &format!("/v1/journal/{purchase_journal}/reverse"),
            Some(&admin),
            Some("another-key"),
            json!({}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(system.balance(&token).await["balance"], 100);

    // The player spends most of the top-up: reversing it now would overdraw, so 409.
    system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "treasure_box" }),
        )
        .await;
    let reply = system
        .post(
            &format!("/v1/journal/{top_up_journal}/reverse"),
            Some(&admin),
            None,
            json!({}),
        )
        .await;
    assert_error(&reply, 409, "insufficient_funds");
    assert_eq!(system.balance(&token).await["balance"], 50);

    // Reversals of reversals and of unknown entries are refused; players cannot reverse.
    let reversal_id = shared::ids::derived_id(purchase_journal.parse().unwrap(), "reversal");
    assert_error(
        &system
            .post(
                &format!("/v1/journal/{reversal_id}/reverse"),
                Some(&admin),
                None,
                json!({}),
            )
            .await,
        422,
        "not_reversible",
    );
    assert_error(
        &system
            .post(
                &format!("/v1/journal/{}/reverse", uuid::Uuid::new_v4()),
                Some(&admin),
                None,
                json!({}),
            )
            .await,
        404,
        "unknown_journal",
    );
    assert_error(
        &system
            .post(
                &format!("/v1/journal/{top_up_journal}/reverse"),
                Some(&player),
                None,
                json!({}),
            )
            .await,
        403,
        "forbidden",
    );
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_managed_and_history_keeps_old_prices() {
    let system = TestSystem::start().await;
    let token = system.player("shopper").await;
    let writer = system.api_key(&["catalog:write"]).await;
    let reader = system.api_key(&["wallet:read"]).await;
    system.top_up(&token, 200).await;

    let reply = system
        .post(
            "/v1/catalog",
            Some(&writer),
            None,
            json!({ "item": "magic_sword", "price": 30 }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_error(
        &system
            .post(
                "/v1/catalog",
                Some(&writer),
                None,
                json!({ "item": "magic_sword", "price": 30 }),
            )
            .await,
        409,
        "item_exists",
    );
    assert_error(
        &system
            .post(
                "/v1/catalog",
                Some(&reader),
                None,
                json!({ "item": "shield", "price": 30 }),
            )
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &system
            .post(
                "/v1/catalog",
                Some(&writer),
                None,
                json!({ "item": "shield", "price": -3 }),
            )
            .await,
        422,
        "invalid_price",
    );
    assert_error(
        &system
            .post(
                "/v1/catalog",
                Some(&writer),
                None,
                json!({ "item": "9lives", "price": 3 }),
            )
            .await,
        422,
        "invalid_item",
    );

    let bought = system
        .post(
            "/purchase",
            Some(&token),
            None,
            json!({ "item": "magic_sword" }),
        )
        .await;
    assert_eq!(bought.status, StatusCode::OK, "{:?}", bought.body);
    assert_eq!(bought.body["balance"], 170);
    assert_eq!(bought.body["inventory"]["magic_sword"], 1);

    let reply = system
        .request(
            reqwest::Method::PATCH,
            "/v1/catalog/magic_sword",
            Some(&writer),
            None,
            Some(json!({ "price": 40 })),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        system
            .post(
                "/purchase",
                Some(&token),
                None,
                json!({ "item": "magic_sword" })
            )
            .await
            .body["balance"],
        130
    );

    let reply = system
        .request(
            reqwest::Method::PATCH,
            "/v1/catalog/magic_sword",
            Some(&writer),
            None,
            Some(json!({ "active": false })),
        )
        .await;
    assert_eq!(reply.body["active"], false);
    assert_error(
        &system
            .post(
                "/purchase",
                Some(&token),
                None,
                json!({ "item": "magic_sword" }),
            )
            .await,
        422,
        "unknown_item",
    );
    let catalog = system.get("/v1/catalog", None).await;
    assert!(
        catalog.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|item| item["item"] != "magic_sword")
    );
    assert_error(
        &system
            .request(
                reqwest::Method::PATCH,
                "/v1/catalog/nothing",
                Some(&writer),
                None,
                Some(json!({ "price": 4 })),
            )
            .await,
        404,
        "unknown_item",
    );

    // Old entries keep the price they were applied with.
    let history = system
        .get(
            "/v1/players/me/history?kind=purchase&asset=GEMS",
            Some(&token),
        )
        .await;
    let prices: Vec<i64> = history.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["details"]["unit_price"].as_i64().unwrap())
        .collect();
    assert_eq!(prices, [40, 30]);
    system.finish().await;
}
