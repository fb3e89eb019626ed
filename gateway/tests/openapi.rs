//! The OpenAPI document and the docs page: the document is JSON, lists every route of the
//! contract and nothing else, every documented operation is routed (and its answers are
//! documented), the checker that `TestSystem::finish()` runs does catch mismatches, and the
//! docs page loads nothing from outside the gateway.

mod common;

use common::TestSystem;
use common::openapi_check::{Exchange, check};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every operation of the HTTP contract, as (method, path template).
const OPERATIONS: [(&str, &str); 25] = [
    ("get", "/health"),
    ("post", "/signup"),
    ("post", "/login"),
    ("get", "/balance"),
    ("post", "/top-up"),
    ("post", "/purchase"),
    ("get", "/v1/commands/{id}"),
    ("get", "/v1/catalog"),
    ("post", "/v1/catalog"),
    ("patch", "/v1/catalog/{item}"),
    ("post", "/v1/players/{player}/top-up"),
    ("post", "/v1/players/{player}/bonus"),
    ("post", "/v1/players/{player}/purchase"),
    ("post", "/v1/players/{player}/gifts"),
    ("get", "/v1/players/{player}/balances"),
    ("get", "/v1/players/{player}/history"),
    ("post", "/v1/journal/{journal}/reverse"),
    ("get", "/v1/admin/audit"),
    ("get", "/v1/admin/partitions"),
    ("get", "/v1/admin/dead-letters"),
    ("post", "/v1/admin/dead-letters/{id}/replay"),
    ("get", "/v1/admin/overview"),
    ("get", "/ops"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
];

fn documented_operations(document: &Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                operations.push((method.clone(), path.clone()));
            }
        }
    }
    operations.sort();
    operations
}

/// A concrete path for a template: every parameter gets a value of the right shape.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment {
            "{player}" => "me",
            "{item}" => "gold_coin",
            "{id}" if template.contains("dead-letters") => "1",
            _ if segment.starts_with('{') => "00000000-0000-0000-0000-000000000000",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_every_route_is_routed() {
    let system = TestSystem::start().await;
    let reply = system.get("/v1/openapi.json", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let document = reply.body;
    assert!(document.is_object(), "the document is JSON: {document:?}");
    assert_eq!(document["openapi"], "3.1.0");
    assert!(
        document["components"]["securitySchemes"]["playerToken"].is_object()
            && document["components"]["securitySchemes"]["apiKey"].is_object()
    );

    // Exactly the contract's operations.
    let mut expected: Vec<(String, String)> = OPERATIONS
        .iter()
        .map(|(method, path)| ((*method).to_string(), (*path).to_string()))
        .collect();
    expected.sort();
    assert_eq!(documented_operations(&document), expected);
    // Every route goes through utoipa_axum::routes!, which documents it; a plain `.route(` in
    // the router would be a route the document does not know.
    let router_source = include_str!("../src/lib.rs");
    assert!(
        !router_source.contains(".route("),
        "lib.rs registers a route outside routes!: document it and register it with routes!"
    );

    // Every documented operation is routed: asked without credentials and with an empty body,
    // it answers with something other than the router's fallbacks (and, since these requests
    // are recorded, `finish` checks that this answer is documented too).
    for (method, template) in OPERATIONS {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let path = concrete(template);
        let body = (method != Method::GET).then(|| json!({}));
        let reply = system
            .request(method.clone(), &path, None, None, body)
            .await;
        let fallback = (reply.status == StatusCode::NOT_FOUND && reply.body["code"] == "not_found")
            || reply.status == StatusCode::METHOD_NOT_ALLOWED;
        assert!(!fallback, "{method} {path} is not routed: {:?}", reply.body);
        assert!(
            reply.status != StatusCode::INTERNAL_SERVER_ERROR,
            "{method} {path}: {:?}",
            reply.body
        );
    }
    // A method a path does not list gets 405, a path the document does not list gets 404.
    for template in OPERATIONS.map(|(_, path)| path) {
        let reply = system
            .request(Method::DELETE, &concrete(template), None, None, None)
            .await;
        common::assert_error(&reply, 405, "method_not_allowed");
    }
    common::assert_error(&system.get("/v2/nothing", None).await, 404, "not_found");
    system.finish().await;
}

/// The checker `TestSystem::finish()` runs must fail on every kind of mismatch, or a green
/// suite would prove nothing.
#[test]
fn the_checker_catches_mismatches() {
    let document: Value =
        serde_json::from_str(&gateway::openapi::document().to_json().unwrap()).unwrap();
    let exchange = |method: &str, path: &str, status: u16, body: Value| Exchange {
        method: method.to_string(),
        path: path.to_string(),
        query: None,
        status,
        content_type: Some("application/json".to_string()),
        body: body.to_string(),
    };
    let wallet = json!({
        "username": "alice", "balance": 90, "referralCode": "0123456789AB", "version": 2,
        "inventory": { "goldCoins": 1, "treasureBoxes": 0, "magic_sword": 3 },
    });
    let error = json!({ "error": "no", "code": "insufficient_funds", "request_id": null, "balance": 1, "required": 5 });
    let good = [
        exchange("GET", "/balance", 200, wallet.clone()),
        exchange("POST", "/purchase", 409, error.clone()),
        exchange(
            "GET",
            "/nowhere",
            404,
            json!({ "error": "no such endpoint", "code": "not_found", "request_id": "r" }),
        ),
        exchange(
            "DELETE",
            "/balance",
            405,
            json!({ "error": "no", "code": "method_not_allowed", "request_id": "r" }),
        ),
    ];
    assert_eq!(check(&document, &good), Vec::<String>::new());

    let mut fraction = wallet.clone();
    fraction["balance"] = json!(1.5);
    let mut missing = wallet.clone();
    missing.as_object_mut().unwrap().remove("inventory");
    let mut bad_item = wallet.clone();
    bad_item["inventory"]["magic_sword"] = json!("three");
    let mut html = exchange("GET", "/balance", 200, wallet.clone());
    html.content_type = Some("text/html".to_string());
    let mut not_json = exchange("GET", "/balance", 200, wallet.clone());
    not_json.body = "{oops".to_string();
    let bad = [
        // A money amount with a fraction.
        exchange("GET", "/balance", 200, fraction),
        // A required field missing.
        exchange("GET", "/balance", 200, missing),
        // A map value of the wrong type.
        exchange("GET", "/balance", 200, bad_item),
        // An error body without its code.
        exchange(
            "POST",
            "/purchase",
            409,
            json!({ "error": "no", "request_id": null }),
        ),
        // A status the operation does not document.
        exchange("GET", "/v1/catalog", 418, json!({})),
        // A method the path does not document, answered as if it did.
        exchange("DELETE", "/balance", 200, wallet.clone()),
        // A path the document does not list, answered as if it existed.
        exchange("GET", "/v1/secret", 200, json!({})),
        // Another media type than documented.
        html,
        // A body that is not JSON.
        not_json,
    ];
    let failures = check(&document, &bad);
    assert_eq!(failures.len(), bad.len(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_works_without_internet_access() {
    let system = TestSystem::start().await;
    // Not an API route (not in the document): fetched outside the recorder.
    let page = system
        .client
        .get(format!("{}/docs", system.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.url().path(), "/docs/", "redirected to the page");
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(header("content-type").starts_with("text/html"));
    let policy = header("content-security-policy");
    assert!(
        policy.contains("default-src 'none'")
            && policy.contains("script-src 'self';")
            && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page refers to something outside the gateway: {html}"
    );

    // Every asset the page loads is relative and served by the gateway.
    let mut assets = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (index, _) in html.match_indices(attribute) {
            let rest = &html[index + attribute.len()..];
            assets.push(rest[..rest.find('"').unwrap()].to_string());
        }
    }
    assert!(assets.len() >= 4, "{assets:?}");
    for asset in &assets {
        assert!(!asset.contains(':') && !asset.starts_with("//"), "{asset}");
        let url = page_url(&system, asset);
        let response = system.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let text = String::from_utf8_lossy(&response.bytes().await.unwrap()).to_string();
        if asset.ends_with(".css") {
            assert!(
                !text.contains("url(http") && !text.contains("@import"),
                "{asset} loads something from outside"
            );
        }
        if asset.ends_with("swagger-initializer.js") {
            assert!(text.contains("/v1/openapi.json"), "{text}");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{text}"
            );
            // No badge image from the online validator.
            assert!(text.contains("\"validatorUrl\": \"none\""), "{text}");
        }
    }
    system.finish().await;
}

fn page_url(system: &TestSystem, asset: &str) -> String {
    let asset = asset.trim_start_matches("./");
    format!("{}/docs/{asset}", system.base_url)
}
