//! The HTTP client of the virtual players: every write carries an Idempotency-Key and is retried
//! with the same key after a timeout, a broken connection, a 503 or a 202, a bounded number of
//! times with backoff. Every attempt is recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::ids;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope};
use uuid::Uuid;

use crate::duplicates::Duplicator;
use crate::records::{AttemptOutcome, CommandRecord, Intent, Kind, RequestLog};

/// Attempts per command (the first one included) before the client gives up on it.
pub const COMMAND_ATTEMPTS_MAX: u32 = 12;
/// Attempts of a login or a balance read.
pub const READ_ATTEMPTS_MAX: u32 = 20;
/// Backoff between attempts: starts here, doubles, and is capped.
pub const RETRY_BACKOFF_START_MS: u64 = 100;
pub const RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// A patient client's timeout per attempt.
pub const CLIENT_TIMEOUT_MS: u64 = 8_000;
/// An impatient client's timeout per attempt (it gives up while the gateway is still working).
pub const SHORT_TIMEOUT_MIN_MS: u64 = 30;
pub const SHORT_TIMEOUT_MAX_MS: u64 = 400;

/// The players' password (the run's database is private).
pub const PASSWORD: &str = "chaos horse battery staple";

/// How the client misbehaves, in whole percent.
#[derive(Debug, Clone, Copy)]
pub struct Misbehaviour {
    /// Attempts sent with a short timeout.
    pub short_timeout_percent: u32,
    /// Commands whose first attempt is sent twice at once with the same key.
    pub concurrent_percent: u32,
    /// Top-ups and purchases that the harness also publishes straight to their partition queue.
    pub duplicate_percent: u32,
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub timeouts: AtomicU64,
    pub connection_errors: AtomicU64,
    pub concurrent_pairs: AtomicU64,
    pub gave_up: AtomicU64,
    pub statuses: Mutex<BTreeMap<u16, u64>>,
}

impl Counters {
    fn count(&self, outcome: &AttemptOutcome) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            AttemptOutcome::Status { status, .. } => {
                if let Ok(mut statuses) = self.statuses.lock() {
                    *statuses.entry(*status).or_default() += 1;
                }
            }
            AttemptOutcome::Timeout => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            AttemptOutcome::Connect(_) | AttemptOutcome::Broken(_) => {
                self.connection_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The command the gateway builds for a top-up or a purchase.
fn command_of(intent: &Intent, player_id: Uuid) -> Option<Command> {
    match intent {
        Intent::Signup { .. } => None,
        Intent::TopUp { amount } => Some(Command::TopUp {
            player_id,
            amount: *amount,
        }),
        Intent::Purchase { item, quantity } => Some(Command::Purchase {
            player_id,
            item: (*item).to_string(),
            quantity: *quantity,
        }),
    }
}

/// The key the gateway keys request fingerprints with, derived from its JWT secret.
pub fn gateway_fingerprint_key(jwt_secret: &str) -> Vec<u8> {
    ids::fingerprint(jwt_secret.as_bytes(), "fingerprint-key", &[]).into_bytes()
}

/// How the gateway lays out a request's canonical fields for its fingerprint. That is the
/// gateway's business and has changed before, so the canary finds out which layout is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FingerprintLayout {
    /// The player id, then the request's fields (`[player, amount]`).
    PlayerThenFields,
    /// The request's fields only (`[amount]`, `[item, quantity]`).
    Fields,
}

impl FingerprintLayout {
    pub const CANDIDATES: [FingerprintLayout; 2] = [
        FingerprintLayout::PlayerThenFields,
        FingerprintLayout::Fields,
    ];

    /// The fingerprint of a top-up or a purchase under this layout.
    pub fn fingerprint(self, key: &[u8], player_id: Uuid, intent: &Intent) -> Option<String> {
        let (kind, mut fields) = match intent {
            Intent::Signup { .. } => return None,
            Intent::TopUp { amount } => ("top_up", vec![amount.to_string()]),
            Intent::Purchase { item, quantity } => {
                ("purchase", vec![(*item).to_string(), quantity.to_string()])
            }
        };
        if self == FingerprintLayout::PlayerThenFields {
            fields.insert(0, player_id.to_string());
        }
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        Some(ids::fingerprint(key, kind, &fields))
    }
}

/// A logged-in player.
#[derive(Debug, Clone)]
pub struct Session {
    pub player_id: Uuid,
    pub username: String,
    pub token: String,
}

pub struct Client {
    http: reqwest::Client,
    base_url: String,
    pub log: RequestLog,
    pub counters: Counters,
    pub duplicator: Arc<Duplicator>,
    /// The gateway's fingerprint key and field layout, once the canary showed that the harness
    /// derives the gateway's fingerprints; None disables racing duplicate deliveries.
    fingerprinting: Mutex<Option<(Vec<u8>, FingerprintLayout)>>,
    pub misbehaviour: Misbehaviour,
}

/// The gateway's smallest Retry-After (whole seconds, at least one).
const RATE_LIMITED_WAIT_MS: u64 = 1_000;

/// The pause before the next attempt: the backoff, or the Retry-After of a 429.
fn pause_ms(outcomes: &[&AttemptOutcome], attempt: u32, rng: &mut StdRng) -> u64 {
    let rate_limited = outcomes
        .iter()
        .any(|outcome| matches!(outcome, AttemptOutcome::Status { status: 429, .. }));
    let backoff = backoff_ms(attempt, rng);
    if rate_limited {
        backoff.max(RATE_LIMITED_WAIT_MS)
    } else {
        backoff
    }
}

fn backoff_ms(attempt: u32, rng: &mut StdRng) -> u64 {
    let base = RETRY_BACKOFF_START_MS
        .saturating_mul(1u64 << attempt.min(16))
        .min(RETRY_BACKOFF_MAX_MS);
    // Jitter up to half the step, so retries of many clients spread out.
    base + rng.random_range(0..=base / 2)
}

impl Client {
    pub fn new(
        base_url: String,
        log: RequestLog,
        duplicator: Arc<Duplicator>,
        misbehaviour: Misbehaviour,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            base_url,
            log,
            counters: Counters::default(),
            duplicator,
            fingerprinting: Mutex::new(None),
            misbehaviour,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn enable_duplicates(&self, fingerprint_key: Vec<u8>, layout: FingerprintLayout) {
        if let Ok(mut fingerprinting) = self.fingerprinting.lock() {
            *fingerprinting = Some((fingerprint_key, layout));
        }
    }

    pub fn racing_duplicates_enabled(&self) -> bool {
        self.fingerprinting
            .lock()
            .is_ok_and(|fingerprinting| fingerprinting.is_some())
    }

    /// One HTTP attempt.
    async fn send(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> AttemptOutcome {
        let url = format!("{}{path}", self.base_url);
        let mut request = match body {
            Some(body) => self.http.post(url).json(body),
            None => self.http.get(url),
        }
        .timeout(timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .map(str::to_string)
                };
                let command_id = header("x-command-id").and_then(|id| id.parse().ok());
                let replayed = header("idempotent-replayed").map(|value| value == "true");
                match response.text().await {
                    Ok(text) => AttemptOutcome::Status {
                        status,
                        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                        command_id,
                        replayed,
                    },
                    Err(error) if error.is_timeout() => AttemptOutcome::Timeout,
                    Err(error) => AttemptOutcome::Broken(format!("reading the body: {error}")),
                }
            }
            Err(error) if error.is_timeout() => AttemptOutcome::Timeout,
            Err(error) if error.is_connect() => AttemptOutcome::Connect(error_chain(&error)),
            Err(error) => AttemptOutcome::Broken(error_chain(&error)),
        };
        self.counters.count(&outcome);
        outcome
    }

    /// The timeout of one attempt. Signups are always patient: each attempt costs the gateway
    /// an argon2 hash, and abandoned attempts would keep hashing on a two-core machine.
    fn attempt_timeout(&self, kind: Kind, rng: &mut StdRng) -> Duration {
        if kind != Kind::Signup
            && rng.random_range(0..100) < self.misbehaviour.short_timeout_percent
        {
            Duration::from_millis(rng.random_range(SHORT_TIMEOUT_MIN_MS..=SHORT_TIMEOUT_MAX_MS))
        } else {
            Duration::from_millis(CLIENT_TIMEOUT_MS)
        }
    }

    /// Sends a command until it has a result or the attempts run out; every attempt uses the
    /// same Idempotency-Key.
    pub async fn command(
        &self,
        session: Option<&Session>,
        intent: &Intent,
        key: String,
        rng: &mut StdRng,
    ) -> CommandRecord {
        let (kind, path, body, principal, player_id, referral) = match (intent, session) {
            (
                Intent::Signup {
                    username,
                    referral_code,
                },
                _,
            ) => {
                let principal = format!("signup:{}", username.to_lowercase());
                let command_id = ids::command_id(&principal, &key);
                let mut body = json!({ "username": username, "password": PASSWORD });
                if let Some(code) = referral_code {
                    body["referralCode"] = json!(code);
                }
                (
                    Kind::Signup,
                    "/signup",
                    body,
                    principal,
                    ids::derived_id(command_id, "user"),
                    referral_code.clone(),
                )
            }
            (Intent::TopUp { amount }, Some(session)) => (
                Kind::TopUp,
                "/top-up",
                json!({ "amount": amount }),
                format!("player:{}", session.player_id),
                session.player_id,
                None,
            ),
            (Intent::Purchase { item, quantity }, Some(session)) => (
                Kind::Purchase,
                "/purchase",
                json!({ "item": item, "quantity": quantity }),
                format!("player:{}", session.player_id),
                session.player_id,
                None,
            ),
            (_, None) => unreachable!("only signups are sent without a session"),
        };
        let command_id = ids::command_id(&principal, &key);
        let mut record = CommandRecord::new(
            kind,
            intent.clone(),
            key.clone(),
            principal.clone(),
            command_id,
            player_id,
            referral,
        );
        let mut duplicate = None;
        if let Some(envelope) = self.envelope(intent, &principal, command_id, player_id)
            && rng.random_range(0..100) < self.misbehaviour.duplicate_percent
        {
            // Races the client's own request to the partition queue.
            let duplicator = Arc::clone(&self.duplicator);
            duplicate = Some(tokio::spawn(
                async move { duplicator.publish(&envelope).await },
            ));
        }
        let token = session.map(|session| session.token.as_str());
        for attempt in 0..COMMAND_ATTEMPTS_MAX {
            let concurrent =
                attempt == 0 && rng.random_range(0..100) < self.misbehaviour.concurrent_percent;
            let started = Instant::now();
            let outcomes = if concurrent {
                self.counters
                    .concurrent_pairs
                    .fetch_add(1, Ordering::Relaxed);
                let first_timeout = self.attempt_timeout(kind, rng);
                let second_timeout = self.attempt_timeout(kind, rng);
                let (first, second) = tokio::join!(
                    self.send(path, token, Some(&key), Some(&body), first_timeout),
                    self.send(path, token, Some(&key), Some(&body), second_timeout),
                );
                vec![first, second]
            } else {
                let timeout = self.attempt_timeout(kind, rng);
                vec![
                    self.send(path, token, Some(&key), Some(&body), timeout)
                        .await,
                ]
            };
            let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            for outcome in &outcomes {
                record.observe(outcome);
                self.log.attempt(
                    kind.as_str(),
                    Some(&key),
                    Some(&principal),
                    Some(command_id),
                    record.attempts,
                    outcome,
                    took,
                );
            }
            if record.settled() {
                break;
            }
            if attempt + 1 == COMMAND_ATTEMPTS_MAX {
                self.counters.gave_up.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let outcomes: Vec<&AttemptOutcome> = outcomes.iter().collect();
            tokio::time::sleep(Duration::from_millis(pause_ms(&outcomes, attempt, rng))).await;
        }
        if let Some(duplicate) = duplicate
            && let Ok(true) = duplicate.await
        {
            record.duplicates_published += 1;
        }
        if let (Some((200, _)), Some(command)) = (&record.result, command_of(intent, player_id)) {
            // Published again later, with the fingerprint stored in the books.
            self.duplicator.remember_applied(CommandEnvelope {
                v: COMMAND_VERSION,
                id: command_id,
                principal,
                fingerprint: String::new(),
                request_id: None,
                command,
            });
        }
        record
    }

    /// The envelope the gateway publishes for this command, when the harness can rebuild it
    /// exactly (top-ups and purchases, once the fingerprinting is known).
    fn envelope(
        &self,
        intent: &Intent,
        principal: &str,
        command_id: Uuid,
        player_id: Uuid,
    ) -> Option<CommandEnvelope> {
        let (key, layout) = self.fingerprinting.lock().ok()?.clone()?;
        Some(CommandEnvelope {
            v: COMMAND_VERSION,
            id: command_id,
            principal: principal.to_string(),
            fingerprint: layout.fingerprint(&key, player_id, intent)?,
            request_id: None,
            command: command_of(intent, player_id)?,
        })
    }

    /// Logs in (retrying what is retryable); None when it never succeeded.
    pub async fn login(&self, username: &str, rng: &mut StdRng) -> Option<Session> {
        let body = json!({ "username": username, "password": PASSWORD });
        for attempt in 0..READ_ATTEMPTS_MAX {
            let started = Instant::now();
            let outcome = self
                .send(
                    "/login",
                    None,
                    None,
                    Some(&body),
                    Duration::from_millis(CLIENT_TIMEOUT_MS),
                )
                .await;
            self.log.attempt(
                "login",
                None,
                Some(username),
                None,
                attempt + 1,
                &outcome,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            );
            if let AttemptOutcome::Status {
                status: 200, body, ..
            } = &outcome
            {
                let token = body["token"].as_str()?.to_string();
                let player_id = body["userId"].as_str()?.parse().ok()?;
                return Some(Session {
                    player_id,
                    username: username.to_string(),
                    token,
                });
            }
            tokio::time::sleep(Duration::from_millis(pause_ms(&[&outcome], attempt, rng))).await;
        }
        None
    }

    /// GET /balance (retrying what is retryable).
    pub async fn balance(&self, session: &Session, rng: &mut StdRng) -> Option<Value> {
        for attempt in 0..READ_ATTEMPTS_MAX {
            let started = Instant::now();
            let outcome = self
                .send(
                    "/balance",
                    Some(&session.token),
                    None,
                    None,
                    Duration::from_millis(CLIENT_TIMEOUT_MS),
                )
                .await;
            self.log.attempt(
                "balance",
                None,
                Some(&session.username),
                None,
                attempt + 1,
                &outcome,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            );
            if let AttemptOutcome::Status {
                status: 200, body, ..
            } = outcome
            {
                return Some(body);
            }
            tokio::time::sleep(Duration::from_millis(pause_ms(&[&outcome], attempt, rng))).await;
        }
        None
    }

    /// True when GET /health answers 200.
    pub async fn healthy(&self) -> bool {
        matches!(
            self.http
                .get(format!("{}/health", self.base_url))
                .timeout(Duration::from_millis(CLIENT_TIMEOUT_MS))
                .send()
                .await,
            Ok(response) if response.status() == StatusCode::OK
        )
    }
}

fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
