//! The gateway: authentication, validation, publishing commands and waiting for their results,
//! and reads straight from PostgreSQL. It holds no wallet state.

pub mod api_keys;
pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod limits;
pub mod openapi;
pub mod publisher;
pub mod routes;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use shared::broker::Topology;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use config::GatewayConfig;
use error::{ApiError, REQUEST_ID};
use state::AppState;

static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Every documented route: the handlers' `#[utoipa::path]` annotations are both their routes and
/// their part of the OpenAPI document, so the two cannot disagree.
pub fn api_router() -> OpenApiRouter<AppState> {
    use routes::{accounts, admin, commands, health, ops, v1, wallet};
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(utoipa_axum::routes!(health::health))
        .routes(utoipa_axum::routes!(accounts::signup))
        .routes(utoipa_axum::routes!(accounts::login))
        .routes(utoipa_axum::routes!(wallet::balance))
        .routes(utoipa_axum::routes!(wallet::top_up))
        .routes(utoipa_axum::routes!(wallet::purchase))
        .routes(utoipa_axum::routes!(commands::command_status))
        .routes(utoipa_axum::routes!(v1::catalog, v1::add_item))
        .routes(utoipa_axum::routes!(v1::change_item))
        .routes(utoipa_axum::routes!(v1::gift))
        .routes(utoipa_axum::routes!(v1::reverse))
        .routes(utoipa_axum::routes!(v1::top_up))
        .routes(utoipa_axum::routes!(v1::grant_bonus))
        .routes(utoipa_axum::routes!(v1::purchase))
        .routes(utoipa_axum::routes!(v1::balances))
        .routes(utoipa_axum::routes!(v1::history))
        .routes(utoipa_axum::routes!(admin::audit))
        .routes(utoipa_axum::routes!(admin::partitions))
        .routes(utoipa_axum::routes!(admin::dead_letters))
        .routes(utoipa_axum::routes!(admin::replay_dead_letter))
        .routes(utoipa_axum::routes!(ops::overview))
        .routes(utoipa_axum::routes!(ops::page))
        .routes(utoipa_axum::routes!(metrics))
        .routes(utoipa_axum::routes!(openapi::openapi_json))
}

/// The HTTP application: every route with its middleware.
pub fn app(state: AppState) -> Router {
    let cors = cors_layer(&state.config.frontend_url);
    let request_timeout = Duration::from_millis(state.config.request_timeout_ms);
    let (api, _) = api_router().split_for_parts();
    api.layer(axum::Extension(routes::ops::Ops::shared()))
        .merge(openapi::docs_router())
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(shared::domain::error_body(
                    "method_not_allowed",
                    "this endpoint does not accept this method",
                    error::current_request_id().as_deref(),
                )),
            )
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(middleware::from_fn(scope_request_id))
        .layer(middleware::from_fn(track_metrics))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(&REQUEST_ID_HEADER)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
                })
                // A 5xx is logged at WARN here: a 503 (overloaded, or a dependency still starting,
                // as /health answers while the broker comes up) is expected and needs no one
                // woken, and a 500's internal detail is already logged at ERROR where the error
                // becomes a response (`error.rs`).
                .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER.clone(), MakeRequestUuid))
        .layer(cors)
        .with_state(state)
}

/// `GET /metrics`: Prometheus metrics of this gateway.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Metrics in the Prometheus text format.", content_type = "text/plain", body = String),
    ),
)]
pub async fn metrics() -> String {
    shared::metrics::install().render()
}

/// Counts requests by route and status and records their latency.
async fn track_metrics(request: Request, next: Next) -> Response {
    let path = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("wallet_http_requests_total", "method" => method, "path" => path.clone(), "status" => status).increment(1);
    metrics::histogram!("wallet_http_request_seconds", "path" => path)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Makes the request id available to error bodies and to the commands this request publishes.
async fn scope_request_id(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    REQUEST_ID.scope(request_id, next.run(request)).await
}

fn cors_layer(frontend_url: &str) -> CorsLayer {
    let origins: Vec<HeaderValue> = frontend_url
        .split(',')
        .map(|origin| origin.trim().trim_end_matches('/'))
        .filter(|origin| !origin.is_empty())
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            REQUEST_ID_HEADER.clone(),
        ])
        .expose_headers([
            header::LOCATION,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("idempotent-replayed"),
            HeaderName::from_static("x-command-id"),
            REQUEST_ID_HEADER.clone(),
        ])
        .max_age(Duration::from_secs(600))
}

/// Builds the state: database (created and migrated when needed), broker publisher (connected
/// in the background), token keys.
pub async fn build_state(
    config: GatewayConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<AppState> {
    // Like the worker and the treasury, the gateway waits for PostgreSQL instead of exiting when
    // it is not reachable yet (a crash restart, or everything starting at once).
    let Some(pool) = shared::db::bootstrap_with_retry(
        &config.common,
        shared::db::Planner::Default,
        config.retry_backoff_max_ms,
        shutdown,
    )
    .await
    else {
        anyhow::bail!("stopped before the database was ready");
    };
    let secret = match &config.jwt_secret {
        Some(secret) if secret.len() >= 16 => secret.as_bytes().to_vec(),
        Some(_) => anyhow::bail!("JWT_SECRET must be at least 16 bytes"),
        None => {
            tracing::warn!(
                "JWT_SECRET is not set: using a random secret, tokens will not survive a restart"
            );
            let mut secret = vec![0u8; 32];
            rand::fill(&mut secret[..]);
            secret
        }
    };
    shared::metrics::install();
    let fingerprint_key = shared::ids::fingerprint(&secret, "fingerprint-key", &[]).into_bytes();
    let tokens = auth::Tokens::new(&secret, config.jwt_ttl_seconds);
    let publisher = publisher::Publisher::new(
        Topology::from_config(&config.common),
        usize::from(config.publisher_channels),
        config.in_flight_max,
        usize::from(config.publish_batch_max),
        std::time::Duration::from_millis(config.publish_linger_busy_ms),
    );
    tokio::spawn(Arc::clone(&publisher).run(
        config.common.amqp_url.clone(),
        config.retry_backoff_max_ms,
        shutdown.clone(),
    ));
    let limits = limits::Limits::new(&config);
    tokio::spawn(Arc::clone(&limits).forget_idle(shutdown.clone()));
    Ok(AppState {
        api_keys: Arc::new(api_keys::KeyCache::default()),
        limits,
        pool,
        publisher,
        tokens: Arc::new(tokens),
        passwords: Arc::new(auth::Passwords::new()?),
        config: Arc::new(config),
        fingerprint_key: Arc::new(fingerprint_key),
    })
}

/// Serves on an already bound listener until `shutdown`; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = state.pool.clone();
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("serving HTTP")?;
    pool.close().await;
    Ok(())
}

/// Runs the gateway until `shutdown`.
pub async fn run(config: GatewayConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let state = match build_state(config, &shutdown).await {
        Ok(state) => state,
        // Asked to stop while waiting for the database: a clean exit, not a failure.
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(error) => return Err(error),
    };
    serve(listener, state, shutdown).await
}
