//! Signup and login.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use shared::ids;
use shared::wire::Command;

use crate::body::JsonBody;
use crate::error::ApiError;
use crate::routes::commands::{IdempotencyKey, submit};
use crate::state::AppState;

pub const USERNAME_LENGTH_MIN: usize = 3;
pub const USERNAME_LENGTH_MAX: usize = 32;
pub const PASSWORD_LENGTH_MIN: usize = 8;
/// Bounded so that hashing cost cannot be inflated by a huge password.
pub const PASSWORD_LENGTH_MAX: usize = 256;
pub const REFERRAL_CODE_LENGTH_MAX: usize = 32;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignupBody {
    username: String,
    password: String,
    #[serde(default)]
    referral_code: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginBody {
    username: String,
    password: String,
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

/// `POST /signup`: creates a player through the worker, so a signup with a referral code pays
/// both bonuses exactly once whatever is retried.
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

/// `POST /login`: a token for a username and password; 401 for anything else, taking the same
/// time whether or not the username exists.
pub async fn login(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(address): axum::extract::ConnectInfo<std::net::SocketAddr>,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "token": token,
        "tokenType": "Bearer",
        "expiresIn": state.tokens.ttl_seconds(),
        "userId": id,
    })))
}
