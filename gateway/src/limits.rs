//! Rate limits: per principal on every authenticated request, and on logins per username and per
//! client address. Answered with 429 and `Retry-After`. The limiters' memory is bounded by
//! forgetting idle keys every `FORGET_INTERVAL_MS`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::error::ApiError;

/// How often limiters forget keys that are back to a full allowance.
const FORGET_INTERVAL_MS: u64 = 60_000;

pub struct Limits {
    players: DefaultKeyedRateLimiter<String>,
    keys: DefaultKeyedRateLimiter<String>,
    login_usernames: DefaultKeyedRateLimiter<String>,
    login_addresses: DefaultKeyedRateLimiter<String>,
}

fn per_second(rate: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN))
}

fn per_minute(rate: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl Limits {
    pub fn new(config: &GatewayConfig) -> Arc<Self> {
        Arc::new(Self {
            players: RateLimiter::keyed(per_second(config.rate_limit_player_per_second)),
            keys: RateLimiter::keyed(per_second(config.rate_limit_key_per_second)),
            login_usernames: RateLimiter::keyed(per_minute(
                config.login_attempts_per_username_per_minute,
            )),
            login_addresses: RateLimiter::keyed(per_minute(
                config.login_attempts_per_address_per_minute,
            )),
        })
    }

    fn check(limiter: &DefaultKeyedRateLimiter<String>, key: String) -> Result<(), ApiError> {
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                retry_after_seconds: wait.as_secs().max(1),
            }
        })
    }

    pub fn check_player(&self, player: uuid::Uuid) -> Result<(), ApiError> {
        Self::check(&self.players, player.to_string())
    }

    pub fn check_key(&self, key: uuid::Uuid) -> Result<(), ApiError> {
        Self::check(&self.keys, key.to_string())
    }

    /// Both the username and the client address must have attempts left.
    pub fn check_login(
        &self,
        username: &str,
        address: Option<std::net::IpAddr>,
    ) -> Result<(), ApiError> {
        if let Some(address) = address {
            Self::check(&self.login_addresses, address.to_string())?;
        }
        Self::check(&self.login_usernames, username.to_lowercase())
    }

    /// Forgets idle keys periodically until `shutdown`.
    pub async fn forget_idle(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(FORGET_INTERVAL_MS)) => {}
            }
            for limiter in [
                &self.players,
                &self.keys,
                &self.login_usernames,
                &self.login_addresses,
            ] {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }
}
