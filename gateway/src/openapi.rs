//! The OpenAPI 3.1 document and the docs page.
//!
//! The document is generated from the code: every route of the API is registered through
//! `utoipa_axum::routes!` (see `lib.rs`), so a handler's `#[utoipa::path]` annotation is both its
//! route and its documentation; schemas come from the types the handlers and the workers
//! serialize. `GET /v1/openapi.json` serves it; `GET /docs` serves Swagger UI, whose assets are
//! embedded in the binary (utoipa-swagger-ui's `vendored` feature), so the page works without
//! internet access.

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use shared::results::ErrorBody;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, Modify, OpenApi, ToResponse};

/// Path of the document.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";
/// Path of the docs page.
pub const DOCS_PATH: &str = "/docs";

/// Security scheme of players' (and admins') bearer tokens from `POST /login`.
pub const PLAYER_TOKEN: &str = "playerToken";
/// Security scheme of game backends' API keys.
pub const API_KEY: &str = "apiKey";

/// The docs page may load only its own scripts, styles and images, and talk only to this
/// origin ("Try it out"). Swagger UI sets inline styles, hence `'unsafe-inline'` for styles
/// (never for scripts).
pub const DOCS_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const DESCRIPTION: &str = "\
A wallet and double-entry ledger for a game economy.

**Authentication.** Every credential goes in `Authorization: Bearer ...`: a player's token from \
`POST /login` (`playerToken`), or a game backend's API key `wk_<key id>_<secret>` (`apiKey`) with \
scopes `wallet:credit`, `wallet:debit`, `wallet:read`, `catalog:write`, `admin` (`admin` implies \
the others). Players act on their own wallet only; admin endpoints take an admin's token or a key \
with the `admin` scope.

**Commands** (signup, top-up, bonus, purchase, gift, reversal) are applied exactly once per \
`Idempotency-Key`: a retry with the same key and request gets the stored result (same status and \
body, `Idempotent-Replayed: true`); the same key with another request gets 422 \
`idempotency_key_reused`. Without the header the gateway makes a key and returns it in the \
`Idempotency-Key` response header. A command the worker did not answer in time is answered 202 \
with `Location: /v1/commands/{id}`; it is not lost, poll that URL.

**Errors** are JSON `{\"error\": \"<sentence>\", \"code\": \"<snake_case>\", \"request_id\": ...}` \
(schema `Error`). Any path not listed here answers 404 `not_found`, and a listed path answers a \
method it does not list with 405 `method_not_allowed`, both with that body. Money amounts are \
whole numbers (int64) in minor units, never fractions. Every response carries `X-Request-Id`.";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Game wallet",
        description = DESCRIPTION,
        license(name = "UNLICENSED"),
    ),
    tags(
        (name = "seed", description = "The seed's player endpoints (its web front end uses them unchanged)."),
        (name = "wallet", description = "Versioned commands and reads of players' wallets, for game backends (API keys) and players."),
        (name = "commands", description = "Status of commands."),
        (name = "catalog", description = "The items the shop sells."),
        (name = "admin", description = "Operator endpoints: audit, partitions, dead letters, overview."),
        (name = "operations", description = "Health, metrics, the ops page and this document."),
    ),
    components(
        schemas(
            ErrorBody,
            shared::results::Wallet,
            shared::results::SignupResult,
            shared::results::PurchaseResult,
            shared::results::GiftResult,
            shared::results::ReversalResult,
            shared::results::ReferrerBonusResult,
            shared::results::Gift,
            crate::routes::commands::Accepted,
        ),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            MethodNotAllowed,
            PayloadTooLarge,
            RateLimited,
            CommandFailed,
            Unavailable,
            crate::routes::commands::CommandAccepted,
        ),
    ),
    modifiers(&SecuritySchemes),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            PLAYER_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A player's token from `POST /login` (HS256 JWT), sent as \
                         `Authorization: Bearer <token>`. An admin is a player whose role is \
                         admin in the database.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("wk_<key id>_<secret>")
                    .description(Some(
                        "A game backend's API key, sent as `Authorization: Bearer wk_<key id>_<secret>`. \
                         Scopes: wallet:credit, wallet:debit, wallet:read, catalog:write, admin \
                         (admin implies every other scope).",
                    ))
                    .build(),
            ),
        );
    }
}

/// The optional `Idempotency-Key` request header of every command.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// 1 to 255 visible ASCII characters, chosen by the client; a retry with the same key is
    /// answered with the stored result. Generated (and returned) when missing.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, max_length = 255, min_length = 1)]
    pub idempotency_key: Option<String>,
}

/// The body is not valid JSON for this endpoint, or a header or parameter is malformed
/// (`invalid_body`).
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct BadRequest(ErrorBody);

/// No credentials, or a bad, expired or revoked token or key (`unauthorized`).
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct Unauthorized(ErrorBody);

/// The caller may not do this: another player's wallet, a key without the scope, a player where
/// an API key is needed, or not an admin (`forbidden`).
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct Forbidden(ErrorBody);

/// No such endpoint (`not_found`): the answer to any path this document does not list.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct NotFound(ErrorBody);

/// The path exists but does not accept this method (`method_not_allowed`).
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct MethodNotAllowed(ErrorBody);

/// The body is larger than the configured limit (`body_too_large`); the connection is closed.
#[derive(ToResponse)]
#[response(headers(("Connection" = String, description = "`close`")))]
#[allow(dead_code)]
pub struct PayloadTooLarge(ErrorBody);

/// Too many requests from this player, API key, username or address (`rate_limited`).
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
#[allow(dead_code)]
pub struct RateLimited(ErrorBody);

/// The command could not be applied and was set aside for an operator (`command_failed`, or
/// `command_dead_lettered`). Not a client error; retrying with the same key is safe.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct CommandFailed(ErrorBody);

/// A dependency is down or the gateway is saturated: `database_unavailable`,
/// `broker_unavailable`, `overloaded`, `books_not_ready`. Retry later (with the same
/// Idempotency-Key for commands). A request that exceeds the gateway's own time limit gets 503
/// with an empty body.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct Unavailable(ErrorBody);

/// The `result` of a stored command: the body the command answered with.
pub fn command_result_schema() -> RefOr<Schema> {
    let names = [
        "Wallet",
        "PurchaseResult",
        "GiftResult",
        "ReversalResult",
        "SignupResult",
        "ReferrerBonusResult",
        "Gift",
        "Error",
    ];
    let mut any_of = utoipa::openapi::schema::AnyOfBuilder::new().description(Some(
        "The body the command answered with: a wallet (top-up, bonus), a purchase, gift, \
         reversal or signup result, a referrer's bonus or a gift delivery (follow-ups), or an \
         Error for a rejected command.",
    ));
    for name in names {
        any_of = any_of.item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(name)));
    }
    RefOr::T(Schema::AnyOf(any_of.build()))
}

/// The document, generated once from the router's annotated handlers.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = crate::api_router().into_openapi();
    add_command_result_headers(&mut document);
    document
}

/// Every command (an operation that takes `Idempotency-Key`) answers its result with the same
/// three headers (`routes::commands::submit_as` sets them), so they are documented here once
/// for all of them rather than in each handler's annotation. A header a handler documents itself
/// (signup describes its command id differently) is kept.
fn add_command_result_headers(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};

    let string = || ObjectBuilder::new().schema_type(Type::String).build();
    let headers = [
        (
            "Idempotency-Key",
            string(),
            "The key used (generated when the request had none).",
        ),
        (
            "Idempotent-Replayed",
            string(),
            "`true` when this is the stored result of an earlier request.",
        ),
        (
            "X-Command-Id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
                .build(),
            "The command's id (the journal entry's id).",
        ),
    ];
    for item in document.paths.paths.values_mut() {
        for operation in [&mut item.post, &mut item.put, &mut item.patch]
            .into_iter()
            .flatten()
        {
            let takes_key = operation.parameters.iter().flatten().any(|parameter| {
                matches!(parameter, RefOr::T(parameter) if parameter.name == "Idempotency-Key")
            });
            if !takes_key {
                continue;
            }
            if let Some(RefOr::T(result)) = operation.responses.responses.get_mut("200") {
                for (name, schema, description) in &headers {
                    result
                        .headers
                        .entry((*name).to_string())
                        .or_insert_with(|| {
                            RefOr::T(
                                HeaderBuilder::new()
                                    .schema(Some(schema.clone()))
                                    .description(Some(*description))
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

static DOCUMENT_JSON: LazyLock<String> = LazyLock::new(|| {
    document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
});

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    summary = "This OpenAPI document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object),
    ),
)]
pub async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        DOCUMENT_JSON.as_str(),
    )
        .into_response()
}

/// `GET /docs`: Swagger UI for the document, every asset served from the binary.
pub fn docs_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let config = utoipa_swagger_ui::Config::new([OPENAPI_PATH])
        // "none": no badge image from an online validator.
        .validator_url("none")
        .try_it_out_enabled(true)
        .display_request_duration(true);
    let docs: Router<S> = utoipa_swagger_ui::SwaggerUi::new(DOCS_PATH)
        .config(config)
        .into();
    docs.layer(axum::middleware::map_response(
        |mut response: Response| async move {
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DOCS_CONTENT_SECURITY_POLICY),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", serde_json::Value::String(reference)) => found.push(reference),
                        _ => refs(value, found),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| refs(item, found)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_reference_resolves() {
        let document: serde_json::Value = serde_json::from_str(&DOCUMENT_JSON).unwrap();
        if let Ok(path) = std::env::var("OPENAPI_DUMP") {
            std::fs::write(path, DOCUMENT_JSON.as_bytes()).unwrap();
        }
        assert_eq!(document["openapi"], "3.1.0");
        let mut found = Vec::new();
        refs(&document, &mut found);
        assert!(!found.is_empty());
        for reference in found {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            assert!(
                document.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }
    }
}
