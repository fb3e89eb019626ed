//! The synchronous baseline: the design a competent engineer would build instead of the queue.
//! The same HTTP contract for the endpoints the scenarios use (`/health`, `/signup`, `/login`,
//! `/balance`, `/top-up`, `/purchase`), the same JSON shapes, status codes, HS256 tokens, argon2id
//! hashes, idempotency keys and schema; but each request is applied in its own PostgreSQL
//! transaction that locks every account it touches (`SELECT ... ORDER BY id FOR UPDATE`),
//! including the treasury's and the shop's, whose balances it updates directly.
//!
//! Per write: look up the command id in `commands` (a retry replays the stored result), lock the
//! accounts in id order, decide, write the journal entry, postings and balances, store the result
//! in `commands`, commit. A concurrent duplicate loses on the primary key and replays the
//! winner's result. The audit (`shared::audit::run`) passes on its database at any time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shared::domain::{
    self, GEMS, PURCHASE_QUANTITY_MAX, SHOP_OWNER_ID, TREASURY_OWNER_ID, balance_view,
};
use shared::ids;
use sqlx::types::Json as SqlJson;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use uuid::Uuid;

use crate::auth::{Passwords, Tokens, referral_code_for};

/// Attempts of one request's transaction when it loses a race (a concurrent duplicate of the
/// same command, a serialization failure or a deadlock) before the error is answered.
pub const TRANSACTION_ATTEMPTS_MAX: u32 = 3;
/// Longest Idempotency-Key accepted (the gateway's limit).
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 255;
pub const USERNAME_LENGTH_MIN: usize = 3;
pub const USERNAME_LENGTH_MAX: usize = 32;
pub const PASSWORD_LENGTH_MIN: usize = 8;
pub const PASSWORD_LENGTH_MAX: usize = 256;
pub const REFERRAL_CODE_LENGTH_MAX: usize = 32;
/// How long the health check waits for the database.
const DATABASE_PROBE_TIMEOUT_MS: u64 = 1_000;

static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
static COMMAND_ID: HeaderName = HeaderName::from_static("x-command-id");

tokio::task_local! {
    static REQUEST_ID: String;
}

fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "baseline-server",
    about = "Synchronous baseline: one PostgreSQL transaction with SELECT ... FOR UPDATE per request"
)]
pub struct BaselineConfig {
    /// Address the HTTP server listens on.
    #[arg(long, env = "BASELINE_HTTP_ADDR", default_value = "127.0.0.1:8090")]
    pub http_addr: String,

    /// The baseline's own database (created and migrated when missing). Never the system's.
    #[arg(
        long,
        env = "BASELINE_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/wallet_baseline"
    )]
    pub database_url: String,

    /// Maximum PostgreSQL connections.
    #[arg(long, env = "BASELINE_DATABASE_CONNECTIONS_MAX", default_value_t = 10)]
    pub database_connections_max: u32,

    /// Secret for tokens (HS256) and request fingerprints, as the gateway's JWT_SECRET. Random
    /// when unset.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// How long a token is valid.
    #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 24 * 60 * 60)]
    pub jwt_ttl_seconds: u64,

    /// Largest amount a player may top up in one request.
    #[arg(long, env = "TOP_UP_MAX", default_value_t = 1_000_000)]
    pub top_up_max: i64,

    /// GEMS paid to the referee and to the referrer of a signup with a referral code.
    #[arg(long, env = "REFERRAL_BONUS", default_value_t = 50)]
    pub referral_bonus: i64,

    /// Stored with each command (the partition a player would have), and pinned in the database.
    #[arg(long, env = "PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// Initial GEMS supply issued to the treasury on first start.
    #[arg(long, env = "TREASURY_INITIAL_SUPPLY", default_value_t = 2_000_000_000)]
    pub treasury_initial_supply: i64,

    /// Largest request body accepted.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 16 * 1024)]
    pub body_limit_bytes: usize,
}

impl BaselineConfig {
    /// A configuration with every default for `database_url`, for tests and `compare`.
    pub fn for_database(database_url: &str, jwt_secret: Option<String>) -> Self {
        let mut config = Self::parse_from(["baseline-server"]);
        config.database_url = database_url.to_string();
        config.jwt_secret = jwt_secret;
        config
    }

    fn common(&self) -> shared::config::CommonConfig {
        let mut common = shared::config::CommonConfig::with_defaults();
        common.database_url = self.database_url.clone();
        common.database_connections_max = self.database_connections_max;
        common.partitions = self.partitions;
        common.treasury_initial_supply = self.treasury_initial_supply;
        common
    }
}

#[derive(Clone)]
pub struct BaselineState {
    pub pool: PgPool,
    tokens: Arc<Tokens>,
    passwords: Arc<Passwords>,
    fingerprint_key: Arc<Vec<u8>>,
    config: Arc<BaselineConfig>,
}

/// Prepares the database (schema, partitions, initial supply) and folds the hot credits already
/// there (the initial supply), since the baseline keeps hot balances up to date itself.
pub async fn build_state(config: BaselineConfig) -> anyhow::Result<BaselineState> {
    let pool = shared::db::bootstrap(&config.common())
        .await
        .context("preparing the baseline's database")?;
    sqlx::query(
        "WITH folded AS (DELETE FROM hot_credits RETURNING account_id, amount),
              sums AS (SELECT account_id, sum(amount)::bigint AS delta FROM folded GROUP BY account_id)
         UPDATE accounts AS a SET balance = a.balance + s.delta, version = a.version + 1
         FROM sums s WHERE a.id = s.account_id",
    )
    .execute(&pool)
    .await
    .context("folding the hot credits present at start")?;
    let secret = match &config.jwt_secret {
        Some(secret) if secret.len() >= 16 => secret.as_bytes().to_vec(),
        Some(_) => anyhow::bail!("JWT_SECRET must be at least 16 bytes"),
        None => {
            tracing::warn!("JWT_SECRET is not set: using a random secret");
            let mut secret = vec![0u8; 32];
            rand::fill(&mut secret[..]);
            secret
        }
    };
    Ok(BaselineState {
        pool,
        tokens: Arc::new(Tokens::new(&secret, config.jwt_ttl_seconds)),
        passwords: Arc::new(Passwords::new()?),
        fingerprint_key: Arc::new(ids::fingerprint(&secret, "fingerprint-key", &[]).into_bytes()),
        config: Arc::new(config),
    })
}

pub fn app(state: BaselineState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/signup", post(signup))
        .route("/login", post(login))
        .route("/balance", get(balance))
        .route("/top-up", post(top_up))
        .route("/purchase", post(purchase))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept this method",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(middleware::from_fn(scope_request_id))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER.clone()))
        .layer(SetRequestIdLayer::new(
            REQUEST_ID_HEADER.clone(),
            MakeRequestUuid,
        ))
        .with_state(state)
}

async fn scope_request_id(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    REQUEST_ID.scope(request_id, next.run(request)).await
}

/// Serves on a bound listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: BaselineState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = state.pool.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving HTTP")?;
    pool.close().await;
    Ok(())
}

pub async fn run(config: BaselineConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let state = build_state(config).await?;
    tracing::info!(address = %listener.local_addr()?, "baseline listening");
    serve(listener, state, shutdown).await
}

// ---- errors ----------------------------------------------------------------------------------

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if shared::db::is_transient(&error) {
            tracing::warn!(%error, "database unavailable");
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry with the same Idempotency-Key",
            )
        } else {
            tracing::error!(%error, "database error");
            Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        tracing::error!(error = format!("{error:#}"), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = domain::error_body(self.code, &self.message, current_request_id().as_deref());
        (self.status, Json(body)).into_response()
    }
}

// ---- extractors ------------------------------------------------------------------------------

/// A JSON body: 413 past the limit, 400 for anything that is not the expected JSON.
struct JsonBody<T>(T);

impl<T: DeserializeOwned> FromRequest<BaselineState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(
        request: Request,
        state: &BaselineState,
    ) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!(
                            "the request body is larger than {} bytes",
                            state.config.body_limit_bytes
                        ),
                    )
                } else {
                    ApiError::bad_request(format!("could not read the request body: {rejection}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| {
                ApiError::bad_request(format!(
                    "the body is not valid JSON for this endpoint: {error}"
                ))
            })
    }
}

/// The Idempotency-Key, or a fresh one.
struct IdempotencyKey(String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(&IDEMPOTENCY_KEY) {
            None => Ok(Self(Uuid::new_v4().to_string())),
            Some(value) => value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|key| {
                    !key.is_empty()
                        && key.len() <= IDEMPOTENCY_KEY_LENGTH_MAX
                        && key.bytes().all(|byte| byte.is_ascii_graphic())
                })
                .map(|key| Self(key.to_string()))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} visible ASCII characters"
                    ))
                }),
        }
    }
}

/// The player named by the bearer token.
struct Principal {
    user_id: Uuid,
}

impl FromRequestParts<BaselineState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &BaselineState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("an Authorization: Bearer token is required"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be a Bearer token")
            })?;
        let claims = state
            .tokens
            .verify(token.trim())
            .ok_or_else(|| ApiError::unauthorized("the token is invalid or expired"))?;
        Ok(Self {
            user_id: claims.sub,
        })
    }
}

// ---- reads -----------------------------------------------------------------------------------

async fn health(State(state): State<BaselineState>) -> (StatusCode, Json<Value>) {
    let up = tokio::time::timeout(
        Duration::from_millis(DATABASE_PROBE_TIMEOUT_MS),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await
    .is_ok_and(|result| result.is_ok());
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if up { "UP" } else { "DOWN" },
            "database": if up { "CONNECTED" } else { "DISCONNECTED" },
            // The baseline has no broker.
            "broker": "NOT_USED",
        })),
    )
}

/// A player's name and code with one of their accounts (none for a player without accounts).
type HoldingRow = (String, String, Option<String>, Option<i64>, Option<i64>);

async fn balance(
    State(state): State<BaselineState>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    let rows: Vec<HoldingRow> = sqlx::query_as(
        "SELECT u.username, u.referral_code, a.asset, a.balance, a.version
         FROM users u LEFT JOIN accounts a ON a.owner_id = u.id
         WHERE u.id = $1",
    )
    .bind(principal.user_id)
    .fetch_all(&state.pool)
    .await?;
    let Some((username, referral_code, ..)) = rows.first().cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_player",
            "no such player",
        ));
    };
    let mut version = 0;
    let mut holdings = Vec::new();
    for (_, _, asset, balance, account_version) in rows {
        if let (Some(asset), Some(balance)) = (asset, balance) {
            if asset == GEMS {
                version = account_version.unwrap_or(0);
            }
            holdings.push((asset, balance));
        }
    }
    Ok(Json(balance_view(
        &username,
        &referral_code,
        &holdings,
        version,
    )))
}

// ---- signup and login ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignupBody {
    username: String,
    password: String,
    #[serde(default)]
    referral_code: Option<String>,
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

async fn signup(
    State(state): State<BaselineState>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<SignupBody>,
) -> Result<Response, ApiError> {
    let username = body.username.trim().to_string();
    let length_ok = (USERNAME_LENGTH_MIN..=USERNAME_LENGTH_MAX).contains(&username.chars().count());
    if !length_ok
        || !username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(ApiError::unprocessable(
            "invalid_username",
            format!(
                "username must be {USERNAME_LENGTH_MIN} to {USERNAME_LENGTH_MAX} characters of letters, digits, '_', '.' or '-'"
            ),
        ));
    }
    if !(PASSWORD_LENGTH_MIN..=PASSWORD_LENGTH_MAX).contains(&body.password.chars().count()) {
        return Err(ApiError::unprocessable(
            "invalid_password",
            format!("password must be {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters"),
        ));
    }
    let referred_by_code = match body.referral_code.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(code)
            if code.len() <= REFERRAL_CODE_LENGTH_MAX
                && code.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            Some(code.to_ascii_uppercase())
        }
        Some(_) => {
            return Err(ApiError::unprocessable(
                "unknown_referral_code",
                "no player has this referral code",
            ));
        }
    };
    let password_hash = state.passwords.hash(body.password.clone()).await?;
    let principal = format!("signup:{}", username.to_lowercase());
    let fields = [
        username.to_lowercase(),
        body.password.clone(),
        referred_by_code.clone().unwrap_or_default(),
    ];
    let command_id = ids::command_id(&principal, &key.0);
    let user_id = ids::derived_id(command_id, "user");
    let command = Command {
        id: command_id,
        principal,
        kind: "signup",
        fingerprint: ids::fingerprint(
            &state.fingerprint_key,
            "signup",
            &fields.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        player: user_id,
        action: Action::Signup {
            username,
            password_hash,
            referred_by_code,
        },
    };
    execute(&state, &key, &command).await
}

async fn login(
    State(state): State<BaselineState>,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    let invalid = || ApiError::unauthorized("invalid username or password");
    if body.password.chars().count() > PASSWORD_LENGTH_MAX
        || body.username.len() > USERNAME_LENGTH_MAX
    {
        return Err(invalid());
    }
    let user: Option<(Uuid, String, String, String)> = sqlx::query_as(
        "SELECT id, username, password_hash, role FROM users WHERE lower(username) = lower($1)",
    )
    .bind(body.username.trim())
    .fetch_optional(&state.pool)
    .await?;
    let hash = user.as_ref().map(|(_, _, hash, _)| hash.clone());
    if !state.passwords.verify(body.password, hash).await? {
        return Err(invalid());
    }
    let Some((id, username, _, role)) = user else {
        return Err(invalid());
    };
    let token = state.tokens.issue(id, &username, &role)?;
    Ok(Json(json!({
        "token": token,
        "tokenType": "Bearer",
        "expiresIn": state.tokens.ttl_seconds(),
        "userId": id,
    })))
}

// ---- top-up and purchase ---------------------------------------------------------------------

#[derive(Deserialize)]
struct TopUpBody {
    amount: Option<Value>,
}

#[derive(Deserialize)]
struct PurchaseBody {
    item: Option<String>,
    #[serde(default)]
    quantity: Option<Value>,
}

/// A strictly positive whole number no larger than `max`, from a JSON number or digit string.
fn positive_integer(value: &Value, max: i64) -> Option<i64> {
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
fn normalize_item(item: &str) -> String {
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

async fn top_up(
    State(state): State<BaselineState>,
    principal: Principal,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<TopUpBody>,
) -> Result<Response, ApiError> {
    let top_up_max = state.config.top_up_max;
    let amount = body
        .amount
        .as_ref()
        .and_then(|amount| positive_integer(amount, top_up_max))
        .ok_or_else(|| {
            ApiError::unprocessable(
                "invalid_amount",
                format!("amount must be a whole number from 1 to {top_up_max}"),
            )
        })?;
    let principal_name = format!("player:{}", principal.user_id);
    let command = Command {
        id: ids::command_id(&principal_name, &key.0),
        principal: principal_name,
        kind: "top_up",
        fingerprint: ids::fingerprint(&state.fingerprint_key, "top_up", &[&amount.to_string()]),
        player: principal.user_id,
        action: Action::TopUp { amount },
    };
    execute(&state, &key, &command).await
}

async fn purchase(
    State(state): State<BaselineState>,
    principal: Principal,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<PurchaseBody>,
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
    let principal_name = format!("player:{}", principal.user_id);
    let command = Command {
        id: ids::command_id(&principal_name, &key.0),
        principal: principal_name,
        kind: "purchase",
        fingerprint: ids::fingerprint(
            &state.fingerprint_key,
            "purchase",
            &[&item, &quantity.to_string()],
        ),
        player: principal.user_id,
        action: Action::Purchase { item, quantity },
    };
    execute(&state, &key, &command).await
}

// ---- applying a command in one transaction ---------------------------------------------------

struct Command {
    id: Uuid,
    principal: String,
    kind: &'static str,
    fingerprint: String,
    /// The player the command is about (the new player of a signup).
    player: Uuid,
    action: Action,
}

enum Action {
    Signup {
        username: String,
        password_hash: String,
        referred_by_code: Option<String>,
    },
    TopUp {
        amount: i64,
    },
    Purchase {
        item: String,
        quantity: i64,
    },
}

struct Decision {
    applied: bool,
    status: u16,
    body: Value,
}

impl Decision {
    fn applied(body: Value) -> Self {
        Self {
            applied: true,
            status: 200,
            body,
        }
    }

    fn rejected(status: u16, code: &str, message: &str) -> Self {
        Self {
            applied: false,
            status,
            body: domain::error_body(code, message, current_request_id().as_deref()),
        }
    }
}

struct Answer {
    status: u16,
    body: Value,
    replay: bool,
}

/// Runs the command's transaction, again when it lost a race, and answers.
async fn execute(
    state: &BaselineState,
    key: &IdempotencyKey,
    command: &Command,
) -> Result<Response, ApiError> {
    let mut attempt = 0;
    let answer = loop {
        attempt += 1;
        match execute_once(state, command).await {
            Ok(answer) => break answer,
            Err(error) if attempt < TRANSACTION_ATTEMPTS_MAX && lost_a_race(&error) => {}
            Err(error) => return Err(error.into()),
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&key.0) {
        headers.insert(IDEMPOTENCY_KEY.clone(), value);
    }
    if let Ok(value) = HeaderValue::from_str(&command.id.to_string()) {
        headers.insert(COMMAND_ID.clone(), value);
    }
    headers.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static(if answer.replay { "true" } else { "false" }),
    );
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, headers, Json(answer.body)).into_response())
}

/// A concurrent duplicate stored the same command first, or PostgreSQL broke a deadlock or a
/// serialization conflict: the next attempt finds the stored result or succeeds.
fn lost_a_race(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database_error) => {
            matches!(database_error.code().as_deref(), Some("40001" | "40P01"))
                || (database_error.code().as_deref() == Some("23505")
                    && database_error.constraint() == Some("commands_pkey"))
        }
        _ => false,
    }
}

async fn execute_once(state: &BaselineState, command: &Command) -> Result<Answer, sqlx::Error> {
    let mut transaction = state.pool.begin().await?;
    let stored: Option<(String, i16, SqlJson<Value>)> =
        sqlx::query_as("SELECT fingerprint, status_code, body FROM commands WHERE id = $1")
            .bind(command.id)
            .fetch_optional(&mut *transaction)
            .await?;
    if let Some((fingerprint, status, SqlJson(body))) = stored {
        transaction.rollback().await?;
        return Ok(if fingerprint == command.fingerprint {
            Answer {
                status: u16::try_from(status).unwrap_or(500),
                body,
                replay: true,
            }
        } else {
            Answer {
                status: 422,
                body: domain::error_body(
                    "idempotency_key_reused",
                    "this Idempotency-Key was already used for a different request",
                    current_request_id().as_deref(),
                ),
                replay: false,
            }
        });
    }
    let decision = match &command.action {
        Action::Signup {
            username,
            password_hash,
            referred_by_code,
        } => {
            apply_signup(
                &mut transaction,
                command,
                username,
                password_hash,
                referred_by_code.as_deref(),
                state.config.referral_bonus,
            )
            .await?
        }
        Action::TopUp { amount } => apply_top_up(&mut transaction, command, *amount).await?,
        Action::Purchase { item, quantity } => {
            apply_purchase(&mut transaction, command, item, *quantity).await?
        }
    };
    sqlx::query(
        "INSERT INTO commands (id, principal, kind, fingerprint, partition, outcome, status_code, body, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(command.id)
    .bind(&command.principal)
    .bind(command.kind)
    .bind(&command.fingerprint)
    .bind(i32::from(shared::partition::partition_of(
        command.player,
        state.config.partitions,
    )))
    .bind(if decision.applied { "applied" } else { "rejected" })
    .bind(i16::try_from(decision.status).unwrap_or(i16::MAX))
    .bind(SqlJson(&decision.body))
    .bind(current_request_id())
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok(Answer {
        status: decision.status,
        body: decision.body,
        replay: false,
    })
}

/// A locked account.
struct Locked {
    id: i64,
    owner: Uuid,
    asset: String,
    balance: i64,
    version: i64,
    changed: bool,
}

/// The accounts a transaction locked, by (owner, asset).
struct LockedAccounts {
    accounts: HashMap<(Uuid, String), Locked>,
}

impl LockedAccounts {
    /// Locks every account of `players` and the named system accounts, in id order, so two
    /// transactions touching overlapping accounts never deadlock.
    async fn lock(
        transaction: &mut Transaction<'_, Postgres>,
        players: &[Uuid],
        system: &[(Uuid, &str)],
    ) -> Result<Self, sqlx::Error> {
        let system_owners: Vec<Uuid> = system.iter().map(|(owner, _)| *owner).collect();
        let system_assets: Vec<String> =
            system.iter().map(|(_, asset)| asset.to_string()).collect();
        let rows: Vec<(i64, Uuid, String, i64, i64)> = sqlx::query_as(
            // The ids come from two index lookups evaluated once (an InitPlan), and the rows are
            // locked by id in id order. Not a join or an IN (subquery): when a locked row was
            // updated meanwhile, PostgreSQL rechecks the condition on its new version, and a
            // join's recheck can drop the row; and a plain OR of both conditions scans the table.
            "SELECT id, owner_id, asset, balance, version FROM accounts
             WHERE id = ANY(ARRAY(
                 SELECT id FROM accounts WHERE owner_id = ANY($1) AND owner_kind = 'player'
                 UNION ALL
                 SELECT a.id FROM accounts a
                 JOIN UNNEST($2::uuid[], $3::text[]) AS s(owner_id, asset)
                   ON a.owner_id = s.owner_id AND a.asset = s.asset
             ))
             ORDER BY id FOR UPDATE",
        )
        .bind(players)
        .bind(&system_owners)
        .bind(&system_assets)
        .fetch_all(&mut **transaction)
        .await?;
        Ok(Self {
            accounts: rows
                .into_iter()
                .map(|(id, owner, asset, balance, version)| {
                    (
                        (owner, asset.clone()),
                        Locked {
                            id,
                            owner,
                            asset,
                            balance,
                            version,
                            changed: false,
                        },
                    )
                })
                .collect(),
        })
    }

    fn get(&self, owner: Uuid, asset: &str) -> Option<&Locked> {
        self.accounts.get(&(owner, asset.to_string()))
    }

    fn balance(&self, owner: Uuid, asset: &str) -> i64 {
        self.get(owner, asset).map_or(0, |account| account.balance)
    }

    /// Adds a signed amount; None when the account is missing or the sum overflows.
    fn add(&mut self, owner: Uuid, asset: &str, amount: i64) -> Option<()> {
        let account = self.accounts.get_mut(&(owner, asset.to_string()))?;
        account.balance = account.balance.checked_add(amount)?;
        account.version = account.version.checked_add(1)?;
        account.changed = true;
        Some(())
    }

    fn id(&self, owner: Uuid, asset: &str) -> Option<i64> {
        self.get(owner, asset).map(|account| account.id)
    }

    /// Writes every changed balance, one statement.
    async fn write(&self, transaction: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        let changed: Vec<&Locked> = self
            .accounts
            .values()
            .filter(|account| account.changed)
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = changed.iter().map(|account| account.id).collect();
        let balances: Vec<i64> = changed.iter().map(|account| account.balance).collect();
        let versions: Vec<i64> = changed.iter().map(|account| account.version).collect();
        sqlx::query(
            "UPDATE accounts AS a SET balance = u.balance, version = u.version
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS u(id, balance, version)
             WHERE a.id = u.id",
        )
        .bind(&ids)
        .bind(&balances)
        .bind(&versions)
        .execute(&mut **transaction)
        .await?;
        Ok(())
    }

    /// The seed-compatible balance view of a player.
    fn view(&self, player: Uuid, username: &str, referral_code: &str) -> Value {
        let holdings: Vec<(String, i64)> = self
            .accounts
            .values()
            .filter(|account| account.owner == player)
            .map(|account| (account.asset.clone(), account.balance))
            .collect();
        let version = self.get(player, GEMS).map_or(0, |account| account.version);
        balance_view(username, referral_code, &holdings, version)
    }
}

/// One journal entry with its postings (account id, asset, signed amount).
async fn write_journal(
    transaction: &mut Transaction<'_, Postgres>,
    id: Uuid,
    kind: &str,
    details: &Value,
    postings: &[(i64, &str, i64)],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO journal_entries (id, kind, details) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(kind)
        .bind(SqlJson(details))
        .execute(&mut **transaction)
        .await?;
    let accounts: Vec<i64> = postings.iter().map(|posting| posting.0).collect();
    let assets: Vec<String> = postings
        .iter()
        .map(|posting| posting.1.to_string())
        .collect();
    let amounts: Vec<i64> = postings.iter().map(|posting| posting.2).collect();
    sqlx::query(
        "INSERT INTO postings (journal_id, account_id, asset, amount)
         SELECT $1, account, asset, amount FROM UNNEST($2::int8[], $3::text[], $4::int8[]) AS t(account, asset, amount)",
    )
    .bind(id)
    .bind(&accounts)
    .bind(&assets)
    .bind(&amounts)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Creates the player's accounts for these assets when missing (sorted, so concurrent inserts
/// take their index locks in one order).
async fn ensure_accounts(
    transaction: &mut Transaction<'_, Postgres>,
    player: Uuid,
    assets: &[&str],
) -> Result<(), sqlx::Error> {
    let assets: Vec<String> = assets.iter().map(|asset| asset.to_string()).collect();
    sqlx::query(
        "INSERT INTO accounts (owner_id, owner_kind, asset)
         SELECT $1, 'player', asset FROM UNNEST($2::text[]) AS t(asset)
         ORDER BY asset
         ON CONFLICT (owner_id, asset) DO NOTHING",
    )
    .bind(player)
    .bind(&assets)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

async fn load_player(
    transaction: &mut Transaction<'_, Postgres>,
    player: Uuid,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT username, referral_code FROM users WHERE id = $1")
        .bind(player)
        .fetch_optional(&mut **transaction)
        .await
}

fn unknown_player() -> Decision {
    Decision::rejected(404, "unknown_player", "no such player")
}

fn books_not_ready() -> Decision {
    Decision::rejected(503, "books_not_ready", "system account missing")
}

async fn apply_top_up(
    transaction: &mut Transaction<'_, Postgres>,
    command: &Command,
    amount: i64,
) -> Result<Decision, sqlx::Error> {
    let player = command.player;
    let Some((username, referral_code)) = load_player(transaction, player).await? else {
        return Ok(unknown_player());
    };
    ensure_accounts(transaction, player, &[GEMS]).await?;
    let mut accounts =
        LockedAccounts::lock(transaction, &[player], &[(TREASURY_OWNER_ID, GEMS)]).await?;
    let (Some(treasury), Some(account)) = (
        accounts.id(TREASURY_OWNER_ID, GEMS),
        accounts.id(player, GEMS),
    ) else {
        return Ok(books_not_ready());
    };
    if accounts.balance(player, GEMS).checked_add(amount).is_none()
        || accounts
            .balance(TREASURY_OWNER_ID, GEMS)
            .checked_sub(amount)
            .is_none()
    {
        return Ok(Decision::rejected(
            422,
            "balance_limit_exceeded",
            "this top-up would exceed the largest balance an account can hold",
        ));
    }
    let (Some(()), Some(())) = (
        accounts.add(player, GEMS, amount),
        accounts.add(TREASURY_OWNER_ID, GEMS, -amount),
    ) else {
        unreachable!("both sums were checked above");
    };
    write_journal(
        transaction,
        command.id,
        "top_up",
        &json!({ "player": player, "amount": amount }),
        &[(treasury, GEMS, -amount), (account, GEMS, amount)],
    )
    .await?;
    accounts.write(transaction).await?;
    Ok(Decision::applied(accounts.view(
        player,
        &username,
        &referral_code,
    )))
}

async fn apply_purchase(
    transaction: &mut Transaction<'_, Postgres>,
    command: &Command,
    item_name: &str,
    quantity: i64,
) -> Result<Decision, sqlx::Error> {
    let player = command.player;
    let Some((username, referral_code)) = load_player(transaction, player).await? else {
        return Ok(unknown_player());
    };
    let item: Option<(String, String, i64)> =
        sqlx::query_as("SELECT asset, price_asset, price FROM items WHERE item = $1 AND active")
            .bind(item_name)
            .fetch_optional(&mut **transaction)
            .await?;
    let Some((asset, price_asset, price)) = item else {
        return Ok(Decision::rejected(
            422,
            "unknown_item",
            "the shop does not sell this item",
        ));
    };
    if !(1..=PURCHASE_QUANTITY_MAX).contains(&quantity) {
        return Ok(Decision::rejected(
            422,
            "invalid_quantity",
            &format!("quantity must be between 1 and {PURCHASE_QUANTITY_MAX}"),
        ));
    }
    let Some(total) = price.checked_mul(quantity) else {
        return Ok(Decision::rejected(
            422,
            "invalid_quantity",
            "the total price is out of range",
        ));
    };
    ensure_accounts(transaction, player, &[&price_asset, &asset]).await?;
    let mut accounts = LockedAccounts::lock(
        transaction,
        &[player],
        &[(TREASURY_OWNER_ID, &price_asset), (SHOP_OWNER_ID, &asset)],
    )
    .await?;
    // Every account was created above and locked: one missing is a bug, never a refusal.
    let (Some(paying), Some(receiving), Some(treasury), Some(shop)) = (
        accounts.id(player, &price_asset),
        accounts.id(player, &asset),
        accounts.id(TREASURY_OWNER_ID, &price_asset),
        accounts.id(SHOP_OWNER_ID, &asset),
    ) else {
        return Ok(books_not_ready());
    };
    let balance = accounts.balance(player, &price_asset);
    if balance < total {
        // Nothing was written but the player's (empty) accounts; the refusal is stored as the
        // command's result like any other.
        let mut body = domain::error_body(
            "insufficient_funds",
            &format!("this purchase costs {total} {price_asset} but the balance is {balance}"),
            current_request_id().as_deref(),
        );
        body["balance"] = balance.into();
        body["required"] = total.into();
        return Ok(Decision {
            applied: false,
            status: 409,
            body,
        });
    }
    // Every leg is checked before any is applied, so a refusal leaves nothing half-done.
    if accounts
        .balance(player, &asset)
        .checked_add(quantity)
        .is_none()
        || accounts
            .balance(TREASURY_OWNER_ID, &price_asset)
            .checked_add(total)
            .is_none()
        || accounts
            .balance(SHOP_OWNER_ID, &asset)
            .checked_sub(quantity)
            .is_none()
    {
        return Ok(Decision::rejected(
            422,
            "balance_limit_exceeded",
            "this purchase would exceed the largest quantity an account can hold",
        ));
    }
    let applied = [
        accounts.add(player, &price_asset, -total),
        accounts.add(player, &asset, quantity),
        accounts.add(TREASURY_OWNER_ID, &price_asset, total),
        accounts.add(SHOP_OWNER_ID, &asset, -quantity),
    ];
    if applied.iter().any(Option::is_none) {
        unreachable!("every leg was checked above");
    }
    write_journal(
        transaction,
        command.id,
        "purchase",
        &json!({ "player": player, "item": item_name, "quantity": quantity,
                 "unit_price": price, "price_asset": price_asset, "total": total }),
        &[
            (paying, price_asset.as_str(), -total),
            (treasury, price_asset.as_str(), total),
            (shop, asset.as_str(), -quantity),
            (receiving, asset.as_str(), quantity),
        ],
    )
    .await?;
    accounts.write(transaction).await?;
    let mut body = accounts.view(player, &username, &referral_code);
    body["purchased"] =
        json!({ "item": item_name, "quantity": quantity, "unitPrice": price, "total": total });
    Ok(Decision::applied(body))
}

async fn apply_signup(
    transaction: &mut Transaction<'_, Postgres>,
    command: &Command,
    username: &str,
    password_hash: &str,
    referred_by_code: Option<&str>,
    referral_bonus: i64,
) -> Result<Decision, sqlx::Error> {
    let user_id = command.player;
    let referrer: Option<Uuid> = match referred_by_code {
        None => None,
        Some(code) => {
            let owner: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM users WHERE referral_code = $1")
                    .bind(code)
                    .fetch_optional(&mut **transaction)
                    .await?;
            match owner {
                Some(owner) if owner != user_id => Some(owner),
                _ => {
                    return Ok(Decision::rejected(
                        422,
                        "unknown_referral_code",
                        "no player has this referral code",
                    ));
                }
            }
        }
    };
    let referral_code = referral_code_for(user_id);
    let created: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO users (id, username, password_hash, referral_code, referred_by)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(user_id)
    .bind(username)
    .bind(password_hash)
    .bind(&referral_code)
    .bind(referrer)
    .fetch_optional(&mut **transaction)
    .await?;
    if created.is_none() {
        return Ok(Decision::rejected(
            409,
            "username_taken",
            "this username is taken",
        ));
    }
    ensure_accounts(transaction, user_id, &[GEMS]).await?;
    if let Some(referrer) = referrer
        && referral_bonus > 0
    {
        // A referrer who was never funded has no GEMS account yet.
        ensure_accounts(transaction, referrer, &[GEMS]).await?;
        let mut accounts = LockedAccounts::lock(
            transaction,
            &[user_id, referrer],
            &[(TREASURY_OWNER_ID, GEMS)],
        )
        .await?;
        let (Some(treasury), Some(referee_account), Some(referrer_account)) = (
            accounts.id(TREASURY_OWNER_ID, GEMS),
            accounts.id(user_id, GEMS),
            accounts.id(referrer, GEMS),
        ) else {
            return Ok(books_not_ready());
        };
        return pay_bonuses(
            transaction,
            &mut accounts,
            command,
            (user_id, referee_account),
            (referrer, referrer_account),
            treasury,
            referral_bonus,
        )
        .await;
    }
    Ok(Decision::applied(
        json!({ "userId": user_id, "status": "Created" }),
    ))
}

/// Both referral bonuses in the signup's transaction: two journal entries with the ids the
/// worker uses (the command's, and the referrer's follow-up derived from it).
async fn pay_bonuses(
    transaction: &mut Transaction<'_, Postgres>,
    accounts: &mut LockedAccounts,
    command: &Command,
    (referee, referee_account): (Uuid, i64),
    (referrer, referrer_account): (Uuid, i64),
    treasury: i64,
    bonus: i64,
) -> Result<Decision, sqlx::Error> {
    let both = bonus.checked_mul(2);
    let fits = both.is_some_and(|both| {
        accounts
            .balance(TREASURY_OWNER_ID, GEMS)
            .checked_sub(both)
            .is_some()
    }) && accounts.balance(referee, GEMS).checked_add(bonus).is_some()
        && accounts
            .balance(referrer, GEMS)
            .checked_add(bonus)
            .is_some();
    if !fits {
        return Ok(Decision::rejected(
            422,
            "invalid_amount",
            "referral bonus out of range",
        ));
    }
    let applied = [
        accounts.add(referee, GEMS, bonus),
        accounts.add(referrer, GEMS, bonus),
        accounts.add(TREASURY_OWNER_ID, GEMS, -bonus),
        accounts.add(TREASURY_OWNER_ID, GEMS, -bonus),
    ];
    if applied.iter().any(Option::is_none) {
        unreachable!("every sum was checked above");
    }
    write_journal(
        transaction,
        command.id,
        "referral_bonus",
        &json!({ "referee": referee, "referrer": referrer, "share": "referee" }),
        &[(treasury, GEMS, -bonus), (referee_account, GEMS, bonus)],
    )
    .await?;
    write_journal(
        transaction,
        ids::derived_id(command.id, "referrer-bonus"),
        "referral_bonus",
        &json!({ "referee": referee, "referrer": referrer, "share": "referrer" }),
        &[(treasury, GEMS, -bonus), (referrer_account, GEMS, bonus)],
    )
    .await?;
    accounts.write(transaction).await?;
    Ok(Decision::applied(
        json!({ "userId": referee, "status": "Created" }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_matches_the_gateway() {
        assert_eq!(positive_integer(&json!("7"), 10), Some(7));
        assert_eq!(positive_integer(&json!(11), 10), None);
        assert_eq!(positive_integer(&json!(1.5), 10), None);
        assert_eq!(normalize_item("Gold Coin"), "gold_coin");
        assert_eq!(normalize_item("treasureBox"), "treasure_box");
    }
}
