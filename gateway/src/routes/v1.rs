//! The versioned API for game backends (API keys with scopes) and players (their own wallet).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::wire::Command;
use uuid::Uuid;

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::routes::commands::{IdempotencyKey, submit};
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

/// `POST /v1/players/{player}/top-up` (scope `wallet:credit`, or the player).
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

#[derive(Deserialize)]
pub struct BonusBody {
    amount: Option<Value>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/players/{player}/bonus` (API keys with `wallet:credit` only).
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

/// `POST /v1/players/{player}/purchase` (scope `wallet:debit`, or the player).
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

/// `GET /v1/players/{player}/balances` (scope `wallet:read`, or the player): every asset.
pub async fn balances(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    let mut balances = serde_json::Map::new();
    balances.insert(shared::domain::GEMS.to_string(), 0.into());
    let mut versions = serde_json::Map::new();
    for (_, asset, balance, version) in rows {
        if let (Some(asset), Some(balance), Some(version)) = (asset, balance, version) {
            balances.insert(asset.clone(), balance.into());
            versions.insert(asset, version.into());
        }
    }
    Ok(Json(
        json!({ "playerId": player_id, "username": username, "balances": balances, "versions": versions }),
    ))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    asset: Option<String>,
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

/// `GET /v1/players/{player}/history` (scope `wallet:read`, or the player): the player's
/// postings with their journal entries, newest first, with cursor pagination and filters.
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path(player): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
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
    let entries: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "journalId": row.journal_id, "kind": row.kind, "createdAt": row.created_at,
                "asset": row.asset, "amount": row.amount, "details": row.details.0,
            })
        })
        .collect();
    Ok(Json(
        json!({ "entries": entries, "nextCursor": next_cursor }),
    ))
}

/// `GET /v1/catalog`: the items the shop sells, with their prices.
pub async fn catalog(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT item, asset, price_asset, price FROM items WHERE active ORDER BY item",
    )
    .fetch_all(&state.pool)
    .await?;
    let items: Vec<Value> = rows
        .into_iter()
        .map(|(item, asset, price_asset, price)| json!({ "item": item, "asset": asset, "priceAsset": price_asset, "price": price }))
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Largest amount one gift may move.
pub const GIFT_AMOUNT_MAX: i64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GiftBody {
    receiver_id: Option<String>,
    #[serde(default)]
    asset: Option<String>,
    amount: Option<Value>,
}

/// `POST /v1/players/{player}/gifts` (scope `wallet:debit`, or the player): gives GEMS or items
/// to another player. Atomic for the giver; the receiver gets it through a follow-up command in
/// the receiver's partition (usually within milliseconds).
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

/// `POST /v1/journal/{journal}/reverse` (admins): reverses a top-up, bonus, purchase or referral
/// share. Happens at most once per journal entry whoever asks; 409 when the player no longer
/// holds what it would take back.
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewItem {
    item: String,
    price: Value,
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

/// `POST /v1/catalog` (scope `catalog:write`): adds an item; its asset and the system accounts
/// that issue it are created with it.
pub async fn add_item(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<NewItem>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
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
        Json(
            json!({ "item": item, "asset": asset, "priceAsset": price_asset, "price": price, "active": true }),
        ),
    ))
}

#[derive(Deserialize)]
pub struct ItemChange {
    #[serde(default)]
    price: Option<Value>,
    #[serde(default)]
    active: Option<bool>,
}

/// `PATCH /v1/catalog/{item}` (scope `catalog:write`): changes the price or retires (or
/// restores) an item. Journal entries keep the prices they were applied with.
pub async fn change_item(
    State(state): State<AppState>,
    caller: Caller,
    Path(item): Path<String>,
    JsonBody(body): JsonBody<ItemChange>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(
        json!({ "item": item, "asset": asset, "priceAsset": price_asset, "price": price, "active": active }),
    ))
}
