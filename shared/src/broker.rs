//! The broker topology: names, declarations and connections. Every declaration is idempotent,
//! so every process declares everything it uses on start.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;

use crate::SharedError;
use crate::config::CommonConfig;

/// AMQP delivery mode 2, persistent: the broker writes the message to disk before confirming it,
/// so a confirmed command or follow-up survives a broker restart.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// Names of everything on the broker, with the configured prefix applied.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub partitions: u16,
    pub queue_expires_ms: Option<u32>,
}

impl Topology {
    pub fn from_config(config: &CommonConfig) -> Self {
        Self {
            prefix: config.queue_prefix.clone(),
            partitions: config.partitions,
            queue_expires_ms: config.queue_expires_ms,
        }
    }

    pub fn commands_exchange(&self) -> String {
        format!("{}wallet.commands", self.prefix)
    }

    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}wallet.commands.p{partition}", self.prefix)
    }

    /// The routing key of a partition on the commands exchange.
    pub fn partition_routing_key(partition: u16) -> String {
        format!("p{partition}")
    }

    pub fn treasury_queue(&self) -> String {
        format!("{}wallet.treasury", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}wallet.dead_letters", self.prefix)
    }

    fn queue_arguments(&self, single_active_consumer: bool) -> FieldTable {
        let mut arguments = FieldTable::default();
        // Quorum queues are replicated and durable: an accepted command survives a broker restart
        // and, in a cluster, the loss of a node.
        arguments.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        if single_active_consumer {
            // Exactly one consumer receives a partition's messages at a time, so commands of one
            // player are applied in order even when several workers consume the same queue.
            arguments.insert(
                ShortString::from("x-single-active-consumer"),
                AMQPValue::Boolean(true),
            );
        }
        if let Some(expires_ms) = self.queue_expires_ms {
            arguments.insert(
                ShortString::from("x-expires"),
                AMQPValue::LongUInt(expires_ms),
            );
        }
        arguments
    }

    /// Declares the exchange, every partition queue, the treasury queue and the dead letters.
    pub async fn declare(&self, channel: &Channel) -> Result<(), SharedError> {
        channel
            .exchange_declare(
                self.commands_exchange().as_str().into(),
                ExchangeKind::Direct,
                // Durable: the exchange survives a broker restart, so publishing never fails
                // because a restart forgot it.
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for partition in 0..self.partitions {
            let queue = self.partition_queue(partition);
            self.declare_queue(channel, &queue, true).await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.commands_exchange().as_str().into(),
                    Self::partition_routing_key(partition).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        self.declare_queue(channel, &self.treasury_queue(), true)
            .await?;
        self.declare_queue(channel, &self.dead_letter_queue(), false)
            .await?;
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        single_active_consumer: bool,
    ) -> Result<(), SharedError> {
        channel
            .queue_declare(
                queue.into(),
                // Durable, shared between processes, never auto-deleted: the queue outlives
                // every consumer and keeps accepted commands until they are applied.
                QueueDeclareOptions {
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(single_active_consumer),
            )
            .await?;
        Ok(())
    }
}

/// One queue's depth as the broker reports it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueDepth {
    pub name: String,
    /// "partition", "treasury" or "dead_letters".
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u16>,
    /// None when the queue does not exist (not declared yet, or expired).
    #[schema(required = true)]
    pub messages: Option<u32>,
    #[schema(required = true)]
    pub consumers: Option<u32>,
}

impl Topology {
    /// Every queue of the topology: name, kind and partition.
    fn queues(&self) -> Vec<(String, &'static str, Option<u16>)> {
        let mut queues: Vec<_> = (0..self.partitions)
            .map(|partition| {
                (
                    self.partition_queue(partition),
                    "partition",
                    Some(partition),
                )
            })
            .collect();
        queues.push((self.treasury_queue(), "treasury", None));
        queues.push((self.dead_letter_queue(), "dead_letters", None));
        queues
    }
}

/// Message and consumer counts of every queue of the topology, by passive declares on a
/// short-lived channel (declaring nothing). A missing queue makes the broker close the channel,
/// so the next queue gets a new one. The caller bounds the time this takes.
pub async fn queue_depths(
    connection: &Connection,
    topology: &Topology,
) -> Result<Vec<QueueDepth>, SharedError> {
    let queues = topology.queues();
    let mut channel = connection.create_channel().await?;
    let mut depths = Vec::with_capacity(queues.len());
    for (name, kind, partition) in queues {
        let declared = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    // Only asks: a missing queue is reported, never created with other arguments.
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let (messages, consumers) = match declared {
            Ok(queue) => (Some(queue.message_count()), Some(queue.consumer_count())),
            Err(_) => {
                channel = connection.create_channel().await?;
                (None, None)
            }
        };
        depths.push(QueueDepth {
            name,
            kind,
            partition,
            messages,
            consumers,
        });
    }
    drop(channel.close(200, "queue depths taken".into()).await);
    Ok(depths)
}

/// Why a queue-depth sample failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the message broker did not answer in time")]
    Timeout,
    #[error("cannot connect to the message broker: {0}")]
    Connect(SharedError),
    #[error("cannot read the queue depths from the message broker: {0}")]
    Read(SharedError),
}

/// Samples queue depths (`queue_depths`) on a broker connection kept between samples, opened
/// again after a failure. Used by the treasury's metrics and the gateway's ops overview.
pub struct QueueDepthProbe {
    amqp_url: String,
    connection_name: &'static str,
    connection: Option<Connection>,
}

impl QueueDepthProbe {
    pub fn new(amqp_url: &str, connection_name: &'static str) -> Self {
        Self {
            amqp_url: amqp_url.to_string(),
            connection_name,
            connection: None,
        }
    }

    /// One sample. Connecting is bounded by `connect_timeout` and the whole sample by
    /// `timeout`; the connection is taken out while in use, so after a failure or a timeout it
    /// is dropped (and closed) and the next sample connects again.
    pub async fn sample(
        &mut self,
        topology: &Topology,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Vec<QueueDepth>, ProbeError> {
        let kept = self
            .connection
            .take()
            .filter(|connection| connection.status().connected());
        let work = async {
            let connection = match kept {
                Some(connection) => connection,
                None => tokio::time::timeout(
                    connect_timeout,
                    connect(&self.amqp_url, self.connection_name),
                )
                .await
                .map_err(|_| ProbeError::Timeout)?
                .map_err(ProbeError::Connect)?,
            };
            let depths = queue_depths(&connection, topology)
                .await
                .map_err(ProbeError::Read)?;
            Ok::<_, ProbeError>((connection, depths))
        };
        let (connection, depths) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ProbeError::Timeout)??;
        self.connection = Some(connection);
        Ok(depths)
    }

    /// Closes the kept connection, if any.
    pub async fn close(self, reason: &str) {
        if let Some(connection) = self.connection {
            close_connection(connection, reason).await;
        }
    }
}

/// Sets the `wallet_queue_messages` and `wallet_queue_consumers` gauges (labels `queue`, `kind`)
/// from a sample; a missing queue reads as 0 messages and 0 consumers.
pub fn record_queue_depths(depths: &[QueueDepth]) {
    for depth in depths {
        let labels = [
            ("queue", depth.name.clone()),
            ("kind", depth.kind.to_string()),
        ];
        metrics::gauge!("wallet_queue_messages", &labels)
            .set(f64::from(depth.messages.unwrap_or(0)));
        metrics::gauge!("wallet_queue_consumers", &labels)
            .set(f64::from(depth.consumers.unwrap_or(0)));
    }
}

/// How long closing a connection may take. lapin's close waits for the broker's close-ok, and
/// the test suite saw a worker's shutdown wait for it for more than 20 s while other tests'
/// connections came and went. A process closes its connection last, when nothing is left
/// unacknowledged on it, so giving up on waiting loses nothing: lapin goes on closing the
/// dropped connection in the background, the socket goes when the process exits at the latest,
/// and the broker requeues whatever the connection still held once it is closed.
pub const CLOSE_TIMEOUT_MS: u64 = 2_000;

/// Closes a connection, giving up on the broker's answer after `CLOSE_TIMEOUT_MS`.
pub async fn close_connection(connection: Connection, reason: &str) {
    bounded_close(connection.close(200, reason.into()), "connection", reason).await;
}

/// Closes a channel, giving up on the broker's answer after `CLOSE_TIMEOUT_MS`. A process
/// closes its channels before their connection: lapin closes a channel whose last handle is
/// dropped in the background, and when the connection's close overtakes that, lapin logs a
/// connection error ("invalid channel state: Closing") at every clean shutdown.
pub async fn close_channel(channel: &Channel, reason: &str) {
    bounded_close(channel.close(200, reason.into()), "channel", reason).await;
}

/// Waits for a close handshake (`closing`, of a `what`) for at most `CLOSE_TIMEOUT_MS`. Its
/// error needs no handling: it means the connection or channel was closed already (the broker
/// or the connection went away), and nothing is left to do for it.
async fn bounded_close(
    closing: impl Future<Output = lapin::Result<()>>,
    what: &'static str,
    reason: &str,
) {
    if tokio::time::timeout(Duration::from_millis(CLOSE_TIMEOUT_MS), closing)
        .await
        .is_err()
    {
        tracing::warn!(what, reason, "the broker did not confirm closing in time");
    }
}

/// Connects to the broker with a connection name that shows up in the management UI.
pub async fn connect(amqp_url: &str, connection_name: &str) -> Result<Connection, SharedError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name.to_string()));
    Ok(Connection::connect(amqp_url, properties).await?)
}

/// Header carrying the reason a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-wallet-dead-letter-reason";
/// Header carrying the queue a dead letter came from, so it can be replayed there.
pub const DEAD_LETTER_SOURCE_HEADER: &str = "x-wallet-source-routing-key";
