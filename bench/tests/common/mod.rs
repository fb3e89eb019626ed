//! An in-process system (gateway, worker and treasury on their own database and queue prefix)
//! and an in-process baseline server (on a database of its own), for the bench's tests.

#![allow(dead_code)]

use std::time::Duration;

use bench::baseline::{BaselineConfig, BaselineState};
use bench::scenario::Target;
use gateway::GatewayConfig;
use shared::config::CommonConfig;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "bench-smoke-secret-0123456789abcdef";

pub struct Running {
    pub target: Target,
    pub pool: PgPool,
    /// Drops the database and deletes the queues, at `stop` or, if a test fails first, on drop.
    cleanup: shared::testing::Cleanup,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a process stopped within 20 s")
                .expect("a process ended cleanly");
        }
        self.pool.close().await;
        let mut cleanup = self.cleanup;
        cleanup.run().await;
    }
}

pub async fn start_system() -> Running {
    let common: CommonConfig = shared::testing::isolated_config(4);
    let shutdown = CancellationToken::new();
    let mut config = GatewayConfig::from_common(common.clone());
    config.jwt_secret = Some(JWT_SECRET.to_string());
    // One test client plays every player: the per-player limit would answer 429 to a second of
    // purchases by four players, which is the limiter's behaviour, not the bench's.
    config.rate_limit_player_per_second = 1_000_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let state = gateway::build_state(config, &shutdown)
        .await
        .expect("gateway state");
    let pool = state.pool.clone();
    let mut tasks = Vec::new();
    let token = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        gateway::serve(listener, state, token)
            .await
            .expect("gateway");
    }));
    let token = shutdown.clone();
    let treasury = treasury::TreasuryConfig::from_common(common.clone());
    tasks.push(tokio::spawn(async move {
        treasury::run(treasury, token).await.expect("treasury");
    }));
    let token = shutdown.clone();
    let mut worker = worker::WorkerConfig::from_common(common.clone());
    worker.worker_id = Some("bench-smoke-worker".to_string());
    tasks.push(tokio::spawn(async move {
        worker::run(worker, token).await.expect("worker");
    }));
    let running = Running {
        target: Target {
            label: "system".to_string(),
            base_url,
            database_url: Some(common.database_url.clone()),
            jwt_secret: Some(JWT_SECRET.to_string()),
        },
        pool,
        cleanup: shared::testing::Cleanup::new(&common),
        shutdown,
        tasks,
    };
    wait_healthy(&running.target.base_url).await;
    running
}

pub async fn start_baseline() -> Running {
    let common = shared::testing::isolated_config(4);
    let mut config =
        BaselineConfig::for_database(&common.database_url, Some(JWT_SECRET.to_string()));
    config.database_connections_max = 8;
    let state: BaselineState = bench::baseline::build_state(config)
        .await
        .expect("baseline state");
    let pool = state.pool.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        bench::baseline::serve(listener, state, token)
            .await
            .expect("baseline");
    });
    let running = Running {
        target: Target {
            label: "baseline".to_string(),
            base_url,
            database_url: Some(common.database_url.clone()),
            jwt_secret: Some(JWT_SECRET.to_string()),
        },
        pool,
        cleanup: shared::testing::Cleanup::new(&common),
        shutdown,
        tasks: vec![task],
    };
    wait_healthy(&running.target.base_url).await;
    running
}

pub async fn wait_healthy(base_url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(response) = client.get(format!("{base_url}/health")).send().await
            && response.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base_url} never became healthy");
}
