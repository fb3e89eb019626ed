//! The broker topology: names, declarations and connections. Every declaration is idempotent,
//! so every process declares everything it uses on start.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::SharedError;
use crate::config::CommonConfig;

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
