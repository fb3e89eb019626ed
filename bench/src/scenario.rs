//! The scenarios: what the players are, how they are prepared before the measurement, and which
//! request each send makes.
//!
//! - `purchase-hot`: players buy items (90 % gold coins at 10 GEMS, 10 % treasure boxes at 50);
//!   every purchase credits the treasury and debits the shop, the two hot accounts.
//! - `zipf`: purchases and top-ups over 100,000 players whose popularity follows Zipf's law.
//! - `signup-referral`: a signup storm where most new players give one of a few referral codes,
//!   so every such signup pays two bonuses from the treasury and one to a hot referrer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use rand::Rng;
use reqwest::header::HeaderValue;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::{BENCH_PASSWORD, Tokens};

/// Setup requests (signups, logins, top-ups) in flight at once.
pub const SETUP_CONCURRENCY: usize = 16;
/// How often a setup login is tried while the signup may still be on its way to the worker.
pub const SETUP_LOGIN_ATTEMPTS_MAX: u32 = 100;
/// Pause between those attempts.
pub const SETUP_LOGIN_RETRY_MS: u64 = 100;
/// How often one setup request answered 429 (rate limited) is sent again.
pub const SETUP_RATE_LIMITED_ATTEMPTS_MAX: u32 = 30;
/// Longest `Retry-After` the setup honours at once, in seconds.
pub const SETUP_RETRY_AFTER_MAX_S: u64 = 60;
/// Lifetime of the tokens the bench mints for players it seeded in SQL.
pub const MINTED_TOKEN_TTL_S: u64 = 24 * 60 * 60;
/// Largest number of players a scenario may prepare.
pub const PLAYERS_MAX: usize = 1_000_000;
/// Longest measured window or warm-up accepted, in seconds (a day).
pub const DURATION_MAX_S: f64 = 86_400.0;
/// Highest open-loop rate accepted (sends per second).
pub const OPEN_LOOP_RATE_MAX: f64 = 1_000_000.0;
/// Largest top-up the zipf scenario sends in one request.
pub const ZIPF_TOP_UP_AMOUNT_MAX: i64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    PurchaseHot,
    Zipf,
    SignupReferral,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::PurchaseHot => "purchase-hot",
            ScenarioKind::Zipf => "zipf",
            ScenarioKind::SignupReferral => "signup-referral",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// N clients, each sending its next request as soon as the previous one was answered.
    Closed,
    /// A fixed offered rate; latency counts from the intended send time.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupMethod {
    /// Signup, login and top-up over HTTP, like real players.
    Http,
    /// Players inserted straight into the database with their balance, tokens minted with the
    /// target's JWT secret. Needs `--database-url` and `--jwt-secret`.
    Sql,
}

/// What to run and how hard: shared by `run` and `compare`.
#[derive(Debug, Clone, Parser)]
#[command(name = "scenario")]
pub struct ScenarioArgs {
    /// The scenario.
    #[arg(long, value_enum)]
    pub scenario: ScenarioKind,

    /// Closed loop (clients as fast as they can) or open loop (a fixed offered rate).
    #[arg(long, value_enum, default_value = "closed")]
    pub mode: Mode,

    /// Closed loop: number of concurrent clients.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub clients: u32,

    /// Open loop: requests per second offered.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Open loop: most requests outstanding at once; a send due while this many are
    /// outstanding is dropped and counted.
    #[arg(long, default_value_t = 2_048, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub outstanding_max: u32,

    /// Length of the measured window.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,

    /// Load sent before the measured window and not recorded.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,

    /// Players (purchase-hot: 256, zipf: 100,000) or, for signup-referral, referrers (5).
    #[arg(long)]
    pub players: Option<usize>,

    /// How players are created (default: http for purchase-hot and signup-referral, sql for zipf).
    #[arg(long, value_enum)]
    pub setup: Option<SetupMethod>,

    /// GEMS each player gets at setup (one top-up over HTTP, at most the target's TOP_UP_MAX).
    /// Default: 1,000,000 for purchase-hot, 10,000 for zipf.
    #[arg(long)]
    pub balance: Option<i64>,

    /// zipf: exponent of the popularity law (1.0: the 1st player is twice as popular as the 2nd).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,

    /// zipf: share of requests that are top-ups (the rest are purchases), in percent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub top_up_percent: u8,

    /// signup-referral: share of signups that give a referral code, in percent.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub referral_percent: u8,

    /// Per-request timeout of the load client.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Directory of the disk probe's file (`bench::disk`): put it on the disk PostgreSQL and
    /// RabbitMQ write to. Created when missing; the file is removed after the window.
    #[arg(long, default_value = "bench-results")]
    pub disk_probe_dir: PathBuf,

    /// Do not probe the disk's flush latency during the measured window.
    #[arg(long)]
    pub no_disk_probe: bool,

    /// Write every request of the measured window (intended send time, latency, status) and every
    /// flush of the disk probe to a CSV file in this directory, one file per measurement
    /// (`bench::trace`; at most 4,000,000 rows each).
    #[arg(long)]
    pub trace_dir: Option<PathBuf>,
}

impl ScenarioArgs {
    pub fn players(&self) -> usize {
        self.players.unwrap_or(match self.scenario {
            ScenarioKind::PurchaseHot => 256,
            ScenarioKind::Zipf => 100_000,
            ScenarioKind::SignupReferral => 5,
        })
    }

    pub fn setup_method(&self) -> SetupMethod {
        self.setup.unwrap_or(match self.scenario {
            ScenarioKind::Zipf => SetupMethod::Sql,
            ScenarioKind::PurchaseHot | ScenarioKind::SignupReferral => SetupMethod::Http,
        })
    }

    pub fn balance(&self) -> i64 {
        self.balance.unwrap_or(match self.scenario {
            ScenarioKind::PurchaseHot => 1_000_000,
            ScenarioKind::Zipf => 10_000,
            ScenarioKind::SignupReferral => 0,
        })
    }

    /// Checks the combination of options before anything is sent.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.duration_s > 0.0 && self.duration_s <= DURATION_MAX_S,
            "--duration-s must be above 0 and at most {DURATION_MAX_S}"
        );
        anyhow::ensure!(
            self.warmup_s >= 0.0 && self.warmup_s <= DURATION_MAX_S,
            "--warmup-s must be from 0 to {DURATION_MAX_S}"
        );
        if self.mode == Mode::Open {
            let rate = self
                .rate
                .ok_or_else(|| anyhow::anyhow!("--mode open needs --rate"))?;
            anyhow::ensure!(
                rate > 0.0 && rate <= OPEN_LOOP_RATE_MAX,
                "--rate must be above 0 and at most {OPEN_LOOP_RATE_MAX}"
            );
        }
        anyhow::ensure!(
            (1..=PLAYERS_MAX).contains(&self.players()),
            "--players must be 1 to {PLAYERS_MAX}"
        );
        anyhow::ensure!(self.balance() >= 0, "--balance cannot be negative");
        anyhow::ensure!(
            self.zipf_exponent >= 0.0 && self.zipf_exponent.is_finite(),
            "--zipf-exponent cannot be negative"
        );
        Ok(())
    }
}

/// A running wallet (the real system or the baseline) to drive.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in the tables ("system", "baseline" or the URL).
    pub label: String,
    pub base_url: String,
    /// Its database, for `--setup sql`.
    pub database_url: Option<String>,
    /// Its JWT secret, for minting tokens after `--setup sql`.
    pub jwt_secret: Option<String>,
}

/// A prepared player: the bearer header to send.
#[derive(Debug, Clone)]
pub struct Player {
    pub id: Uuid,
    pub authorization: HeaderValue,
}

/// Everything the measurement needs from the setup.
pub struct Prepared {
    pub scenario: ScenarioKind,
    /// Distinguishes this run's names and keys from any earlier run against the same target.
    pub run_id: String,
    pub players: Vec<Player>,
    pub referral_codes: Vec<String>,
    pub zipf: Option<ZipfTable>,
    pub setup: SetupMethod,
    pub setup_s: f64,
    pub top_up_percent: u8,
    pub referral_percent: u8,
}

/// A short random lowercase id, for names that must not collide with earlier runs.
pub fn new_run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The queue prefix of the processes a run spawns, so that its clean-up deletes exactly the
/// queues they declared.
pub fn run_queue_prefix(run_id: &str) -> String {
    format!("bench.{run_id}.")
}

/// The HTTP client of the load: keep-alive connections, no proxy, Nagle off.
pub fn http_client(request_timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .context("building the HTTP client")
}

/// Creates the scenario's players (and referrers) on the target.
pub async fn prepare(target: &Target, args: &ScenarioArgs) -> anyhow::Result<Prepared> {
    args.validate()?;
    let started = Instant::now();
    let run_id = new_run_id();
    let client = http_client(Duration::from_millis(args.request_timeout_ms))?;
    check_health(&client, &target.base_url).await?;
    let method = args.setup_method();
    let count = args.players();
    let prefix = format!("b{run_id}p");
    let balance = match args.scenario {
        ScenarioKind::SignupReferral => 0,
        _ => args.balance(),
    };
    let players = match method {
        SetupMethod::Http => {
            setup_http(&client, &target.base_url, &prefix, &run_id, count, balance).await?
        }
        SetupMethod::Sql => setup_sql(target, &prefix, count, balance).await?,
    };
    let mut referral_codes = Vec::new();
    if args.scenario == ScenarioKind::SignupReferral {
        for player in &players {
            let balance = get_json(&client, &target.base_url, "/balance", player).await?;
            let code = balance["referralCode"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("GET /balance has no referralCode: {balance}"))?;
            referral_codes.push(code.to_string());
        }
    }
    let zipf = (args.scenario == ScenarioKind::Zipf)
        .then(|| ZipfTable::new(players.len(), args.zipf_exponent));
    Ok(Prepared {
        scenario: args.scenario,
        run_id,
        players,
        referral_codes,
        zipf,
        setup: method,
        setup_s: started.elapsed().as_secs_f64(),
        top_up_percent: args.top_up_percent,
        referral_percent: args.referral_percent,
    })
}

pub async fn check_health(client: &reqwest::Client, base_url: &str) -> anyhow::Result<()> {
    let response = client
        .get(format!("{base_url}/health"))
        .send()
        .await
        .with_context(|| format!("GET {base_url}/health"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{base_url}/health answered {}: {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

async fn get_json(
    client: &reqwest::Client,
    base_url: &str,
    path: &str,
    player: &Player,
) -> anyhow::Result<Value> {
    let response = client
        .get(format!("{base_url}{path}"))
        .header(reqwest::header::AUTHORIZATION, player.authorization.clone())
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "GET {path} answered {status}: {body}");
    Ok(body)
}

/// POSTs a setup request. A 429 (the gateway's rate limits: the bench is one client address
/// standing in for every player) is waited out as its `Retry-After` says and sent again, at
/// most [`SETUP_RATE_LIMITED_ATTEMPTS_MAX`] times.
async fn post_json(
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&HeaderValue>,
    key: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut request = client.post(url).header("Idempotency-Key", key).json(body);
        if let Some(authorization) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let retry_after_s = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(1)
            .clamp(1, SETUP_RETRY_AFTER_MAX_S);
        let body = response.json().await.unwrap_or(Value::Null);
        if status != 429 || attempts >= SETUP_RATE_LIMITED_ATTEMPTS_MAX {
            return Ok((status, body));
        }
        tokio::time::sleep(Duration::from_secs(retry_after_s)).await;
    }
}

/// Signs up, logs in and tops up each player over HTTP, a bounded number at once.
async fn setup_http(
    client: &reqwest::Client,
    base_url: &str,
    prefix: &str,
    run_id: &str,
    count: usize,
    balance: i64,
) -> anyhow::Result<Vec<Player>> {
    let results: Vec<anyhow::Result<Player>> = futures_util::stream::iter(0..count)
        .map(|index| async move {
            let username = format!("{prefix}{index}");
            let (status, body) = post_json(
                client,
                &format!("{base_url}/signup"),
                None,
                &format!("{run_id}-signup-{index}"),
                &json!({ "username": username, "password": BENCH_PASSWORD }),
            )
            .await?;
            // 202: accepted but not applied yet; the login below waits for it.
            anyhow::ensure!(
                status == 200 || status == 202,
                "signup of {username} answered {status}: {body}"
            );
            let mut attempts = 0;
            let (id, token) = loop {
                attempts += 1;
                let (status, body) = post_json(
                    client,
                    &format!("{base_url}/login"),
                    None,
                    &format!("{run_id}-login-{index}-{attempts}"),
                    &json!({ "username": username, "password": BENCH_PASSWORD }),
                )
                .await?;
                if status == 200 {
                    let token = body["token"].as_str().unwrap_or_default().to_string();
                    let id = body["userId"]
                        .as_str()
                        .and_then(|id| id.parse::<Uuid>().ok())
                        .unwrap_or_default();
                    break (id, token);
                }
                anyhow::ensure!(
                    status == 401 && attempts < SETUP_LOGIN_ATTEMPTS_MAX,
                    "login of {username} answered {status}: {body}"
                );
                tokio::time::sleep(Duration::from_millis(SETUP_LOGIN_RETRY_MS)).await;
            };
            let authorization = HeaderValue::from_str(&format!("Bearer {token}"))?;
            if balance > 0 {
                let (status, body) = post_json(
                    client,
                    &format!("{base_url}/top-up"),
                    Some(&authorization),
                    &format!("{run_id}-fund-{index}"),
                    &json!({ "amount": balance }),
                )
                .await?;
                anyhow::ensure!(
                    status == 200 || status == 202,
                    "top-up of {username} answered {status}: {body}"
                );
            }
            Ok(Player { id, authorization })
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Inserts the players into the target's database and mints their tokens.
async fn setup_sql(
    target: &Target,
    prefix: &str,
    count: usize,
    balance: i64,
) -> anyhow::Result<Vec<Player>> {
    let database_url = target
        .database_url
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--setup sql needs the target's --database-url"))?;
    let secret = target
        .jwt_secret
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("--setup sql needs the target's --jwt-secret"))?;
    let mut common = shared::config::CommonConfig::with_defaults();
    common.database_url = database_url.to_string();
    common.database_connections_max = 2;
    let pool = shared::db::connect(&common)
        .await
        .context("connecting to the target's database")?;
    let seeded = crate::seed::seed_players(&pool, prefix, count, balance).await;
    pool.close().await;
    let tokens = Tokens::new(secret.as_bytes(), MINTED_TOKEN_TTL_S);
    seeded?
        .into_iter()
        .map(|player| {
            let token = tokens.issue(player.id, &player.username, "player")?;
            Ok(Player {
                id: player.id,
                authorization: HeaderValue::from_str(&format!("Bearer {token}"))?,
            })
        })
        .collect()
}

/// Zipf's law over `n` ranks, sampled by binary search in the cumulative table.
pub struct ZipfTable {
    cumulative: Vec<f64>,
}

impl ZipfTable {
    pub fn new(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect();
        Self { cumulative }
    }

    /// A rank from 0 (the most popular) to n - 1.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let point = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|value| *value <= point)
            .min(self.cumulative.len() - 1)
    }
}

/// One request of the load.
pub struct PlannedRequest {
    pub path: &'static str,
    pub authorization: Option<HeaderValue>,
    pub body: Vec<u8>,
    pub key: String,
}

/// Items the scenarios buy, with their shares (out of 10).
const ITEMS: [(&str, u32); 2] = [("gold_coin", 9), ("treasure_box", 1)];

fn purchase_body(rng: &mut impl Rng) -> Value {
    let roll = rng.random_range(0..10);
    let item = if roll < ITEMS[0].1 {
        ITEMS[0].0
    } else {
        ITEMS[1].0
    };
    json!({ "item": item, "quantity": 1 })
}

impl Prepared {
    /// The request of send number `sequence` of the measurement tagged `tag` (unique per
    /// measurement, so no two measurements on one setup share an idempotency key or a name).
    pub fn next_request(&self, rng: &mut impl Rng, tag: &str, sequence: u64) -> PlannedRequest {
        let key = format!("{tag}-{sequence}");
        let (path, authorization, body) = match self.scenario {
            ScenarioKind::PurchaseHot => {
                let player = &self.players[rng.random_range(0..self.players.len())];
                (
                    "/purchase",
                    Some(player.authorization.clone()),
                    purchase_body(rng),
                )
            }
            ScenarioKind::Zipf => {
                let rank = self.zipf.as_ref().map_or(0, |zipf| zipf.sample(rng));
                let player = &self.players[rank.min(self.players.len() - 1)];
                if rng.random_range(0..100) < self.top_up_percent {
                    (
                        "/top-up",
                        Some(player.authorization.clone()),
                        json!({ "amount": rng.random_range(1..=ZIPF_TOP_UP_AMOUNT_MAX) }),
                    )
                } else {
                    (
                        "/purchase",
                        Some(player.authorization.clone()),
                        purchase_body(rng),
                    )
                }
            }
            ScenarioKind::SignupReferral => {
                let mut body =
                    json!({ "username": format!("b{tag}s{sequence}"), "password": BENCH_PASSWORD });
                if !self.referral_codes.is_empty()
                    && rng.random_range(0..100) < self.referral_percent
                {
                    let code = &self.referral_codes[rng.random_range(0..self.referral_codes.len())];
                    body["referralCode"] = json!(code);
                }
                ("/signup", None, body)
            }
        };
        PlannedRequest {
            path,
            authorization,
            body: body.to_string().into_bytes(),
            key,
        }
    }
}

/// Shared by the tasks of one measurement.
pub type SharedPrepared = Arc<Prepared>;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipf_prefers_low_ranks() {
        let table = ZipfTable::new(1_000, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; 1_000];
        for _ in 0..100_000 {
            counts[table.sample(&mut rng)] += 1;
        }
        // Rank 1 has probability 1/H(1000) ≈ 13.4 %, rank 2 half that.
        assert!((12_000..15_000).contains(&counts[0]), "{}", counts[0]);
        assert!((5_700..7_700).contains(&counts[1]), "{}", counts[1]);
        assert!(counts[999] < 100);
    }

    #[test]
    fn zipf_of_one_player_is_that_player() {
        let table = ZipfTable::new(1, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(table.sample(&mut rng), 0);
    }

    #[test]
    fn options_are_checked() {
        let parse = |args: &[&str]| {
            ScenarioArgs::try_parse_from(std::iter::once("scenario").chain(args.iter().copied()))
        };
        let args = parse(&["--scenario", "zipf"]).unwrap();
        assert_eq!(args.players(), 100_000);
        assert_eq!(args.setup_method(), SetupMethod::Sql);
        assert!(args.validate().is_ok());
        let open = parse(&["--scenario", "purchase-hot", "--mode", "open"]).unwrap();
        assert!(open.validate().is_err(), "open loop without a rate");
        assert!(parse(&["--scenario", "nope"]).is_err());
        let endless = parse(&["--scenario", "zipf", "--duration-s", "1e300"]).unwrap();
        assert!(endless.validate().is_err());
        let flood = parse(&["--scenario", "zipf", "--mode", "open", "--rate", "1e12"]).unwrap();
        assert!(flood.validate().is_err());
    }
}
