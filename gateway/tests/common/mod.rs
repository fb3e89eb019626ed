//! A whole system per test: its own database and queue prefix on the real PostgreSQL and
//! RabbitMQ, with the gateway, a worker and the treasury running in-process.
//!
//! Every request made through `TestSystem` (`request`, `get`, `post`, `send`, and the helpers
//! built on them) is recorded, and `finish()` validates every recorded response against the
//! OpenAPI document the running gateway serves (see `openapi_check`).

#![allow(dead_code)]

pub mod openapi_check;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::GatewayConfig;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::config::CommonConfig;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "test-secret-that-is-long-enough-0123456789";
pub const PASSWORD: &str = "correct horse battery";

pub struct Options {
    pub partitions: u16,
    pub start_worker: bool,
    pub reply_timeout_ms: u64,
    pub batch_size_max: u16,
    /// Adjusts the gateway's configuration (limits, timeouts) before it starts.
    pub tune_gateway: fn(&mut GatewayConfig),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            partitions: 4,
            start_worker: true,
            reply_timeout_ms: 10_000,
            batch_size_max: 256,
            tune_gateway: |_| {},
        }
    }
}

pub struct TestSystem {
    pub base_url: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub common: CommonConfig,
    pub batch_size_max: u16,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Every exchange made through this system, for the OpenAPI check in `finish()`.
    exchanges: Arc<Mutex<Vec<openapi_check::Exchange>>>,
    /// Drops the database and the queues if the test fails before `finish()`.
    cleanup: shared::testing::Cleanup,
}

pub struct WorkerHandle {
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl WorkerHandle {
    /// SIGTERM: finish the in-flight batch, hand the partitions over, exit.
    pub async fn terminate(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stopped")
            .unwrap();
    }

    /// SIGKILL: drop everything mid-flight; connections close, locks and deliveries are freed.
    pub async fn kill(self) {
        self.task.abort();
        drop(self.task.await);
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

impl TestSystem {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        shared::telemetry::init("text");
        let common = shared::testing::isolated_config(options.partitions);
        let shutdown = CancellationToken::new();
        let mut config = GatewayConfig::from_common(common.clone());
        config.jwt_secret = Some(JWT_SECRET.to_string());
        config.reply_timeout_ms = options.reply_timeout_ms;
        config.http_addr = "127.0.0.1:0".to_string();
        (options.tune_gateway)(&mut config);
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
        let mut system = Self {
            base_url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            pool,
            batch_size_max: options.batch_size_max,
            cleanup: shared::testing::Cleanup::new(&common),
            common,
            shutdown,
            tasks,
            exchanges: Arc::default(),
        };
        system.start_treasury();
        if options.start_worker {
            system.start_worker();
        }
        system.wait_healthy().await;
        system
    }

    /// Starts a worker that can be stopped (gracefully or by abort, like a SIGKILL) on its own.
    pub fn spawn_worker(&self, worker_id: &str) -> WorkerHandle {
        let mut config = worker::WorkerConfig::from_common(self.common.clone());
        config.batch_size_max = self.batch_size_max;
        config.rebalance_interval_ms = 250;
        config.worker_id = Some(worker_id.to_string());
        let token = self.shutdown.child_token();
        let stop = token.clone();
        let task = tokio::spawn(async move {
            worker::run(config, token).await.expect("worker");
        });
        WorkerHandle { stop, task }
    }

    pub fn start_worker(&mut self) {
        let mut config = worker::WorkerConfig::from_common(self.common.clone());
        config.batch_size_max = self.batch_size_max;
        config.worker_id = Some(format!("test-worker-{}", self.tasks.len()));
        let token = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            worker::run(config, token).await.expect("worker");
        }));
    }

    fn start_treasury(&mut self) {
        let config = treasury::TreasuryConfig::from_common(self.common.clone());
        let token = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            treasury::run(config, token).await.expect("treasury");
        }));
    }

    /// Start-up (migrations, broker topology, first connections) takes well under a second on
    /// a quiet machine but several seconds when the suite's tests start together on 2 cores;
    /// the bound is generous because this is set-up, not a behaviour under test.
    async fn wait_healthy(&self) {
        for _ in 0..600 {
            let request = self.client.get(format!("{}/health", self.base_url));
            if let Ok(reply) = self.try_send(request).await
                && reply.status == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway never became healthy");
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    /// Sends a request built on `self.client` (for bodies or headers the helpers do not make)
    /// and records it for the OpenAPI check. The body is JSON when it parses, else a string.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        self.try_send(request).await.expect("request sent")
    }

    async fn try_send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        let (client, request) = request.build_split();
        let request = request?;
        let method = request.method().clone();
        let url = request.url().clone();
        let response = client.execute(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        self.exchanges
            .lock()
            .unwrap()
            .push(openapi_check::Exchange {
                method: method.to_string(),
                path: url.path().to_string(),
                query: url.query().map(str::to_string),
                status: status.as_u16(),
                content_type: headers
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_string),
                body: text.clone(),
            });
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> Reply {
        self.request(Method::POST, path, token, key, Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.request(Method::GET, path, token, None, None).await
    }

    pub async fn signup(&self, username: &str, referral_code: Option<&str>) -> Reply {
        let mut body = json!({ "username": username, "password": PASSWORD });
        if let Some(code) = referral_code {
            body["referralCode"] = json!(code);
        }
        self.post("/signup", None, None, body).await
    }

    pub async fn login(&self, username: &str) -> String {
        let reply = self
            .post(
                "/login",
                None,
                None,
                json!({ "username": username, "password": PASSWORD }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "login: {:?}", reply.body);
        reply.body["token"].as_str().expect("token").to_string()
    }

    /// Signs a player up and logs in; returns the token.
    pub async fn player(&self, username: &str) -> String {
        let reply = self.signup(username, None).await;
        assert_eq!(reply.status, StatusCode::OK, "signup: {:?}", reply.body);
        self.login(username).await
    }

    pub async fn balance(&self, token: &str) -> Value {
        let reply = self.get("/balance", Some(token)).await;
        assert_eq!(reply.status, StatusCode::OK, "balance: {:?}", reply.body);
        reply.body
    }

    pub async fn top_up(&self, token: &str, amount: i64) -> Reply {
        self.post("/top-up", Some(token), None, json!({ "amount": amount }))
            .await
    }

    /// Buys one of `item` with a fresh Idempotency-Key.
    pub async fn purchase(&self, token: &str, item: &str) -> Reply {
        self.post("/purchase", Some(token), None, json!({ "item": item }))
            .await
    }

    /// Waits until `check` holds for the player's balance (bounded), for follow-ups.
    pub async fn eventually_balance(&self, token: &str, check: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            let balance = self.balance(token).await;
            if check(&balance) {
                return balance;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the balance never reached the expected state: {}",
            self.balance(token).await
        );
    }

    /// Partition owners as the admin endpoint reports them: partition -> owner.
    pub async fn owners(&self, admin: &str) -> Vec<Option<String>> {
        let reply = self.get("/v1/admin/partitions", Some(admin)).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.body["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["owner"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits (bounded) until the owners satisfy `check`; returns how long it took.
    pub async fn wait_owners(
        &self,
        admin: &str,
        within: Duration,
        check: impl Fn(&[Option<String>]) -> bool,
    ) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let owners = self.owners(admin).await;
            if check(&owners) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "ownership did not converge within {within:?}: {owners:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates an API key with these scopes; returns the full key.
    pub async fn api_key(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|scope| (*scope).to_string()).collect();
        gateway::api_keys::create(&self.pool, "test backend", &scopes)
            .await
            .unwrap()
            .1
    }

    pub async fn player_id(&self, username: &str) -> uuid::Uuid {
        sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
            .bind(username)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn make_admin(&self, username: &str) -> String {
        sqlx::query("UPDATE users SET role = 'admin' WHERE username = $1")
            .bind(username)
            .execute(&self.pool)
            .await
            .unwrap();
        self.login(username).await
    }

    /// Checks every recorded response against the gateway's OpenAPI document, stops every
    /// process, checks that the books pass the audit, and drops the database.
    pub async fn finish(mut self) {
        let document: Value = self
            .client
            .get(format!("{}/v1/openapi.json", self.base_url))
            .send()
            .await
            .expect("the OpenAPI document is served")
            .json()
            .await
            .expect("the OpenAPI document is JSON");
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        let failures = openapi_check::check(&document, &exchanges);
        eprintln!(
            "openapi: validated {} responses against the document, {} failed",
            exchanges.len(),
            failures.len()
        );
        let report = shared::audit::run(&self.pool).await.expect("audit ran");
        assert!(
            report.passed,
            "audit failed: {}",
            serde_json::to_string_pretty(&report).unwrap()
        );
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("a process stopped within 20 s")
                .expect("a process ended cleanly");
        }
        self.pool.close().await;
        self.cleanup.run().await;
        assert!(
            failures.is_empty(),
            "{} of {} responses do not match the OpenAPI document (/v1/openapi.json):\n{}",
            failures.len(),
            exchanges.len(),
            failures.join("\n")
        );
    }
}

/// Asserts the service's error shape and code.
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "status for {:?}", reply.body);
    assert_eq!(reply.body["code"], code, "code in {:?}", reply.body);
    assert!(
        reply.body["error"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "error sentence in {:?}",
        reply.body
    );
    assert!(
        reply.body.get("request_id").is_some(),
        "request_id in {:?}",
        reply.body
    );
}

/// The (correlation id, reply) pairs a reply message carries: the worker sends a batch's replies
/// to one reply queue as one message. For tests that publish commands to the broker directly.
pub fn read_replies(
    delivery: &lapin::message::Delivery,
) -> Vec<(String, shared::wire::CommandReply)> {
    shared::wire::decode_replies(
        delivery
            .properties
            .kind()
            .as_ref()
            .map(|kind| kind.as_str()),
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        &delivery.data,
    )
    .expect("a readable reply message")
}

/// A broker connection of the test's own that publishes to the partition queues directly, as a
/// gateway would, with a reply queue for the workers' answers.
pub struct DirectBroker {
    connection: lapin::Connection,
    channel: lapin::Channel,
    topology: shared::broker::Topology,
    reply_queue: String,
    replies: lapin::Consumer,
}

impl DirectBroker {
    pub async fn open(system: &TestSystem) -> Self {
        use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions};
        let connection = shared::broker::connect(&system.common.amqp_url, "test")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let reply_queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let replies = channel
            .basic_consume(
                reply_queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            connection,
            channel,
            topology: shared::broker::Topology::from_config(&system.common),
            reply_queue: reply_queue.name().to_string(),
            replies,
        }
    }

    /// Publishes a persistent message to the commands exchange with this connection's reply
    /// queue, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        routing_key: &str,
        payload: &[u8],
        properties: lapin::BasicProperties,
    ) {
        self.channel
            .basic_publish(
                self.topology.commands_exchange().as_str().into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties
                    .with_delivery_mode(shared::broker::DELIVERY_MODE_PERSISTENT)
                    .with_reply_to(self.reply_queue.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Waits for `count` replies, with their correlation ids.
    pub async fn replies(&mut self, count: usize) -> Vec<(String, shared::wire::CommandReply)> {
        use futures_util::StreamExt;
        let mut answers = Vec::new();
        while answers.len() < count {
            let delivery = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
                .await
                .expect("a reply within 10 s")
                .unwrap()
                .unwrap();
            answers.extend(read_replies(&delivery));
        }
        answers
    }

    pub async fn close(self) {
        drop(self.connection.close(200, "done".into()).await);
    }
}
