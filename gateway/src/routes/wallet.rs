//! The seed's wallet endpoints: balance, top-up, purchase.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use shared::domain::{PURCHASE_QUANTITY_MAX, wallet_view};
use shared::results::{ErrorBody, PurchaseResult, Wallet};
use shared::wire::Command;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::openapi::{self, IdempotencyKeyHeader};
use crate::routes::commands::{CommandAccepted, IdempotencyKey, submit};
use crate::state::AppState;

/// A player's name and code with one of their accounts (none for a player without accounts).
type HoldingRow = (String, String, Option<String>, Option<i64>, Option<i64>);

/// The calling player's wallet
///
/// GEMS balance, items and referral code, read straight from PostgreSQL.
#[utoipa::path(
    get,
    path = "/balance",
    tag = "seed",
    responses(
        (status = 200, description = "The wallet.", body = Wallet),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, description = "The token's player does not exist (`unknown_player`).", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = [])),
)]
pub async fn balance(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Wallet>, ApiError> {
    let rows: Vec<HoldingRow> = sqlx::query_as(
        "SELECT u.username, u.referral_code, a.asset, a.balance, a.version
         FROM users u LEFT JOIN accounts a ON a.owner_id = u.id
         WHERE u.id = $1",
    )
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let Some((username, referral_code, ..)) = rows.first().cloned() else {
        return Err(ApiError::not_found("unknown_player", "no such player"));
    };
    let mut version = 0;
    let mut holdings = Vec::new();
    for (_, _, asset, balance, account_version) in rows {
        if let (Some(asset), Some(balance)) = (asset, balance) {
            if asset == shared::domain::GEMS {
                version = account_version.unwrap_or(0);
            }
            holdings.push((asset, balance));
        }
    }
    Ok(Json(wallet_view(
        &username,
        &referral_code,
        &holdings,
        version,
    )))
}

#[derive(Deserialize, ToSchema)]
pub struct TopUpBody {
    /// GEMS to credit: a whole number from 1 to the configured `TOP_UP_MAX` (1,000,000 by
    /// default); a string of digits is accepted too.
    #[schema(value_type = i64, minimum = 1, required = true)]
    pub amount: Option<Value>,
}

#[derive(Deserialize, ToSchema)]
pub struct PurchaseBody {
    /// A catalog item: `gold_coin`, `GOLD_COIN`, `goldCoin` and `Gold Coin` all name
    /// `gold_coin`.
    #[schema(required = true, max_length = 32, example = "gold_coin")]
    pub item: Option<String>,
    /// How many, 1 to 1,000 (default 1); a string of digits is accepted too.
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    pub quantity: Option<Value>,
}

/// A strictly positive whole number no larger than `max`, from a JSON number or a string of
/// digits (web forms often send numbers as strings). Fractions, signs and floats are refused.
pub fn positive_integer(value: &Value, max: i64) -> Option<i64> {
    let parsed = match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text)
            if !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            text.parse().ok()
        }
        _ => None,
    }?;
    (1..=max).contains(&parsed).then_some(parsed)
}

/// Accepts `gold_coin`, `GOLD_COIN`, `goldCoin` and `Gold Coin` for the catalog's `gold_coin`.
pub fn normalize_item(item: &str) -> String {
    let item = item.trim();
    let mixed_case = item.chars().any(|c| c.is_ascii_lowercase())
        && item.chars().any(|c| c.is_ascii_uppercase());
    let mut normalized = String::with_capacity(item.len() + 4);
    for (index, c) in item.chars().enumerate() {
        if c == ' ' || c == '-' {
            normalized.push('_');
        } else if mixed_case && c.is_ascii_uppercase() && index > 0 && !normalized.ends_with('_') {
            normalized.push('_');
            normalized.push(c.to_ascii_lowercase());
        } else {
            normalized.push(c.to_ascii_lowercase());
        }
    }
    normalized
}

/// Top up the calling player's GEMS
///
/// The treasury pays the player, up to the configured limit per request.
#[utoipa::path(
    post,
    path = "/top-up",
    tag = "seed",
    params(IdempotencyKeyHeader),
    request_body = TopUpBody,
    responses(
        (status = 200, description = "The new wallet.", body = Wallet),
        (status = 202, response = CommandAccepted),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, description = "The token's player does not exist (`unknown_player`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_amount`, `balance_limit_exceeded`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = [])),
)]
pub async fn top_up(
    State(state): State<AppState>,
    principal: Principal,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<TopUpBody>,
) -> Result<Response, ApiError> {
    let player_id = principal.user_id;
    submit_top_up(&state, principal.command_principal(), player_id, key, body).await
}

/// Validates a top-up and submits it; shared by `/top-up` and `/v1/players/{id}/top-up`.
pub async fn submit_top_up(
    state: &AppState,
    principal: String,
    player_id: uuid::Uuid,
    key: IdempotencyKey,
    body: TopUpBody,
) -> Result<Response, ApiError> {
    let amount = valid_amount(state, body.amount.as_ref())?;
    submit(
        state,
        key,
        principal,
        &[&player_id.to_string(), &amount.to_string()],
        |_| Command::TopUp { player_id, amount },
    )
    .await
}

/// A credit amount from 1 to `TOP_UP_MAX`, or 422 `invalid_amount`.
pub fn valid_amount(state: &AppState, amount: Option<&Value>) -> Result<i64, ApiError> {
    let top_up_max = state.config.top_up_max;
    amount
        .and_then(|amount| positive_integer(amount, top_up_max))
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_amount",
                format!("amount must be a whole number from 1 to {top_up_max}"),
            )
        })
}

/// Buy an item
///
/// Buys `quantity` (default 1) of an item from the shop at its catalog price.
#[utoipa::path(
    post,
    path = "/purchase",
    tag = "seed",
    params(IdempotencyKeyHeader),
    request_body = PurchaseBody,
    responses(
        (status = 200, description = "The new wallet and what was bought.", body = PurchaseResult),
        (status = 202, response = CommandAccepted),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, description = "The token's player does not exist (`unknown_player`).", body = ErrorBody),
        (status = 409, description = "Not enough GEMS (`insufficient_funds`, with `balance` and `required`); nothing moved.", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`unknown_item`, `invalid_quantity`, `balance_limit_exceeded`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = [])),
)]
pub async fn purchase(
    State(state): State<AppState>,
    principal: Principal,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<PurchaseBody>,
) -> Result<Response, ApiError> {
    let player_id = principal.user_id;
    submit_purchase(&state, principal.command_principal(), player_id, key, body).await
}

/// Validates a purchase and submits it; shared by `/purchase` and `/v1/players/{id}/purchase`.
pub async fn submit_purchase(
    state: &AppState,
    principal: String,
    player_id: uuid::Uuid,
    key: IdempotencyKey,
    body: PurchaseBody,
) -> Result<Response, ApiError> {
    let item = body
        .item
        .as_deref()
        .map(normalize_item)
        .filter(|item| !item.is_empty() && item.len() <= 32)
        .ok_or_else(|| {
            ApiError::unprocessable("unknown_item", "item must name an item of the shop")
        })?;
    let quantity = match &body.quantity {
        None | Some(Value::Null) => 1,
        Some(value) => positive_integer(value, PURCHASE_QUANTITY_MAX).ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_quantity",
                format!("quantity must be a whole number from 1 to {PURCHASE_QUANTITY_MAX}"),
            )
        })?,
    };
    let fields = [player_id.to_string(), item.clone(), quantity.to_string()];
    submit(
        state,
        key,
        principal,
        &[&fields[0], &fields[1], &fields[2]],
        |_| Command::Purchase {
            player_id,
            item,
            quantity,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_positive_whole_numbers() {
        assert_eq!(positive_integer(&json!(5), 10), Some(5));
        assert_eq!(positive_integer(&json!("7"), 10), Some(7));
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(11),
            json!("1e3"),
            json!("-2"),
            json!(""),
            json!(null),
            json!(true),
            json!("99999999999999999999"),
        ] {
            assert_eq!(positive_integer(&bad, 10), None, "{bad}");
        }
    }

    #[test]
    fn item_names_normalize() {
        for name in [
            "gold_coin",
            "GOLD_COIN",
            "goldCoin",
            "Gold Coin",
            " gold-coin ",
        ] {
            assert_eq!(normalize_item(name), "gold_coin", "{name}");
        }
        assert_eq!(normalize_item("treasureBox"), "treasure_box");
    }
}
