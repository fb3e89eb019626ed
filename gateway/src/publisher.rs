//! Publishing commands to the partition queues with publisher confirms, and routing the workers'
//! replies (direct reply-to) back to the waiting requests. Reconnects by itself; while the
//! broker is away every publish fails fast with 503 and nothing is answered 2xx unconfirmed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use shared::backoff::Backoff;
use shared::broker::Topology;
use shared::partition::partition_of;
use shared::wire::{CommandEnvelope, CommandReply};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The pseudo-queue of RabbitMQ's direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Persistent delivery: the broker writes the command to disk before confirming it.
const DELIVERY_MODE_PERSISTENT: u8 = 2;
/// How long the broker may take to confirm a publish before the request fails with 503.
const CONFIRM_TIMEOUT_MS: u64 = 5_000;

pub enum PublishOutcome {
    /// The worker answered in time.
    Replied(CommandReply),
    /// Confirmed by the broker, but no answer within the reply timeout: the command is
    /// accepted and will be applied; its status can be polled.
    Accepted,
}

struct Live {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

pub struct Publisher {
    topology: Topology,
    live: RwLock<Option<Arc<Live>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<CommandReply>>>,
    in_flight: Semaphore,
    channels: usize,
}

/// Removes a pending reply slot however the request ends (answered, timed out or cancelled).
struct PendingSlot<'a> {
    publisher: &'a Publisher,
    correlation_id: String,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.publisher.pending.lock() {
            pending.remove(&self.correlation_id);
        }
    }
}

impl Publisher {
    pub fn new(topology: Topology, channels: usize, in_flight_max: usize) -> Arc<Self> {
        Arc::new(Self {
            topology,
            live: RwLock::new(None),
            pending: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(in_flight_max),
            channels: channels.max(1),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.live.read().map(|live| live.is_some()).unwrap_or(false)
    }

    fn pick_channel(&self) -> Option<Channel> {
        let live = self.live.read().ok()?.clone()?;
        let index = live.next.fetch_add(1, Ordering::Relaxed) % live.channels.len();
        Some(live.channels[index].clone())
    }

    /// Publishes a command to its player's partition, waits for the broker's confirm, then for
    /// the worker's reply up to `reply_timeout`.
    pub async fn publish(
        &self,
        envelope: &CommandEnvelope,
        reply_timeout: Duration,
    ) -> Result<PublishOutcome, ApiError> {
        let _permit = self.in_flight.try_acquire().map_err(|_| {
            ApiError::Overloaded(
                "too many commands are waiting for an answer; retry shortly".to_string(),
            )
        })?;
        let channel = self.pick_channel().ok_or(ApiError::Unavailable {
            code: "broker_unavailable",
            what: "the message broker",
        })?;
        let partition = partition_of(
            envelope.command.partition_player(),
            self.topology.partitions,
        );
        let payload =
            serde_json::to_vec(envelope).map_err(|error| ApiError::Internal(error.into()))?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(correlation_id.clone(), sender);
        }
        let _slot = PendingSlot {
            publisher: self,
            correlation_id: correlation_id.clone(),
        };
        let unavailable = || ApiError::Unavailable {
            code: "broker_unavailable",
            what: "the message broker",
        };
        let confirm = channel
            .basic_publish(
                self.topology.commands_exchange().as_str().into(),
                Topology::partition_routing_key(partition).as_str().into(),
                // Mandatory: a command that no queue would take comes back as an error
                // instead of being confirmed and dropped.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                    .with_content_type("application/json".into())
                    .with_message_id(envelope.id.to_string().as_str().into())
                    .with_correlation_id(correlation_id.as_str().into())
                    .with_reply_to(DIRECT_REPLY_TO.into()),
            )
            .await
            .map_err(|error| {
                tracing::warn!(%error, "publish failed");
                unavailable()
            })?;
        let confirmation = tokio::time::timeout(Duration::from_millis(CONFIRM_TIMEOUT_MS), confirm)
            .await
            .map_err(|_| unavailable())?
            .map_err(|error| {
                tracing::warn!(%error, "publish not confirmed");
                unavailable()
            })?;
        match confirmation {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) | Confirmation::Nack(_) | Confirmation::NotRequested => {
                tracing::warn!(command_id = %envelope.id, "the broker did not take the command");
                return Err(unavailable());
            }
        }
        match tokio::time::timeout(reply_timeout, receiver).await {
            Ok(Ok(reply)) => Ok(PublishOutcome::Replied(reply)),
            _ => Ok(PublishOutcome::Accepted),
        }
    }

    /// Publishes raw bytes to a partition's routing key with a confirm and no reply (a dead
    /// letter being replayed).
    pub async fn publish_raw(&self, routing_key: &str, payload: &[u8]) -> Result<(), ApiError> {
        let unavailable = || ApiError::Unavailable {
            code: "broker_unavailable",
            what: "the message broker",
        };
        let channel = self.pick_channel().ok_or_else(unavailable)?;
        let confirm = channel
            .basic_publish(
                self.topology.commands_exchange().as_str().into(),
                routing_key.into(),
                // Mandatory: a replay to a routing key no queue takes is an error, not a drop.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                BasicProperties::default()
                    .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                    .with_content_type("application/json".into()),
            )
            .await
            .map_err(|_| unavailable())?;
        match tokio::time::timeout(Duration::from_millis(CONFIRM_TIMEOUT_MS), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            _ => Err(unavailable()),
        }
    }

    fn dispatch(&self, correlation_id: &str, reply: CommandReply) {
        let sender = self
            .pending
            .lock()
            .ok()
            .and_then(|mut pending| pending.remove(correlation_id));
        if let Some(sender) = sender {
            // The request may have given up waiting; then nobody needs this reply.
            drop(sender.send(reply));
        }
    }

    /// Keeps a connection with its channels up until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        amqp_url: String,
        retry_backoff_max_ms: u64,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(retry_backoff_max_ms);
        while !shutdown.is_cancelled() {
            match self.run_connected(&amqp_url, &shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "broker connection lost; reconnecting"
                    );
                    if let Ok(mut live) = self.live.write() {
                        *live = None;
                    }
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                    continue;
                }
            }
        }
        if let Ok(mut live) = self.live.write() {
            *live = None;
        }
    }

    async fn run_connected(
        self: &Arc<Self>,
        amqp_url: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let connection = shared::broker::connect(amqp_url, "gateway")
            .await
            .context("connecting to RabbitMQ")?;
        let setup = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        self.topology
            .declare(&setup)
            .await
            .context("declaring the topology")?;
        drop(setup.close(200, "declared".into()).await);

        let stop = shutdown.child_token();
        let mut readers = tokio::task::JoinSet::new();
        let mut channels = Vec::with_capacity(self.channels);
        for _ in 0..self.channels {
            let channel = connection
                .create_channel()
                .await
                .context("opening a channel")?;
            // Publisher confirms: a command is answered only after the broker has it on disk.
            channel
                .confirm_select(ConfirmSelectOptions { nowait: false })
                .await
                .context("enabling publisher confirms")?;
            // Direct reply-to needs its consumer on the publishing channel, in no-ack mode.
            let mut replies = channel
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_local: false,
                        no_ack: true,
                        exclusive: false,
                        nowait: false,
                    },
                    FieldTable::default(),
                )
                .await
                .context("consuming replies")?;
            let publisher = Arc::clone(self);
            let stop = stop.clone();
            readers.spawn(async move {
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        next = replies.next() => next,
                    };
                    let Some(Ok(delivery)) = next else { return };
                    match shared::wire::decode_replies(
                        delivery.properties.kind().as_ref().map(ShortString::as_str),
                        delivery
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(ShortString::as_str),
                        &delivery.data,
                    ) {
                        Ok(replies) => {
                            for (correlation_id, reply) in replies {
                                publisher.dispatch(&correlation_id, reply);
                            }
                        }
                        Err(error) => tracing::warn!(%error, "unreadable reply"),
                    }
                }
            });
            channels.push(channel);
        }
        if let Ok(mut live) = self.live.write() {
            *live = Some(Arc::new(Live {
                channels,
                next: AtomicUsize::new(0),
            }));
        }
        tracing::info!(channels = self.channels, "connected to the broker");
        // Any reply reader ending means its channel or the connection is gone.
        readers.join_next().await;
        stop.cancel();
        if let Ok(mut live) = self.live.write() {
            *live = None;
        }
        shared::broker::close_connection(connection, "gateway stopping").await;
        if shutdown.is_cancelled() {
            Ok(())
        } else {
            anyhow::bail!("a reply channel closed")
        }
    }
}
