//! The versioned API for game backends (API keys with scopes) and players (their own wallet).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::results::{ErrorBody, GiftResult, PurchaseResult, ReversalResult, Wallet};
use shared::wire::Command;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Caller;
use crate::body::{JsonBody, QueryParams};
use crate::error::ApiError;
use crate::openapi::{self, IdempotencyKeyHeader};
use crate::routes::commands::{CommandAccepted, IdempotencyKey, submit};
use crate::routes::wallet::{
    PurchaseBody, TopUpBody, submit_purchase, submit_top_up, valid_amount,
};
use crate::state::AppState;

/// Most history entries one page returns.
pub const HISTORY_PAGE_MAX: i64 = 100;
/// Longest bonus reason kept.
pub const BONUS_REASON_LENGTH_MAX: usize = 200;

/// `{player}` is a player id, or `me` for the calling player.
fn player_id(caller: &Caller, player: &str) -> Result<Uuid, ApiError> {
    match (player, caller) {
        ("me", Caller::Player(principal)) => Ok(principal.user_id),
        ("me", Caller::Key(_)) => Err(ApiError::BadRequest(
            "an API key must name the player by id".to_string(),
        )),
        (id, _) => id
            .parse()
            .map_err(|_| ApiError::not_found("unknown_player", "no such player")),
    }
}

/// Top up a player's GEMS
///
/// The treasury pays the player. API keys need `wallet:credit`; a player may top up their own
/// wallet.
#[utoipa::path(
    post,
    path = "/v1/players/{player}/top-up",
    tag = "wallet",
    params(("player" = String, Path, description = "A player id, or `me` for the calling player (players only)."), IdempotencyKeyHeader),
    request_body = TopUpBody,
    responses(
        (status = 200, description = "The player's new wallet.", body = Wallet),
        (status = 202, response = CommandAccepted),
        (status = 400, description = "The body is not valid JSON for this endpoint, the Idempotency-Key is malformed, or an API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such player (`unknown_player`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_amount`, `balance_limit_exceeded`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["wallet:credit"])),
)]
pub async fn top_up(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<TopUpBody>,
) -> Result<Response, ApiError> {
    let player_id = player_id(&caller, &player)?;
    caller.authorize(player_id, "wallet:credit")?;
    submit_top_up(&state, caller.command_principal(), player_id, key, body).await
}

#[derive(Deserialize, ToSchema)]
pub struct BonusBody {
    /// GEMS to grant: a whole number from 1 to `TOP_UP_MAX`; a string of digits is accepted too.
    #[schema(value_type = i64, minimum = 1, required = true)]
    amount: Option<Value>,
    /// Why, kept in the journal entry (at most 200 characters).
    #[serde(default)]
    #[schema(max_length = 200)]
    reason: Option<String>,
}

/// Grant a player a bonus
///
/// The treasury pays the player. API keys with `wallet:credit` only: players cannot grant
/// themselves bonuses.
#[utoipa::path(
    post,
    path = "/v1/players/{player}/bonus",
    tag = "wallet",
    params(("player" = Uuid, Path, description = "The player id."), IdempotencyKeyHeader),
    request_body = BonusBody,
    responses(
        (status = 200, description = "The player's new wallet.", body = Wallet),
        (status = 202, response = CommandAccepted),
        (status = 400, description = "The body is not valid JSON for this endpoint, the Idempotency-Key is malformed, or an API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such player (`unknown_player`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_amount`, `invalid_reason`, `balance_limit_exceeded`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("apiKey" = ["wallet:credit"])),
)]
pub async fn grant_bonus(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<BonusBody>,
) -> Result<Response, ApiError> {
    caller.require_key_scope("wallet:credit")?;
    let player_id = player_id(&caller, &player)?;
    let amount = valid_amount(&state, body.amount.as_ref())?;
    let reason = body.reason.unwrap_or_default();
    if reason.chars().count() > BONUS_REASON_LENGTH_MAX {
        return Err(ApiError::unprocessable(
            "invalid_reason",
            format!("reason must be at most {BONUS_REASON_LENGTH_MAX} characters"),
        ));
    }
    let fields = [player_id.to_string(), amount.to_string(), reason.clone()];
    submit(
        &state,
        key,
        caller.command_principal(),
        &[&fields[0], &fields[1], &fields[2]],
        |_| Command::GrantBonus {
            player_id,
            amount,
            reason,
        },
    )
    .await
}

/// Buy an item for a player
///
/// The player pays the catalog price in GEMS and receives the item. API keys need
/// `wallet:debit`; a player may buy for their own wallet.
#[utoipa::path(
    post,
    path = "/v1/players/{player}/purchase",
    tag = "wallet",
    params(("player" = String, Path, description = "A player id, or `me` for the calling player (players only)."), IdempotencyKeyHeader),
    request_body = PurchaseBody,
    responses(
        (status = 200, description = "The player's new wallet and what was bought.", body = PurchaseResult),
        (status = 202, response = CommandAccepted),
        (status = 400, description = "The body is not valid JSON for this endpoint, the Idempotency-Key is malformed, or an API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such player (`unknown_player`).", body = ErrorBody),
        (status = 409, description = "Not enough GEMS (`insufficient_funds`, with `balance` and `required`); nothing moved.", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`unknown_item`, `invalid_quantity`, `balance_limit_exceeded`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["wallet:debit"])),
)]
pub async fn purchase(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<PurchaseBody>,
) -> Result<Response, ApiError> {
    let player_id = player_id(&caller, &player)?;
    caller.authorize(player_id, "wallet:debit")?;
    submit_purchase(&state, caller.command_principal(), player_id, key, body).await
}

/// A player's name with one account's asset, balance and version (none without accounts).
type BalanceRow = (String, Option<String>, Option<i64>, Option<i64>);

/// Every asset a player holds.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlayerBalances {
    pub player_id: Uuid,
    pub username: String,
    /// Balance per asset (`GEMS` always, then every asset the player has an account in).
    pub balances: BTreeMap<String, i64>,
    /// Version per asset account: grows by one with every change of its balance.
    pub versions: BTreeMap<String, i64>,
}

/// A player's balances of every asset
///
/// API keys need `wallet:read`; a player may read their own.
#[utoipa::path(
    get,
    path = "/v1/players/{player}/balances",
    tag = "wallet",
    params(("player" = String, Path, description = "A player id, or `me` for the calling player (players only).")),
    responses(
        (status = 200, description = "The balances.", body = PlayerBalances),
        (status = 400, description = "An API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such player (`unknown_player`).", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["wallet:read"])),
)]
pub async fn balances(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
) -> Result<Json<PlayerBalances>, ApiError> {
    let player_id = player_id(&caller, &player)?;
    caller.authorize(player_id, "wallet:read")?;
    let rows: Vec<BalanceRow> = sqlx::query_as(
        "SELECT u.username, a.asset, a.balance, a.version
         FROM users u LEFT JOIN accounts a ON a.owner_id = u.id
         WHERE u.id = $1 ORDER BY a.asset",
    )
    .bind(player_id)
    .fetch_all(&state.pool)
    .await?;
    let Some((username, ..)) = rows.first().cloned() else {
        return Err(ApiError::not_found("unknown_player", "no such player"));
    };
    let mut balances = BTreeMap::from([(shared::domain::GEMS.to_string(), 0)]);
    let mut versions = BTreeMap::new();
    for (_, asset, balance, version) in rows {
        if let (Some(asset), Some(balance), Some(version)) = (asset, balance, version) {
            balances.insert(asset.clone(), balance);
            versions.insert(asset, version);
        }
    }
    Ok(Json(PlayerBalances {
        player_id,
        username,
        balances,
        versions,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Entries per page, 1 to 100 (default 50).
    #[serde(default)]
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
    /// Only postings of this asset (case-insensitive): `GEMS`, `GOLD_COIN`, ...
    #[serde(default)]
    asset: Option<String>,
    /// Only journal entries of this kind: `top_up`, `bonus`, `purchase`, `gift`,
    /// `gift_delivery`, `referral_bonus`, `reversal`.
    #[serde(default)]
    kind: Option<String>,
    /// RFC 3339; entries at or after this instant.
    #[serde(default)]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// RFC 3339; entries before this instant.
    #[serde(default)]
    to: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    posting_id: i64,
    journal_id: Uuid,
    kind: String,
    created_at: chrono::DateTime<chrono::Utc>,
    asset: String,
    amount: i64,
    details: sqlx::types::Json<Value>,
}

/// One posting of the player's, with its journal entry.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The journal entry (= the command's id).
    pub journal_id: Uuid,
    /// `top_up`, `bonus`, `purchase`, `gift`, `gift_delivery`, `referral_bonus`, `reversal`.
    pub kind: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub asset: String,
    /// Signed: positive when the player received, negative when they paid.
    pub amount: i64,
    /// What the entry records, per kind (a purchase's `item`, `quantity`, `unit_price`, ...).
    #[schema(value_type = Object)]
    pub details: Value,
}

/// A page of history, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// A player's history
///
/// The player's postings with their journal entries, newest first, with cursor pagination and
/// filters. API keys need `wallet:read`; a player may read their own.
#[utoipa::path(
    get,
    path = "/v1/players/{player}/history",
    tag = "wallet",
    params(("player" = String, Path, description = "A player id, or `me` for the calling player (players only)."), HistoryQuery),
    responses(
        (status = 200, description = "A page of history.", body = HistoryPage),
        (status = 400, description = "A malformed query parameter (`from`, `to`, `limit`), or an API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "Malformed player id (`unknown_player`).", body = ErrorBody),
        (status = 422, description = "`invalid_limit`, `invalid_cursor`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["wallet:read"])),
)]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    QueryParams(query): QueryParams<HistoryQuery>,
) -> Result<Json<HistoryPage>, ApiError> {
    let player_id = player_id(&caller, &player)?;
    caller.authorize(player_id, "wallet:read")?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=HISTORY_PAGE_MAX).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            format!("limit must be from 1 to {HISTORY_PAGE_MAX}"),
        ));
    }
    let before: Option<i64> =
        match query.cursor.as_deref() {
            None | Some("") => None,
            Some(cursor) => Some(cursor.parse().ok().filter(|id: &i64| *id > 0).ok_or_else(
                || {
                    ApiError::unprocessable(
                        "invalid_cursor",
                        "cursor must be a nextCursor from an earlier page",
                    )
                },
            )?),
        };
    let rows: Vec<HistoryRow> = sqlx::query_as(
        "SELECT p.id AS posting_id, p.journal_id, j.kind, j.created_at, p.asset, p.amount, j.details
         FROM accounts a
         JOIN postings p ON p.account_id = a.id
         JOIN journal_entries j ON j.id = p.journal_id
         WHERE a.owner_id = $1
           AND ($2::bigint IS NULL OR p.id < $2)
           AND ($3::text IS NULL OR p.asset = $3)
           AND ($4::text IS NULL OR j.kind = $4)
           AND ($5::timestamptz IS NULL OR j.created_at >= $5)
           AND ($6::timestamptz IS NULL OR j.created_at < $6)
         ORDER BY p.id DESC
         LIMIT $7",
    )
    .bind(player_id)
    .bind(before)
    .bind(query.asset.as_deref().map(str::to_uppercase))
    .bind(query.kind.as_deref())
    .bind(query.from)
    .bind(query.to)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|row| row.posting_id.to_string()))
        .flatten();
    let entries = rows
        .into_iter()
        .map(|row| HistoryEntry {
            journal_id: row.journal_id,
            kind: row.kind,
            created_at: row.created_at,
            asset: row.asset,
            amount: row.amount,
            details: row.details.0,
        })
        .collect();
    Ok(Json(HistoryPage {
        entries,
        next_cursor,
    }))
}

/// An item the shop sells.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatalogItem {
    /// Catalog name (`gold_coin`).
    pub item: String,
    /// The asset the buyer receives (`GOLD_COIN`).
    pub asset: String,
    /// The asset the price is paid in (`GEMS`).
    pub price_asset: String,
    pub price: i64,
}

/// The items the shop sells.
#[derive(Serialize, ToSchema)]
pub struct Catalog {
    pub items: Vec<CatalogItem>,
}

/// An item of the catalog, active or retired.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CatalogEntry {
    pub item: String,
    pub asset: String,
    pub price_asset: String,
    pub price: i64,
    /// False once retired: it can no longer be bought.
    pub active: bool,
}

/// The shop's catalog
///
/// The items the shop sells, with their prices. Public.
#[utoipa::path(
    get,
    path = "/v1/catalog",
    tag = "catalog",
    responses(
        (status = 200, description = "The active items, by name.", body = Catalog),
        (status = 503, response = openapi::Unavailable),
    ),
)]
pub async fn catalog(State(state): State<AppState>) -> Result<Json<Catalog>, ApiError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT item, asset, price_asset, price FROM items WHERE active ORDER BY item",
    )
    .fetch_all(&state.pool)
    .await?;
    let items = rows
        .into_iter()
        .map(|(item, asset, price_asset, price)| CatalogItem {
            item,
            asset,
            price_asset,
            price,
        })
        .collect();
    Ok(Json(Catalog { items }))
}

/// Largest amount one gift may move.
pub const GIFT_AMOUNT_MAX: i64 = 1_000_000_000;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GiftBody {
    /// Another existing player's id.
    #[schema(value_type = Uuid, required = true)]
    receiver_id: Option<String>,
    /// `GEMS` (default) or an item asset such as `GOLD_COIN` (case-insensitive).
    #[serde(default)]
    asset: Option<String>,
    /// A whole number from 1 to 1,000,000,000; a string of digits is accepted too.
    #[schema(value_type = i64, minimum = 1, maximum = 1_000_000_000, required = true)]
    amount: Option<Value>,
}

/// Give GEMS or items to another player
///
/// Atomic for the giver; the receiver gets it through a follow-up command in the receiver's
/// partition (usually within milliseconds). API keys need `wallet:debit`; a player may give from
/// their own wallet.
#[utoipa::path(
    post,
    path = "/v1/players/{player}/gifts",
    tag = "wallet",
    params(("player" = String, Path, description = "A player id, or `me` for the calling player (players only)."), IdempotencyKeyHeader),
    request_body = GiftBody,
    responses(
        (status = 200, description = "The giver's new wallet and the gift, on its way.", body = GiftResult),
        (status = 202, response = CommandAccepted),
        (status = 400, description = "The body is not valid JSON for this endpoint, the Idempotency-Key is malformed, or an API key named the player `me` (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such giver (`unknown_player`).", body = ErrorBody),
        (status = 409, description = "The giver does not hold enough (`insufficient_funds`, with `balance` and `required`); nothing moved.", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_receiver` (not another existing player), `unknown_asset`, `invalid_amount`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["wallet:debit"])),
)]
pub async fn gift(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<GiftBody>,
) -> Result<Response, ApiError> {
    let giver_id = player_id(&caller, &player)?;
    caller.authorize(giver_id, "wallet:debit")?;
    let receiver_id: Uuid = body
        .receiver_id
        .as_deref()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            ApiError::unprocessable("invalid_receiver", "receiverId must be a player id")
        })?;
    let asset = body
        .asset
        .unwrap_or_else(|| shared::domain::GEMS.to_string())
        .trim()
        .to_uppercase();
    if asset.is_empty() || asset.len() > 32 {
        return Err(ApiError::unprocessable("unknown_asset", "no such asset"));
    }
    let amount = body
        .amount
        .as_ref()
        .and_then(|amount| crate::routes::wallet::positive_integer(amount, GIFT_AMOUNT_MAX))
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_amount",
                format!("amount must be a whole number from 1 to {GIFT_AMOUNT_MAX}"),
            )
        })?;
    let fields = [
        giver_id.to_string(),
        receiver_id.to_string(),
        asset.clone(),
        amount.to_string(),
    ];
    submit(
        &state,
        key,
        caller.command_principal(),
        &[&fields[0], &fields[1], &fields[2], &fields[3]],
        |_| Command::Gift {
            giver_id,
            receiver_id,
            asset,
            amount,
        },
    )
    .await
}

/// Reverse a journal entry
///
/// Reverses a top-up, bonus, purchase or referral share of one player (admins only). Happens at
/// most once per journal entry whoever asks and whatever the Idempotency-Key: a second request
/// gets the stored result.
#[utoipa::path(
    post,
    path = "/v1/journal/{journal}/reverse",
    tag = "admin",
    params(("journal" = Uuid, Path, description = "The journal entry (the id of the command that wrote it)."), IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The player's new wallet and the entry reversed.", body = ReversalResult),
        (status = 202, response = CommandAccepted),
        (status = 400, description = "The Idempotency-Key is malformed (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such journal entry (`unknown_journal`).", body = ErrorBody),
        (status = 409, description = "The player no longer holds what the reversal would take back (`insufficient_funds`, with `balance`, `required` and `asset`), or the entry was already reversed (`already_reversed`).", body = ErrorBody),
        (status = 422, description = "This entry cannot be reversed (`not_reversible`: a reversal, a gift, the genesis), `balance_limit_exceeded`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn reverse(
    State(state): State<AppState>,
    admin: crate::auth::Admin,
    Path(journal): Path<String>,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let journal_id: Uuid = journal
        .parse()
        .map_err(|_| ApiError::not_found("unknown_journal", "no such journal entry"))?;
    let players: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT a.owner_id FROM postings p JOIN accounts a ON a.id = p.account_id
         WHERE p.journal_id = $1 AND a.owner_kind = 'player'",
    )
    .bind(journal_id)
    .fetch_all(&state.pool)
    .await?;
    let player_id = match players.as_slice() {
        [] => {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM journal_entries WHERE id = $1)")
                    .bind(journal_id)
                    .fetch_one(&state.pool)
                    .await?;
            return Err(if exists {
                ApiError::unprocessable("not_reversible", "this journal entry cannot be reversed")
            } else {
                ApiError::not_found("unknown_journal", "no such journal entry")
            });
        }
        [player] => *player,
        _ => {
            return Err(ApiError::unprocessable(
                "not_reversible",
                "this journal entry cannot be reversed",
            ));
        }
    };
    let command_id = shared::ids::derived_id(journal_id, "reversal");
    let fields = [journal_id.to_string()];
    crate::routes::commands::submit_as(
        &state,
        key,
        admin.0.command_principal(),
        command_id,
        &[&fields[0]],
        |_| Command::Reverse {
            player_id,
            journal_id,
        },
    )
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewItem {
    /// 1 to 32 of a-z, 0-9 and `_`, starting with a letter (`Magic Sword` becomes
    /// `magic_sword`).
    #[schema(example = "magic_sword")]
    item: String,
    /// A whole number from 1 to 1,000,000,000; a string of digits is accepted too.
    #[schema(value_type = i64, minimum = 1, maximum = 1_000_000_000)]
    price: Value,
    /// An existing asset (default `GEMS`).
    #[serde(default)]
    price_asset: Option<String>,
}

/// Largest price of one item.
pub const ITEM_PRICE_MAX: i64 = 1_000_000_000;

fn valid_item_name(item: &str) -> Result<String, ApiError> {
    let item = crate::routes::wallet::normalize_item(item);
    let valid = (1..=32).contains(&item.len())
        && item.starts_with(|c: char| c.is_ascii_lowercase())
        && item
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(item)
    } else {
        Err(ApiError::unprocessable(
            "invalid_item",
            "item must be 1 to 32 of a-z, 0-9 and _, starting with a letter",
        ))
    }
}

fn valid_price(price: &Value) -> Result<i64, ApiError> {
    crate::routes::wallet::positive_integer(price, ITEM_PRICE_MAX).ok_or_else(|| {
        ApiError::unprocessable(
            "invalid_price",
            format!("price must be a whole number from 1 to {ITEM_PRICE_MAX}"),
        )
    })
}

/// Add an item to the catalog
///
/// The item's asset and the system accounts that issue it are created with it. API keys with
/// `catalog:write` only.
#[utoipa::path(
    post,
    path = "/v1/catalog",
    tag = "catalog",
    request_body = NewItem,
    responses(
        (status = 201, description = "The new item.", body = CatalogEntry),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 409, description = "The item already exists (`item_exists`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_item`, `invalid_price`, `unknown_asset` (the price asset).", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("apiKey" = ["catalog:write"])),
)]
pub async fn add_item(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewItem>,
) -> Result<(axum::http::StatusCode, Json<CatalogEntry>), ApiError> {
    caller.require_key_scope("catalog:write")?;
    let item = valid_item_name(&body.item)?;
    let price = valid_price(&body.price)?;
    let price_asset = body
        .price_asset
        .unwrap_or_else(|| shared::domain::GEMS.to_string())
        .to_uppercase();
    let asset = item.to_uppercase();
    let mut transaction = state.pool.begin().await?;
    let price_asset_known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM assets WHERE code = $1)")
            .bind(&price_asset)
            .fetch_one(&mut *transaction)
            .await?;
    if !price_asset_known || price_asset == asset {
        return Err(ApiError::unprocessable(
            "unknown_asset",
            "priceAsset must be an existing asset",
        ));
    }
    let created = sqlx::query(
        "INSERT INTO assets (code, description) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(&asset)
    .bind(format!("Shop item: {item}"))
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    if created == 0 {
        return Err(ApiError::Conflict {
            code: "item_exists",
            message: "this item already exists".to_string(),
        });
    }
    sqlx::query("INSERT INTO items (item, asset, price_asset, price) VALUES ($1, $2, $3, $4)")
        .bind(&item)
        .bind(&asset)
        .bind(&price_asset)
        .bind(price)
        .execute(&mut *transaction)
        .await?;
    // Every system owner gets an account in the new asset; all but genesis are hot.
    sqlx::query(
        "INSERT INTO accounts (owner_id, owner_kind, asset, is_hot)
         SELECT id, 'system', $1, name <> 'genesis' FROM system_owners
         ON CONFLICT (owner_id, asset) DO NOTHING",
    )
    .bind(&asset)
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(CatalogEntry {
            item,
            asset,
            price_asset,
            price,
            active: true,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct ItemChange {
    /// A new price, a whole number from 1 to 1,000,000,000; a string of digits is accepted too.
    #[serde(default)]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 1_000_000_000)]
    price: Option<Value>,
    /// False retires the item (it can no longer be bought), true restores it.
    #[serde(default)]
    active: Option<bool>,
}

/// Change an item's price, or retire or restore it
///
/// Journal entries keep the prices they were applied with. API keys with `catalog:write` only.
#[utoipa::path(
    patch,
    path = "/v1/catalog/{item}",
    tag = "catalog",
    params(("item" = String, Path, description = "The item's catalog name.")),
    request_body = ItemChange,
    responses(
        (status = 200, description = "The item as it is now.", body = CatalogEntry),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "The shop has no such item (`unknown_item`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_item`, `invalid_price`.", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("apiKey" = ["catalog:write"])),
)]
pub async fn change_item(
    State(state): State<AppState>,
    caller: Caller,
    Path(item): Path<String>,
    JsonBody(body): JsonBody<ItemChange>,
) -> Result<Json<CatalogEntry>, ApiError> {
    caller.require_key_scope("catalog:write")?;
    let item = valid_item_name(&item)?;
    let price = body.price.as_ref().map(valid_price).transpose()?;
    let row: Option<(String, String, String, i64, bool)> = sqlx::query_as(
        "UPDATE items SET price = coalesce($2, price), active = coalesce($3, active) WHERE item = $1
         RETURNING item, asset, price_asset, price, active",
    )
    .bind(&item)
    .bind(price)
    .bind(body.active)
    .fetch_optional(&state.pool)
    .await?;
    let Some((item, asset, price_asset, price, active)) = row else {
        return Err(ApiError::not_found(
            "unknown_item",
            "the shop has no such item",
        ));
    };
    Ok(Json(CatalogEntry {
        item,
        asset,
        price_asset,
        price,
        active,
    }))
}
