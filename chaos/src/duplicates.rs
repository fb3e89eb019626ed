//! Duplicate deliveries: the harness publishes copies of command envelopes straight to their
//! partition queue, racing the client's own request or long after the command was applied, the
//! way a broker redelivers. Each copy must be recognised and answered with the stored result.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use shared::broker::{DELIVERY_MODE_PERSISTENT, Topology};
use shared::partition::partition_of;
use shared::wire::CommandEnvelope;

/// Longest the harness waits to connect to the broker, and for a publish to be confirmed.
const CONNECT_TIMEOUT_MS: u64 = 3_000;
const CONFIRM_TIMEOUT_MS: u64 = 5_000;
/// Applied commands kept for late duplicates (the oldest are dropped).
const APPLIED_POOL_MAX: usize = 2_000;

pub struct Duplicator {
    amqp_url: String,
    topology: Topology,
    live: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    /// Envelopes of commands that got a 200, for late duplicates.
    applied: Mutex<VecDeque<CommandEnvelope>>,
    pub published: AtomicU64,
    pub failed: AtomicU64,
}

impl Duplicator {
    pub fn new(amqp_url: String, topology: Topology) -> Self {
        Self {
            amqp_url,
            topology,
            live: tokio::sync::Mutex::new(None),
            applied: Mutex::new(VecDeque::new()),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    async fn connect(&self) -> anyhow::Result<(Connection, Channel)> {
        let connection = shared::broker::connect(&self.amqp_url, "chaos duplicator").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await?;
        Ok((connection, channel))
    }

    /// Publishes one copy of `envelope` to its partition queue; true once the broker confirmed
    /// it. Without a reply-to: nobody waits for its answer.
    pub async fn publish(&self, envelope: &CommandEnvelope) -> bool {
        let Ok(payload) = serde_json::to_vec(envelope) else {
            return false;
        };
        let routing_key = Topology::partition_routing_key(partition_of(
            envelope.command.partition_player(),
            self.topology.partitions,
        ));
        let exchange = self.topology.commands_exchange();
        let mut live = self.live.lock().await;
        if live.is_none() {
            match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), self.connect())
                .await
            {
                Ok(Ok(connected)) => *live = Some(connected),
                _ => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some((_, channel)) = live.as_ref() else {
            return false;
        };
        let publish = async {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload,
                    BasicProperties::default()
                        .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                        .with_content_type("application/json".into())
                        .with_message_id(envelope.id.to_string().as_str().into()),
                )
                .await?
                .await
        };
        match tokio::time::timeout(Duration::from_millis(CONFIRM_TIMEOUT_MS), publish).await {
            Ok(Ok(Confirmation::Ack(None))) => {
                self.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => {
                // Whatever broke, start over with a fresh connection next time.
                if let Some((connection, _)) = live.take() {
                    drop(connection.close(200, "reconnecting".into()).await);
                }
                self.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Remembers the envelope of a command that got a 200, for late duplicates.
    pub fn remember_applied(&self, envelope: CommandEnvelope) {
        if let Ok(mut applied) = self.applied.lock() {
            if applied.len() >= APPLIED_POOL_MAX {
                applied.pop_front();
            }
            applied.push_back(envelope);
        }
    }

    /// Some remembered envelopes, chosen by `pick` (an index below the pool's length).
    pub fn sample_applied(
        &self,
        count: usize,
        mut pick: impl FnMut(usize) -> usize,
    ) -> Vec<CommandEnvelope> {
        let Ok(applied) = self.applied.lock() else {
            return Vec::new();
        };
        if applied.is_empty() {
            return Vec::new();
        }
        (0..count)
            .filter_map(|_| applied.get(pick(applied.len())).cloned())
            .collect()
    }

    pub async fn close(&self) {
        if let Some((connection, _)) = self.live.lock().await.take() {
            drop(connection.close(200, "done".into()).await);
        }
    }
}
