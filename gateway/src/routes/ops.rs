//! The operator's view. `GET /ops` serves one self-contained page (no external assets) that
//! holds no data: it logs in and polls the admin endpoints. `GET /v1/admin/overview` gives what
//! no other endpoint does: queue depths, commands per second, request latency, hot account
//! balances with their unfolded credits (the treasury lag) and the last audit.
//!
//! The overview is sampled at most once per `OVERVIEW_REFRESH_MIN_MS` whatever the number of
//! open pages (callers in between get the cached sample), every part of it is bounded by a
//! timeout, and the audit (which reads every posting) runs in the background at most once per
//! `AUDIT_INTERVAL_SECONDS`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use shared::audit::AuditReport;
use shared::broker::{ProbeError, QueueDepth, QueueDepthProbe, Topology};
use tokio::sync::Mutex;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

/// The page, embedded in the binary.
const OPS_PAGE: &str = include_str!("../../ops/index.html");

/// Callers within this long of the last sample get that sample.
pub const OVERVIEW_REFRESH_MIN_MS: u64 = 1_000;
/// The audit runs at most this often (in the background); the page shows its age.
pub const AUDIT_INTERVAL_SECONDS: u64 = 30;
/// With no audit done yet, a request waits this long for the first one before answering.
const AUDIT_FIRST_WAIT_MS: u64 = 3_000;
/// Connecting to the broker for queue depths.
const BROKER_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Everything the broker part does in one sample (connect, channels, every passive declare).
const QUEUE_DEPTHS_TIMEOUT_MS: u64 = 3_000;
/// The database part of one sample (throughput counter, hot accounts, dead-letter counts).
const DATABASE_TIMEOUT_MS: u64 = 3_000;
/// Waiting for another request's sample in progress (itself bounded by the timeouts above).
const SAMPLE_LOCK_WAIT_MS: u64 = 10_000;
/// Commands per second are measured over about this long.
pub const RATE_WINDOW_SECONDS: u64 = 10;
/// Latency percentiles are computed over about this long.
pub const LATENCY_WINDOW_SECONDS: u64 = 60;
/// Samples kept for the windows (one per refresh at most, so this covers the latency window).
const SAMPLES_MAX: usize = 128;
/// The gateway's request latency histogram (see `track_metrics` in lib.rs).
const LATENCY_HISTOGRAM: &str = "wallet_http_request_seconds";

/// The operator's page
///
/// One self-contained HTML page (no external assets). Public: it holds no data, it logs in and
/// polls the admin endpoints.
#[utoipa::path(
    get,
    path = "/ops",
    tag = "operations",
    responses(
        (status = 200, description = "The ops page.", content_type = "text/html", body = String),
    ),
)]
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(OPS_PAGE),
    )
}

/// What the ops page shows
///
/// Queue depths, commands per second, request latency, hot account balances with their unfolded
/// credits (the treasury lag), dead-letter counts and the last audit. Sampled at most once a
/// second whatever the number of callers; a part that cannot be read carries an `error` instead
/// of `data`, and the rest is still there.
#[utoipa::path(
    get,
    path = "/v1/admin/overview",
    tag = "admin",
    responses(
        (status = 200, description = "The overview.", body = Overview),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 429, response = crate::openapi::RateLimited),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn overview(
    State(state): State<AppState>,
    Extension(ops): Extension<Arc<Ops>>,
    admin: Admin,
) -> Result<Response, ApiError> {
    overview_handler(&ops, state, admin).await
}

/// The overview's sampling state, one per application.
#[derive(Default)]
pub struct Ops {
    sampler: Mutex<Sampler>,
    audit: Arc<StdMutex<AuditState>>,
}

impl Ops {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

#[derive(Default)]
struct Sampler {
    last: Option<(Instant, Arc<Value>)>,
    samples: VecDeque<Sample>,
    /// Its broker connection is kept open between samples and reopened when it was lost;
    /// made on the first sample.
    broker: Option<QueueDepthProbe>,
}

struct Sample {
    at: Instant,
    /// Rows ever inserted into `commands` (PostgreSQL's statistics counter).
    commands_inserted: Option<i64>,
    /// Cumulative latency buckets of command requests: (upper bound in seconds, count).
    buckets: Vec<(f64, u64)>,
}

#[derive(Default)]
struct AuditState {
    last: Option<(Instant, Arc<AuditReport>)>,
    last_error: Option<String>,
    running: Option<Instant>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    generated_at: chrono::DateTime<chrono::Utc>,
    partitions: u16,
    queues: Section<Vec<QueueDepth>>,
    throughput: Section<Throughput>,
    latency: Section<Latency>,
    hot_accounts: Section<Vec<HotAccount>>,
    dead_letters: Section<DeadLetterCounts>,
    audit: AuditView,
}

/// One part of the overview: its data, or why it is missing (the rest is still shown).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Section<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl<T> Section<T> {
    fn from_result(result: Result<T, String>) -> Self {
        match result {
            Ok(data) => Self {
                data: Some(data),
                error: None,
            },
            Err(error) => Self {
                data: None,
                error: Some(error),
            },
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    /// Command results stored per second over `window_seconds`; None until two samples exist.
    #[schema(required = true)]
    commands_per_second: Option<f64>,
    #[schema(required = true)]
    window_seconds: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Command requests (signup, top-up, purchase, bonus, ...) answered in the window.
    requests: u64,
    /// None: since the gateway started (no earlier sample yet).
    #[schema(required = true)]
    window_seconds: Option<f64>,
    #[schema(required = true)]
    p50_ms: Option<f64>,
    #[schema(required = true)]
    p95_ms: Option<f64>,
    #[schema(required = true)]
    p99_ms: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotAccount {
    owner: String,
    asset: String,
    /// The cached balance, which lags its postings by the unfolded credits.
    balance: i64,
    unfolded_credits: i64,
    unfolded_count: i64,
    #[schema(required = true)]
    oldest_unfolded_seconds: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterCounts {
    total: i64,
    not_replayed: i64,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    #[schema(required = true)]
    report: Option<Arc<AuditReport>>,
    #[schema(required = true)]
    age_seconds: Option<f64>,
    running: bool,
    #[schema(required = true)]
    error: Option<String>,
    interval_seconds: u64,
}

async fn overview_handler(ops: &Ops, state: AppState, _admin: Admin) -> Result<Response, ApiError> {
    let audit = audit_view(&ops.audit, &state).await;
    let mut sampler = tokio::time::timeout(
        Duration::from_millis(SAMPLE_LOCK_WAIT_MS),
        ops.sampler.lock(),
    )
    .await
    .map_err(|_| ApiError::Overloaded("the overview is being sampled; retry".to_string()))?;
    let fresh = sampler
        .last
        .as_ref()
        .filter(|(at, _)| at.elapsed() < Duration::from_millis(OVERVIEW_REFRESH_MIN_MS));
    let mut body = match fresh {
        Some((_, body)) => Value::clone(body),
        None => {
            let body = Arc::new(sample(&mut sampler, &state).await);
            sampler.last = Some((Instant::now(), Arc::clone(&body)));
            Value::clone(&body)
        }
    };
    drop(sampler);
    // The audit has its own schedule: always the latest view of it.
    body["audit"] = serde_json::to_value(audit).unwrap_or(Value::Null);
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// Takes one sample of everything but the audit.
async fn sample(sampler: &mut Sampler, state: &AppState) -> Value {
    let topology = Topology::from_config(&state.config.common);
    let probe = sampler
        .broker
        .get_or_insert_with(|| QueueDepthProbe::new(&state.config.common.amqp_url, "gateway-ops"));
    let queues = queue_depths(probe, &topology).await;
    let database = tokio::time::timeout(
        Duration::from_millis(DATABASE_TIMEOUT_MS),
        database_figures(&state.pool),
    )
    .await
    .unwrap_or_else(|_| Err("the database did not answer in time".to_string()));
    let (commands_inserted, hot_accounts, dead_letters) = match database {
        Ok((inserted, hot, dead)) => (inserted, Ok(hot), Ok(dead)),
        Err(error) => (None, Err(error.clone()), Err(error)),
    };
    let now = Instant::now();
    let current = Sample {
        at: now,
        commands_inserted,
        buckets: command_latency_buckets(&shared::metrics::install().render()),
    };
    let throughput = throughput(&sampler.samples, &current);
    let latency = latency(&sampler.samples, &current);
    sampler.samples.push_back(current);
    let keep = Duration::from_secs(LATENCY_WINDOW_SECONDS * 2);
    while sampler.samples.len() > SAMPLES_MAX
        || sampler
            .samples
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.at) > keep)
    {
        sampler.samples.pop_front();
    }
    let overview = Overview {
        generated_at: chrono::Utc::now(),
        partitions: topology.partitions,
        queues: Section::from_result(queues),
        throughput: Section::from_result(Ok(throughput)),
        latency: Section::from_result(Ok(latency)),
        hot_accounts: Section::from_result(hot_accounts),
        dead_letters: Section::from_result(dead_letters),
        audit: AuditView {
            report: None,
            age_seconds: None,
            running: false,
            error: None,
            interval_seconds: AUDIT_INTERVAL_SECONDS,
        },
    };
    serde_json::to_value(overview).unwrap_or(Value::Null)
}

/// Message and consumer counts of every queue, on the probe's broker connection.
async fn queue_depths(
    probe: &mut QueueDepthProbe,
    topology: &Topology,
) -> Result<Vec<QueueDepth>, String> {
    probe
        .sample(
            topology,
            Duration::from_millis(BROKER_CONNECT_TIMEOUT_MS),
            Duration::from_millis(QUEUE_DEPTHS_TIMEOUT_MS),
        )
        .await
        .map_err(|error| {
            tracing::warn!(%error, "ops: cannot read the queue depths");
            match error {
                ProbeError::Timeout => "the message broker did not answer in time",
                ProbeError::Connect(_) => "the message broker is unavailable",
                ProbeError::Read(_) => "cannot read the queue depths from the message broker",
            }
            .to_string()
        })
}

type DatabaseFigures = (Option<i64>, Vec<HotAccount>, DeadLetterCounts);

async fn database_figures(pool: &sqlx::PgPool) -> Result<DatabaseFigures, String> {
    let failed = |error: sqlx::Error| {
        tracing::warn!(%error, "ops: a database read failed");
        "the database read failed".to_string()
    };
    // A counter PostgreSQL keeps anyway: no scan of `commands`, which has no index on time.
    // Backends report it at most about once a second, so the rate is slightly smoothed.
    let inserted: Option<i64> = sqlx::query_scalar(
        "SELECT n_tup_ins FROM pg_stat_user_tables
         WHERE relname = 'commands' AND schemaname = current_schema()",
    )
    .fetch_optional(pool)
    .await
    .map_err(failed)?;
    let hot: Vec<(String, String, i64, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT o.name, a.asset, a.balance, coalesce(sum(h.amount), 0)::bigint, count(h.id),
                extract(epoch FROM now() - min(h.created_at))::float8
         FROM accounts a
         JOIN system_owners o ON o.id = a.owner_id
         LEFT JOIN hot_credits h ON h.account_id = a.id
         WHERE a.is_hot
         GROUP BY o.name, a.asset, a.balance
         ORDER BY o.name, a.asset",
    )
    .fetch_all(pool)
    .await
    .map_err(failed)?;
    let (total, not_replayed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE replayed_at IS NULL) FROM dead_letters",
    )
    .fetch_one(pool)
    .await
    .map_err(failed)?;
    let hot = hot
        .into_iter()
        .map(
            |(owner, asset, balance, unfolded_credits, unfolded_count, oldest)| HotAccount {
                owner,
                asset,
                balance,
                unfolded_credits,
                unfolded_count,
                oldest_unfolded_seconds: oldest,
            },
        )
        .collect();
    Ok((
        inserted,
        hot,
        DeadLetterCounts {
            total,
            not_replayed,
        },
    ))
}

/// The oldest earlier sample no older than `window`, or else the newest earlier one.
fn base_sample(samples: &VecDeque<Sample>, now: Instant, window: Duration) -> Option<&Sample> {
    samples
        .iter()
        .find(|sample| now.duration_since(sample.at) <= window)
        .or_else(|| samples.back())
        .filter(|sample| now > sample.at)
}

fn throughput(samples: &VecDeque<Sample>, current: &Sample) -> Throughput {
    let counted: VecDeque<&Sample> = samples
        .iter()
        .filter(|sample| sample.commands_inserted.is_some())
        .collect();
    let window = Duration::from_secs(RATE_WINDOW_SECONDS);
    let base = counted
        .iter()
        .find(|sample| current.at.duration_since(sample.at) <= window)
        .or_else(|| counted.back())
        .filter(|sample| current.at > sample.at);
    match (current.commands_inserted, base) {
        (Some(now_inserted), Some(base)) => {
            let seconds = current.at.duration_since(base.at).as_secs_f64();
            let delta = now_inserted.saturating_sub(base.commands_inserted.unwrap_or(0));
            let per_second = delta.max(0) as f64 / seconds;
            Throughput {
                commands_per_second: Some((per_second * 100.0).round() / 100.0),
                window_seconds: Some(seconds),
            }
        }
        _ => Throughput {
            commands_per_second: None,
            window_seconds: None,
        },
    }
}

fn latency(samples: &VecDeque<Sample>, current: &Sample) -> Latency {
    // With no earlier sample (the first look), everything since the gateway started.
    let base = base_sample(
        samples,
        current.at,
        Duration::from_secs(LATENCY_WINDOW_SECONDS),
    );
    let window: Vec<(f64, u64)> = current
        .buckets
        .iter()
        .map(|(bound, count)| {
            let before = base
                .and_then(|base| base.buckets.iter().find(|(earlier, _)| earlier == bound))
                .map_or(0, |(_, count)| *count);
            (*bound, count.saturating_sub(before))
        })
        .collect();
    let to_ms =
        |seconds: Option<f64>| seconds.map(|seconds| (seconds * 1_000.0 * 100.0).round() / 100.0);
    Latency {
        requests: window.last().map_or(0, |(_, count)| *count),
        window_seconds: base.map(|base| current.at.duration_since(base.at).as_secs_f64()),
        p50_ms: to_ms(histogram_quantile(&window, 0.50)),
        p95_ms: to_ms(histogram_quantile(&window, 0.95)),
        p99_ms: to_ms(histogram_quantile(&window, 0.99)),
    }
}

/// Requests that carry a command (the latency the page shows); reads are left out.
fn is_command_path(path: &str) -> bool {
    matches!(path, "/signup" | "/top-up" | "/purchase")
        || (path.starts_with("/v1/journal/") && path.ends_with("/reverse"))
        || path
            .strip_prefix("/v1/players/{player}/")
            .is_some_and(|rest| !matches!(rest, "balances" | "history"))
}

/// Sums the cumulative buckets of the latency histogram over the command paths, from the
/// Prometheus text exposition. Sorted by bound; the last one is `+Inf` (the count).
fn command_latency_buckets(exposition: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{LATENCY_HISTOGRAM}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let (mut path, mut bound) = (None, None);
        for label in labels.split(',') {
            if let Some(value) = label.strip_prefix("path=\"") {
                path = value.strip_suffix('"');
            } else if let Some(value) = label.strip_prefix("le=\"") {
                bound = value.strip_suffix('"').and_then(|value| match value {
                    "+Inf" => Some(f64::INFINITY),
                    finite => finite.parse::<f64>().ok(),
                });
            }
        }
        let (Some(path), Some(bound), Ok(count)) = (path, bound, value.trim().parse::<f64>())
        else {
            continue;
        };
        if !is_command_path(path) || !count.is_finite() || count < 0.0 {
            continue;
        }
        let count = count as u64;
        match buckets.iter_mut().find(|(existing, _)| *existing == bound) {
            Some((_, total)) => *total = total.saturating_add(count),
            None => buckets.push((bound, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The quantile of cumulative buckets, interpolated within its bucket as Prometheus's
/// `histogram_quantile` does. None when the buckets hold nothing.
fn histogram_quantile(buckets: &[(f64, u64)], quantile: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = quantile * total as f64;
    let mut lower_bound = 0.0;
    let mut lower_count = 0u64;
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if bound.is_infinite() {
                // Above the largest finite bucket: its bound is the best estimate there is.
                return Some(lower_bound);
            }
            let in_bucket = count.saturating_sub(lower_count);
            if in_bucket == 0 {
                return Some(bound);
            }
            let fraction = (rank - lower_count as f64) / in_bucket as f64;
            return Some(lower_bound + (bound - lower_bound) * fraction.clamp(0.0, 1.0));
        }
        lower_bound = bound;
        lower_count = count;
    }
    Some(lower_bound)
}

/// The last audit, started again in the background when it is older than the interval. With
/// none yet, waits a little for the first.
async fn audit_view(audit: &Arc<StdMutex<AuditState>>, state: &AppState) -> AuditView {
    let interval = Duration::from_secs(AUDIT_INTERVAL_SECONDS);
    let started = {
        let Ok(mut current) = audit.lock() else {
            return AuditView {
                report: None,
                age_seconds: None,
                running: false,
                error: Some("the audit state is unavailable".to_string()),
                interval_seconds: AUDIT_INTERVAL_SECONDS,
            };
        };
        let due = current
            .last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= interval);
        if due && current.running.is_none() {
            current.running = Some(Instant::now());
            let audit = Arc::clone(audit);
            let pool = state.pool.clone();
            Some(tokio::spawn(async move {
                let result = shared::audit::run(&pool).await;
                if let Ok(mut current) = audit.lock() {
                    current.running = None;
                    match result {
                        Ok(report) => {
                            current.last = Some((Instant::now(), Arc::new(report)));
                            current.last_error = None;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "ops: the audit could not run");
                            current.last_error = Some("the audit could not run".to_string());
                        }
                    }
                }
            }))
        } else {
            None
        }
    };
    let first = audit.lock().is_ok_and(|current| current.last.is_none());
    if let (Some(task), true) = (started, first) {
        // The task goes on by itself if this wait ends first.
        drop(tokio::time::timeout(Duration::from_millis(AUDIT_FIRST_WAIT_MS), task).await);
    }
    let Ok(current) = audit.lock() else {
        return AuditView {
            report: None,
            age_seconds: None,
            running: false,
            error: Some("the audit state is unavailable".to_string()),
            interval_seconds: AUDIT_INTERVAL_SECONDS,
        };
    };
    AuditView {
        report: current.last.as_ref().map(|(_, report)| Arc::clone(report)),
        age_seconds: current
            .last
            .as_ref()
            .map(|(at, _)| at.elapsed().as_secs_f64()),
        running: current.running.is_some(),
        error: current.last_error.clone(),
        interval_seconds: AUDIT_INTERVAL_SECONDS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_paths() {
        for path in [
            "/signup",
            "/top-up",
            "/purchase",
            "/v1/players/{player}/top-up",
            "/v1/players/{player}/bonus",
            "/v1/players/{player}/purchase",
        ] {
            assert!(is_command_path(path), "{path}");
        }
        for path in [
            "/login",
            "/balance",
            "/v1/players/{player}/balances",
            "/v1/players/{player}/history",
            "/v1/admin/overview",
            "unmatched",
        ] {
            assert!(!is_command_path(path), "{path}");
        }
    }

    #[test]
    fn buckets_are_summed_over_command_paths() {
        let exposition = "\
# TYPE wallet_http_request_seconds histogram
wallet_http_request_seconds_bucket{path=\"/top-up\",le=\"0.005\"} 3
wallet_http_request_seconds_bucket{path=\"/top-up\",le=\"0.01\"} 4
wallet_http_request_seconds_bucket{path=\"/top-up\",le=\"+Inf\"} 5
wallet_http_request_seconds_bucket{path=\"/purchase\",le=\"0.005\"} 1
wallet_http_request_seconds_bucket{path=\"/purchase\",le=\"0.01\"} 1
wallet_http_request_seconds_bucket{path=\"/purchase\",le=\"+Inf\"} 1
wallet_http_request_seconds_bucket{path=\"/balance\",le=\"0.005\"} 100
wallet_http_request_seconds_bucket{path=\"/balance\",le=\"+Inf\"} 100
wallet_http_request_seconds_sum{path=\"/top-up\"} 0.5
wallet_http_request_seconds_count{path=\"/top-up\"} 5
";
        assert_eq!(
            command_latency_buckets(exposition),
            vec![(0.005, 4), (0.01, 5), (f64::INFINITY, 6)]
        );
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let buckets = [(0.01, 50), (0.02, 100), (f64::INFINITY, 100)];
        assert_eq!(histogram_quantile(&buckets, 0.5), Some(0.01));
        let p75 = histogram_quantile(&buckets, 0.75).unwrap();
        assert!((p75 - 0.015).abs() < 1e-9, "{p75}");
        // Everything above the largest finite bound: that bound is reported.
        let slow = [(0.01, 0), (f64::INFINITY, 10)];
        assert_eq!(histogram_quantile(&slow, 0.99), Some(0.01));
        assert_eq!(histogram_quantile(&[(f64::INFINITY, 0)], 0.5), None);
        assert_eq!(histogram_quantile(&[], 0.5), None);
    }
}
