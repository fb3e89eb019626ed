//! Every bad input of the contract is answered with its status and code, never a 500.

mod common;

use common::{TestSystem, assert_error};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_values_get_their_codes() {
    let system = TestSystem::start().await;
    let token = system.player("careful").await;
    system.top_up(&token, 1_000).await;

    let raw = |path: &'static str, body: &'static str| {
        let system = &system;
        let token = token.clone();
        async move {
            let reply = system
                .send(
                    system
                        .client
                        .post(format!("{}{path}", system.base_url))
                        .bearer_auth(token)
                        .header("content-type", "application/json")
                        .body(body),
                )
                .await;
            assert!(reply.body.is_object(), "a JSON body: {:?}", reply.body);
            reply
        }
    };
    assert_error(&raw("/top-up", "{not json").await, 400, "invalid_body");
    assert_error(&raw("/top-up", "").await, 400, "invalid_body");
    assert_error(&raw("/purchase", "[1,2]").await, 400, "invalid_body");
    assert_error(
        &raw("/signup", r#"{"username": 5}"#).await,
        400,
        "invalid_body",
    );

    let amounts = [
        json!(null),
        json!(0),
        json!(-5),
        json!(1.5),
        json!("abc"),
        json!(1_000_001),
        json!(i64::MAX),
        json!(true),
        json!({}),
    ];
    for amount in amounts {
        let reply = system
            .post("/top-up", Some(&token), None, json!({ "amount": amount }))
            .await;
        assert_error(&reply, 422, "invalid_amount");
    }
    assert_error(
        &system.post("/top-up", Some(&token), None, json!({})).await,
        422,
        "invalid_amount",
    );
    for quantity in [json!(0), json!(-1), json!(1_001), json!(2.5), json!("x")] {
        let reply = system
            .post(
                "/purchase",
                Some(&token),
                None,
                json!({ "item": "gold_coin", "quantity": quantity }),
            )
            .await;
        assert_error(&reply, 422, "invalid_quantity");
    }
    assert_error(
        &system
            .post("/purchase", Some(&token), None, json!({}))
            .await,
        422,
        "unknown_item",
    );
    assert_error(
        &system
            .post(
                "/purchase",
                Some(&token),
                None,
                json!({ "item": "x".repeat(40) }),
            )
            .await,
        422,
        "unknown_item",
    );

    // Bodies past the limit are refused before they are read.
    // The connection is closed after it, since the unread rest of the body makes it unusable.
    let huge = json!({ "amount": 5, "padding": "x".repeat(64 * 1024) });
    let reply = system.post("/top-up", Some(&token), None, huge).await;
    assert_error(&reply, 413, "body_too_large");
    assert_eq!(
        reply
            .headers
            .get("connection")
            .and_then(|value| value.to_str().ok()),
        Some("close")
    );

    // Idempotency keys are bounded and printable.
    let long_key = "k".repeat(300);
    assert_error(
        &system
            .post(
                "/top-up",
                Some(&token),
                Some(&long_key),
                json!({ "amount": 5 }),
            )
            .await,
        400,
        "invalid_body",
    );

    // Signup rules.
    for username in [
        "ab",
        "x".repeat(33).as_str(),
        "bad name",
        "semi;colon",
        "émile",
    ] {
        let reply = system
            .post(
                "/signup",
                None,
                None,
                json!({ "username": username, "password": common::PASSWORD }),
            )
            .await;
        assert_error(&reply, 422, "invalid_username");
    }
    let reply = system
        .post(
            "/signup",
            None,
            None,
            json!({ "username": "shortpass", "password": "1234567" }),
        )
        .await;
    assert_error(&reply, 422, "invalid_password");
    let reply = system.post("/signup", None, None, json!({ "username": "badcode", "password": common::PASSWORD, "referralCode": "<script>" })).await;
    assert_error(&reply, 422, "unknown_referral_code");

    // Unknown routes and methods.
    assert_error(&system.get("/nope", None).await, 404, "not_found");
    assert_error(
        &system.get("/top-up", Some(&token)).await,
        405,
        "method_not_allowed",
    );

    // Nothing above moved money.
    assert_eq!(system.balance(&token).await["balance"], 1_000);
    system.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_401() {
    let system = TestSystem::start().await;
    let token = system.player("guarded").await;
    let user_id = system.balance(&token).await;
    assert_eq!(user_id["username"], "guarded");

    assert_error(&system.get("/balance", None).await, 401, "unauthorized");
    assert_error(
        &system.get("/balance", Some("not-a-token")).await,
        401,
        "unauthorized",
    );
    let reply = system
        .post("/top-up", None, None, json!({ "amount": 5 }))
        .await;
    assert_error(&reply, 401, "unauthorized");

    // A tampered token: flip a character of the signature.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_error(
        &system.get("/balance", Some(&tampered)).await,
        401,
        "unauthorized",
    );

    let sub: uuid::Uuid = sqlx::query_scalar("SELECT id FROM users WHERE username = 'guarded'")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let claims =
        json!({ "sub": sub, "name": "guarded", "role": "admin", "iat": now, "exp": now + 600 });
    // Signed with another secret.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"another secret entirely"),
    )
    .unwrap();
    assert_error(
        &system.get("/balance", Some(&forged)).await,
        401,
        "unauthorized",
    );
    // Another algorithm with the right secret.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert_error(
        &system.get("/balance", Some(&hs512)).await,
        401,
        "unauthorized",
    );
    // alg: none.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        engine.encode(br#"{"alg":"none","typ":"JWT"}"#),
        engine.encode(claims.to_string())
    );
    assert_error(
        &system.get("/balance", Some(&unsigned)).await,
        401,
        "unauthorized",
    );
    // Expired.
    let expired_claims = json!({ "sub": sub, "name": "guarded", "role": "player", "iat": now - 100_000, "exp": now - 10 });
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &expired_claims,
        &EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert_error(
        &system.get("/balance", Some(&expired)).await,
        401,
        "unauthorized",
    );
    // A role claimed in a token does not make an admin: the database decides.
    let self_made_admin = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert_error(
        &system.get("/v1/admin/audit", Some(&self_made_admin)).await,
        403,
        "forbidden",
    );

    // Wrong passwords and unknown users look the same.
    let reply = system
        .post(
            "/login",
            None,
            None,
            json!({ "username": "guarded", "password": "wrong password" }),
        )
        .await;
    assert_error(&reply, 401, "unauthorized");
    let reply = system
        .post(
            "/login",
            None,
            None,
            json!({ "username": "ghost", "password": "wrong password" }),
        )
        .await;
    assert_error(&reply, 401, "unauthorized");
    assert_eq!(system.balance(&token).await["username"], "guarded");
    system.finish().await;
}
