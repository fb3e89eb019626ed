//! Tokens, password hashes and referral codes made exactly as the gateway makes them, so the
//! baseline server speaks the same contract and the bench can mint tokens for players it seeded
//! straight into the database (logging 100,000 players in would cost 100,000 argon2 hashes).

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// The password of every player the bench creates (8 to 256 characters, like the gateway wants).
pub const BENCH_PASSWORD: &str = "bench-password-0123";

/// Passwords hashed at once by the baseline, as in the gateway, so a signup storm cannot starve
/// the request handlers of CPU.
pub const PASSWORD_HASHES_IN_FLIGHT_MAX: usize = 4;

/// The gateway's claims (`gateway::auth::Claims`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub name: String,
    pub role: String,
    pub iat: u64,
    pub exp: u64,
}

/// HS256 tokens with the algorithm pinned, as the gateway signs and checks them.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_seconds: u64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_seconds: u64) -> Self {
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

    pub fn issue(&self, user_id: Uuid, username: &str, role: &str) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id,
            name: username.to_string(),
            role: role.to_string(),
            iat: now,
            exp: now.saturating_add(self.ttl_seconds),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|error| anyhow::anyhow!("signing a token: {error}"))
    }

    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .ok()
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }
}

/// argon2id with the crate's default cost, the gateway's choice.
pub fn hash_password_blocking(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|error| anyhow::anyhow!("hashing a password: {error}"))
}

pub fn verify_password_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Hashes and checks passwords off the async runtime, a bounded number at once.
pub struct Passwords {
    permits: Semaphore,
    /// Verified against when the username is unknown, so a login takes as long either way.
    decoy_hash: String,
}

impl Passwords {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            permits: Semaphore::new(PASSWORD_HASHES_IN_FLIGHT_MAX),
            decoy_hash: hash_password_blocking("decoy password that no account has")?,
        })
    }

    pub async fn hash(self: &Arc<Self>, password: String) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || hash_password_blocking(&password)).await?
    }

    pub async fn verify(
        self: &Arc<Self>,
        password: String,
        hash: Option<String>,
    ) -> anyhow::Result<bool> {
        let _permit = self.permits.acquire().await?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy_hash.clone());
        let matches =
            tokio::task::spawn_blocking(move || verify_password_blocking(&password, &hash)).await?;
        Ok(known && matches)
    }
}

/// A player's own referral code as the gateway derives it: 12 Crockford base32 characters from
/// the player id (`gateway::routes::accounts::referral_code_for`).
pub fn referral_code_for(user_id: Uuid) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let bits = shared::ids::derived_id(user_id, "referral-code").as_u128();
    (0..12)
        .map(|index| char::from(ALPHABET[((bits >> (index * 5)) & 0x1f) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_pin_the_secret() {
        let tokens = Tokens::new(b"a secret that is long enough", 60);
        let id = Uuid::new_v4();
        let token = tokens.issue(id, "alice", "player").unwrap();
        let claims = tokens.verify(&token).unwrap();
        assert_eq!(claims.sub, id);
        assert_eq!(claims.name, "alice");
        let other = Tokens::new(b"another secret, also long enough", 60);
        assert!(other.verify(&token).is_none());
    }

    #[test]
    fn referral_codes_are_stable_crockford() {
        let id = Uuid::from_u128(42);
        let code = referral_code_for(id);
        assert_eq!(code, referral_code_for(id));
        assert_eq!(code.len(), 12);
        assert!(code.chars().all(|c| c.is_ascii_alphanumeric() && c != 'I'));
    }
}
