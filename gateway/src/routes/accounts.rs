//! Signup and login.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use shared::ids;
use shared::results::{ErrorBody, SignupResult};
use shared::wire::Command;

use crate::body::JsonBody;
use crate::error::ApiError;
use crate::openapi::{self, IdempotencyKeyHeader};
use crate::routes::commands::CommandAccepted;
use crate::routes::commands::{IdempotencyKey, submit};
use crate::state::AppState;
use utoipa::ToSchema;

pub const USERNAME_LENGTH_MIN: usize = 3;
pub const USERNAME_LENGTH_MAX: usize = 32;
pub const PASSWORD_LENGTH_MIN: usize = 8;
/// Bounded so that hashing cost cannot be inflated by a huge password.
pub const PASSWORD_LENGTH_MAX: usize = 256;
pub const REFERRAL_CODE_LENGTH_MAX: usize = 32;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignupBody {
    /// 3 to 32 of letters, digits, `_`, `.` and `-`; unique regardless of case.
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]+$")]
    username: String,
    /// 8 to 256 characters.
    #[schema(min_length = 8, max_length = 256)]
    password: String,
    /// Another player's referral code (case-insensitive): both players get the referral bonus.
    #[serde(default)]
    #[schema(max_length = 32)]
    referral_code: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct LoginBody {
    username: String,
    password: String,
}

/// A bearer token for the player endpoints.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    /// HS256 JWT; send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user_id: uuid::Uuid,
}

fn validate_username(username: &str) -> Result<(), ApiError> {
    let length_ok = (USERNAME_LENGTH_MIN..=USERNAME_LENGTH_MAX).contains(&username.chars().count());
    let characters_ok = username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if length_ok && characters_ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_username",
            format!(
                "username must be {USERNAME_LENGTH_MIN} to {USERNAME_LENGTH_MAX} characters of letters, digits, '_', '.' or '-'"
            ),
        ))
    }
}

fn validate_password(password: &str) -> Result<(), ApiError> {
    let length = password.chars().count();
    if (PASSWORD_LENGTH_MIN..=PASSWORD_LENGTH_MAX).contains(&length) {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_password",
            format!("password must be {PASSWORD_LENGTH_MIN} to {PASSWORD_LENGTH_MAX} characters"),
        ))
    }
}

/// A player's own referral code: 12 characters of Crockford base32 (60 bits) derived from the
/// player id, so it is stable for a retried signup and collisions are negligible.
pub fn referral_code_for(user_id: uuid::Uuid) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let bits = ids::derived_id(user_id, "referral-code").as_u128();
    (0..12)
        .map(|index| char::from(ALPHABET[((bits >> (index * 5)) & 0x1f) as usize]))
        .collect()
}

/// Create a player
///
/// Creates a player through the worker, so a signup with a referral code pays both bonuses
/// exactly once whatever is retried.
#[utoipa::path(
    post,
    path = "/signup",
    tag = "seed",
    params(IdempotencyKeyHeader),
    request_body = SignupBody,
    responses(
        (status = 200, description = "The player was created (or this is the stored result of the same signup).", body = SignupResult, headers(
            ("Idempotency-Key" = String, description = "The key used (generated when the request had none)."),
            ("Idempotent-Replayed" = String, description = "`true` when this is the stored result of an earlier request."),
            ("X-Command-Id" = uuid::Uuid, description = "The command's id."),
        )),
        (status = 202, response = CommandAccepted),
        (status = 400, response = openapi::BadRequest),
        (status = 409, description = "The username is taken, regardless of case (`username_taken`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 422, description = "`invalid_username`, `invalid_password`, `unknown_referral_code`, `idempotency_key_reused`.", body = ErrorBody),
        (status = 500, response = openapi::CommandFailed),
        (status = 503, response = openapi::Unavailable),
    ),
)]
pub async fn signup(
    State(state): State<AppState>,
    key: IdempotencyKey,
    JsonBody(body): JsonBody<SignupBody>,
) -> Result<Response, ApiError> {
    let username = body.username.trim().to_string();
    validate_username(&username)?;
    validate_password(&body.password)?;
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
    // Scoped by username, so two clients that happen to pick the same key for different
    // usernames never collide, while a retry of one signup maps to the same command.
    let principal = format!("signup:{}", username.to_lowercase());
    let fields = [
        username.to_lowercase(),
        body.password.clone(),
        referred_by_code.clone().unwrap_or_default(),
    ];
    let referral_bonus = state.config.referral_bonus;
    submit(
        &state,
        key,
        principal,
        &fields.iter().map(String::as_str).collect::<Vec<_>>(),
        |command_id| {
            let user_id = ids::derived_id(command_id, "user");
            Command::Signup {
                user_id,
                username,
                password_hash,
                referral_code: referral_code_for(user_id),
                referred_by_code,
                referral_bonus,
            }
        },
    )
    .await
}

/// Log in
///
/// A token for a username (case-insensitive) and password; 401 for anything else, taking the
/// same time whether or not the username exists.
#[utoipa::path(
    post,
    path = "/login",
    tag = "seed",
    request_body = LoginBody,
    responses(
        (status = 200, description = "A token.", body = LoginResponse),
        (status = 400, response = openapi::BadRequest),
        (status = 401, description = "Wrong username or password (`unauthorized`).", body = ErrorBody),
        (status = 413, response = openapi::PayloadTooLarge),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
)]
pub async fn login(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(address): axum::extract::ConnectInfo<std::net::SocketAddr>,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<LoginResponse>, ApiError> {
    // Throttled per username and per client address before any password work is done.
    state
        .limits
        .check_login(body.username.trim(), Some(address.ip()))?;
    let invalid = || ApiError::Unauthorized("invalid username or password".to_string());
    if body.password.chars().count() > PASSWORD_LENGTH_MAX
        || body.username.len() > USERNAME_LENGTH_MAX
    {
        return Err(invalid());
    }
    let user: Option<(uuid::Uuid, String, String, String)> = sqlx::query_as(
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
    Ok(Json(LoginResponse {
        token,
        token_type: "Bearer",
        expires_in: state.tokens.ttl_seconds(),
        user_id: id,
    }))
}
