//! API keys for game backends: `wk_<key id>_<secret>`, stored as SHA-256 of the secret, with
//! scopes. Verified keys are cached for `KEY_CACHE_TTL_MS`, so a revocation takes effect within
//! that long without a database read on every request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;

pub const KEY_PREFIX: &str = "wk_";
/// How long a verified key is trusted without asking the database again.
pub const KEY_CACHE_TTL_MS: u64 = 10_000;
/// Keys remembered at most; past it the cache is emptied (keys are few, this only bounds memory).
const KEY_CACHE_ENTRIES_MAX: usize = 10_000;

pub const SCOPES: [&str; 5] = [
    "wallet:credit",
    "wallet:debit",
    "wallet:read",
    "catalog:write",
    "admin",
];

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
}

impl ApiKey {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes
            .iter()
            .any(|granted| granted == scope || granted == "admin")
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits `wk_<uuid simple>_<secret>` into its id and secret.
fn parse(token: &str) -> Option<(Uuid, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    Some((Uuid::parse_str(id).ok()?, secret))
}

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<Uuid, (String, ApiKey, Instant)>>,
}

impl KeyCache {
    pub async fn verify(&self, pool: &PgPool, token: &str) -> Result<ApiKey, ApiError> {
        let invalid = || ApiError::Unauthorized("the API key is invalid or revoked".to_string());
        let (id, secret) = parse(token).ok_or_else(invalid)?;
        let presented = hash_secret(secret);
        let cached = self
            .entries
            .lock()
            .ok()
            .and_then(|entries| entries.get(&id).cloned());
        if let Some((hash, key, checked_at)) = cached
            && checked_at.elapsed() < Duration::from_millis(KEY_CACHE_TTL_MS)
        {
            return if constant_time_eq(&hash, &presented) {
                Ok(key)
            } else {
                Err(invalid())
            };
        }
        let row: Option<(String, String, Vec<String>)> = sqlx::query_as(
            "SELECT name, secret_hash, scopes FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        let Some((name, hash, scopes)) = row else {
            if let Ok(mut entries) = self.entries.lock() {
                entries.remove(&id);
            }
            return Err(invalid());
        };
        if !constant_time_eq(&hash, &presented) {
            return Err(invalid());
        }
        let key = ApiKey { id, name, scopes };
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= KEY_CACHE_ENTRIES_MAX {
                entries.clear();
            }
            entries.insert(id, (hash, key.clone(), Instant::now()));
        }
        Ok(key)
    }
}

fn constant_time_eq(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// Creates a key and returns it in full; this is the only time the secret exists outside the
/// caller's hands.
pub async fn create(
    pool: &PgPool,
    name: &str,
    scopes: &[String],
) -> anyhow::Result<(Uuid, String)> {
    for scope in scopes {
        anyhow::ensure!(
            SCOPES.contains(&scope.as_str()),
            "unknown scope {scope}; scopes are {}",
            SCOPES.join(", ")
        );
    }
    anyhow::ensure!(!scopes.is_empty(), "a key needs at least one scope");
    let id = Uuid::new_v4();
    let mut secret_bytes = [0u8; 32];
    rand::fill(&mut secret_bytes);
    let secret = hex::encode(secret_bytes);
    sqlx::query("INSERT INTO api_keys (id, name, secret_hash, scopes) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(name)
        .bind(hash_secret(&secret))
        .bind(scopes)
        .execute(pool)
        .await?;
    Ok((id, format!("{KEY_PREFIX}{}_{secret}", id.simple())))
}

pub async fn revoke(pool: &PgPool, id: Uuid) -> anyhow::Result<bool> {
    Ok(
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected()
            == 1,
    )
}

/// A key as listed: id, name, scopes, created, revoked.
type KeyRow = (
    Uuid,
    String,
    Vec<String>,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

pub async fn list(pool: &PgPool) -> anyhow::Result<Vec<serde_json::Value>> {
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, name, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, scopes, created_at, revoked_at)| {
            serde_json::json!({ "id": id, "name": name, "scopes": scopes, "createdAt": created_at, "revokedAt": revoked_at })
        })
        .collect())
}
