//! Authentication: argon2id password hashes and HS256 JWTs with the algorithm pinned.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Passwords are hashed off the async runtime, at most this many at once, so a signup storm
/// cannot starve the request handlers of CPU.
pub const PASSWORD_HASHES_IN_FLIGHT_MAX: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub name: String,
    pub role: String,
    pub iat: u64,
    pub exp: u64,
}

/// Signs and checks tokens. The secret never leaves this struct and is never logged.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_seconds: u64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_seconds: u64) -> Self {
        // Pinned to HS256: a token that names any other algorithm (or "none") is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_seconds,
        }
    }

    pub fn issue(&self, user_id: Uuid, username: &str, role: &str) -> Result<String, ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id,
            name: username.to_string(),
            role: role.to_string(),
            iat: now,
            exp: now + self.ttl_seconds,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|error| ApiError::Internal(anyhow::anyhow!("signing a token: {error}")))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| ApiError::Unauthorized("the token is invalid or expired".to_string()))
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }
}

pub struct Passwords {
    permits: Semaphore,
    /// A real hash to verify against when the username is unknown, so a login takes as long
    /// for a missing user as for a wrong password.
    decoy_hash: String,
}

impl Passwords {
    pub fn new() -> Result<Self, ApiError> {
        Ok(Self {
            permits: Semaphore::new(PASSWORD_HASHES_IN_FLIGHT_MAX),
            decoy_hash: hash_blocking("decoy password that no account has")?,
        })
    }

    pub async fn hash(self: &Arc<Self>, password: String) -> Result<String, ApiError> {
        let _permit = self.permits.acquire().await.map_err(|_| closed())?;
        tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .map_err(|error| ApiError::Internal(error.into()))?
    }

    /// True when `password` matches `hash`; with `None`, checks against the decoy and fails.
    pub async fn verify(
        self: &Arc<Self>,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, ApiError> {
        let _permit = self.permits.acquire().await.map_err(|_| closed())?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy_hash.clone());
        let matches = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|error| ApiError::Internal(error.into()))?;
        Ok(known && matches)
    }
}

fn closed() -> ApiError {
    ApiError::Overloaded("the server is shutting down".to_string())
}

fn hash_blocking(password: &str) -> Result<String, ApiError> {
    // Argon2::default() is argon2id, version 19, with the crate's recommended cost parameters.
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|error| ApiError::Internal(anyhow::anyhow!("hashing a password: {error}")))
}

/// The authenticated caller: a player (or an admin) identified by a bearer token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub username: String,
    pub role: String,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// The principal a command id is derived from.
    pub fn command_principal(&self) -> String {
        format!("player:{}", self.user_id)
    }
}

fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized("an Authorization: Bearer token is required".to_string())
        })?;
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be a Bearer token".to_string())
        })
}

fn player_from_token(state: &AppState, token: &str) -> Result<Principal, ApiError> {
    let claims = state.tokens.verify(token)?;
    state.limits.check_player(claims.sub)?;
    Ok(Principal {
        user_id: claims.sub,
        username: claims.name,
        role: claims.role,
    })
}

/// A player's bearer token (the seed's endpoints accept nothing else).
impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        player_from_token(state, bearer_token(parts)?)
    }
}

/// Who is calling the v1 API: a player with a token, or a game backend with an API key.
#[derive(Debug, Clone)]
pub enum Caller {
    Player(Principal),
    Key(crate::api_keys::ApiKey),
}

impl Caller {
    /// The principal a command id is derived from, so keys of different callers never collide.
    pub fn command_principal(&self) -> String {
        match self {
            Self::Player(player) => player.command_principal(),
            Self::Key(key) => format!("key:{}", key.id),
        }
    }

    /// A player may act on their own wallet; a key needs the scope. Anything else is 403.
    pub fn authorize(&self, player: Uuid, scope: &str) -> Result<(), ApiError> {
        let allowed = match self {
            Self::Player(principal) => principal.user_id == player,
            Self::Key(key) => key.has_scope(scope),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(match self {
                Self::Player(_) => "players may act on their own wallet only".to_string(),
                Self::Key(_) => format!("this API key lacks the {scope} scope"),
            }))
        }
    }

    /// For endpoints only game backends may call (a key with the scope).
    pub fn require_key_scope(&self, scope: &str) -> Result<(), ApiError> {
        match self {
            Self::Key(key) if key.has_scope(scope) => Ok(()),
            Self::Key(_) => Err(ApiError::Forbidden(format!(
                "this API key lacks the {scope} scope"
            ))),
            Self::Player(_) => Err(ApiError::Forbidden(format!(
                "this needs an API key with the {scope} scope"
            ))),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts)?;
        if token.starts_with(crate::api_keys::KEY_PREFIX) {
            let key = state.api_keys.verify(&state.pool, token).await?;
            state.limits.check_key(key.id)?;
            Ok(Self::Key(key))
        } else {
            Ok(Self::Player(player_from_token(state, token)?))
        }
    }
}

/// An authenticated admin: a player with the admin role, or an API key with the admin scope.
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = match Caller::from_request_parts(parts, state).await? {
            Caller::Key(key) if key.has_scope("admin") => return Ok(Self(Caller::Key(key))),
            Caller::Key(_) => {
                return Err(ApiError::Forbidden(
                    "this API key lacks the admin scope".to_string(),
                ));
            }
            Caller::Player(principal) => principal,
        };
        // The role in the token is checked against the database, so a demoted admin's
        // unexpired token stops working at once.
        let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE id = $1")
            .bind(principal.user_id)
            .fetch_optional(&state.pool)
            .await?;
        if role.as_deref() == Some("admin") {
            Ok(Self(Caller::Player(principal)))
        } else {
            Err(ApiError::Forbidden(
                "this endpoint is for admins".to_string(),
            ))
        }
    }
}
