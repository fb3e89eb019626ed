//! Publishing commands to the partition queues with publisher confirms, and routing the workers'
//! replies (direct reply-to) back to the waiting requests. Reconnects by itself; while the
//! broker is away every publish fails fast with 503 and nothing is answered 2xx unconfirmed.
//!
//! Commands are published in batches, one task per partition: a request queues its command for
//! its partition, and the partition's task publishes whatever has queued as one message
//! (`shared::wire::CommandBatch`), waits for the broker's confirm and tells each request. While
//! one message is being confirmed the next commands queue, so a message carries one command when
//! the gateway is quiet and more as the load grows. A partition whose last message carried more
//! than one command is busy, and its next message waits `PUBLISH_LINGER_BUSY_MS` after its first
//! command for more; a quiet partition never waits. The broker's cost is mostly per message, so
//! this is what lets it keep up with thousands of commands a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use shared::backoff::Backoff;
use shared::broker::{DELIVERY_MODE_PERSISTENT, Topology};
use shared::partition::partition_of;
use shared::wire::{AddressedCommand, CommandEnvelope, CommandReply};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The pseudo-queue of RabbitMQ's direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How long the broker may take to confirm a publish before the request fails with 503.
const CONFIRM_TIMEOUT_MS: u64 = 5_000;
/// A batch stops taking commands once its JSON is this large (the first command always goes):
/// it keeps one message far below the broker's frame and message limits.
const PUBLISH_BATCH_BYTES_MAX: usize = 1024 * 1024;

/// A worker's reply as the gateway holds it: the body is passed on to the client as the worker
/// wrote it, never parsed.
pub type Reply = CommandReply<Box<serde_json::value::RawValue>>;

pub enum PublishOutcome {
    /// The worker answered in time.
    Replied(Reply),
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
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    in_flight: Semaphore,
    channels: usize,
    /// Most commands in one message.
    batch_max: usize,
    /// How long a busy partition's next message waits for more commands after its first one.
    linger_busy: Duration,
    /// Each partition's queue of commands waiting to be published.
    queues: Vec<mpsc::Sender<Queued>>,
    /// The receiving ends, taken by `run`, which starts the partitions' publishing tasks.
    receivers: Mutex<Vec<mpsc::Receiver<Queued>>>,
}

/// A command waiting for its partition's next message.
struct Queued {
    envelope: Box<serde_json::value::RawValue>,
    command_id: uuid::Uuid,
    correlation_id: String,
    /// Told whether the broker confirmed the message that carried the command.
    confirmed: oneshot::Sender<bool>,
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
    pub fn new(
        topology: Topology,
        channels: usize,
        in_flight_max: usize,
        batch_max: usize,
        linger_busy: Duration,
    ) -> Arc<Self> {
        // Each queue is bounded by everything that may be in flight, which the semaphore bounds.
        let (queues, receivers) = (0..topology.partitions)
            .map(|_| mpsc::channel(in_flight_max.max(1)))
            .unzip();
        Arc::new(Self {
            topology,
            live: RwLock::new(None),
            pending: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(in_flight_max),
            channels: channels.max(1),
            batch_max: batch_max.max(1),
            linger_busy,
            queues,
            receivers: Mutex::new(receivers),
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
        let unavailable = || ApiError::Unavailable {
            code: "broker_unavailable",
            what: "the message broker",
        };
        if !self.is_connected() {
            return Err(unavailable());
        }
        let partition = partition_of(
            envelope.command.partition_player(),
            self.topology.partitions,
        );
        let raw = serde_json::value::to_raw_value(envelope)
            .map_err(|error| ApiError::Internal(error.into()))?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(correlation_id.clone(), sender);
        }
        let _slot = PendingSlot {
            publisher: self,
            correlation_id: correlation_id.clone(),
        };
        let (confirmed, confirmation) = oneshot::channel();
        // Where a command's time goes before its answer: waiting for its partition's publisher
        // and the broker's confirm, then for the worker.
        let queued_at = Instant::now();
        self.queues[usize::from(partition)]
            .try_send(Queued {
                envelope: raw,
                command_id: envelope.id,
                correlation_id,
                confirmed,
            })
            .map_err(|_| unavailable())?;
        // False, or the partition's task gone (the gateway stopping): not taken by the broker.
        if !confirmation.await.unwrap_or(false) {
            tracing::warn!(command_id = %envelope.id, "the broker did not take the command");
            return Err(unavailable());
        }
        metrics::histogram!("wallet_command_confirmed_seconds")
            .record(queued_at.elapsed().as_secs_f64());
        match tokio::time::timeout(reply_timeout, receiver).await {
            Ok(Ok(reply)) => {
                metrics::histogram!("wallet_command_replied_seconds")
                    .record(queued_at.elapsed().as_secs_f64());
                Ok(PublishOutcome::Replied(reply))
            }
            _ => Ok(PublishOutcome::Accepted),
        }
    }

    /// One partition's publishing task: takes what has queued (up to `batch_max` commands),
    /// publishes it as one message, waits for the confirm and tells each request, until `stop`.
    async fn publish_partition(
        self: Arc<Self>,
        partition: u16,
        mut queue: mpsc::Receiver<Queued>,
        stop: CancellationToken,
    ) {
        let mut batch: Vec<Queued> = Vec::with_capacity(self.batch_max);
        // Whether the last message carried more than one command: the partition is busy.
        let mut busy = false;
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return,
                first = queue.recv() => first,
            };
            let Some(first) = first else { return };
            let mut bytes = first.envelope.get().len();
            batch.push(first);
            // A busy partition waits a little for more commands, so the broker handles fewer,
            // larger messages; a quiet one (a lone request) publishes at once.
            let linger_until = (busy && !self.linger_busy.is_zero())
                .then(|| tokio::time::Instant::now() + self.linger_busy);
            while batch.len() < self.batch_max && bytes < PUBLISH_BATCH_BYTES_MAX {
                let Some(next) = next_queued(&mut queue, linger_until).await else {
                    break;
                };
                bytes += next.envelope.get().len();
                batch.push(next);
            }
            busy = batch.len() > 1;
            // A request that gave up before its command was published (its client went away,
            // or its deadline passed) has its command dropped, as it would have been had it
            // never reached the queue: nobody waits for it, and a retry carries the same key.
            batch.retain(|queued| !queued.confirmed.is_closed());
            if batch.is_empty() {
                continue;
            }
            metrics::histogram!("wallet_publish_batch_commands").record(batch.len() as f64);
            let confirmed = self.publish_batch(partition, &batch).await;
            for queued in batch.drain(..) {
                // The request may have stopped waiting; then nobody needs to know.
                _ = queued.confirmed.send(confirmed);
            }
        }
    }

    /// Publishes a partition's queued commands as one message and waits for the broker's
    /// confirm. One command goes as a plain envelope, as every worker version reads it.
    async fn publish_batch(&self, partition: u16, batch: &[Queued]) -> bool {
        let Some(channel) = self.pick_channel() else {
            return false;
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_content_type("application/json".into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        let commands = batch
            .iter()
            .map(|queued| AddressedCommand {
                correlation_id: queued.correlation_id.as_str().into(),
                envelope: &queued.envelope,
            })
            .collect();
        let (payload, message_type) = match shared::wire::encode_commands(commands) {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::error!(%error, "could not encode a batch of commands");
                return false;
            }
        };
        let properties = match (message_type, batch.first()) {
            // A plain envelope is answered at the message's own correlation id.
            (None, Some(single)) => properties
                .with_message_id(single.command_id.to_string().as_str().into())
                .with_correlation_id(single.correlation_id.as_str().into()),
            (Some(message_type), _) => properties.with_type(message_type.into()),
            (None, None) => properties,
        };
        let published_at = Instant::now();
        let confirm = match channel
            .basic_publish(
                self.topology.commands_exchange().as_str().into(),
                Topology::partition_routing_key(partition).as_str().into(),
                // Mandatory: a message that no queue would take comes back as an error instead
                // of being confirmed and dropped.
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &payload,
                properties,
            )
            .await
        {
            Ok(confirm) => confirm,
            Err(error) => {
                tracing::warn!(%error, "publish failed");
                return false;
            }
        };
        match tokio::time::timeout(Duration::from_millis(CONFIRM_TIMEOUT_MS), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {
                let confirm_seconds = published_at.elapsed().as_secs_f64();
                metrics::histogram!("wallet_publish_confirm_seconds").record(confirm_seconds);
                // One line a message at debug level (`RUST_LOG=gateway::publisher=debug`), so a
                // slow stretch can be laid out message by message against a bench trace.
                tracing::debug!(
                    partition,
                    commands = batch.len(),
                    bytes = payload.len(),
                    confirm_ms = confirm_seconds * 1_000.0,
                    "message confirmed"
                );
                true
            }
            Ok(Ok(_)) => false,
            Ok(Err(error)) => {
                tracing::warn!(%error, "publish not confirmed");
                false
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = CONFIRM_TIMEOUT_MS,
                    "the broker did not confirm in time"
                );
                false
            }
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

    fn dispatch(&self, correlation_id: &str, reply: Reply) {
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
        let receivers = self
            .receivers
            .lock()
            .map(|mut receivers| std::mem::take(&mut *receivers))
            .unwrap_or_default();
        let mut partitions = tokio::task::JoinSet::new();
        for (partition, queue) in (0..self.topology.partitions).zip(receivers) {
            partitions.spawn(Arc::clone(&self).publish_partition(
                partition,
                queue,
                shutdown.clone(),
            ));
        }
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
        partitions.join_all().await;
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

/// The next command already queued or, with a linger, the next one to arrive before `until`.
async fn next_queued(
    queue: &mut mpsc::Receiver<Queued>,
    until: Option<tokio::time::Instant>,
) -> Option<Queued> {
    if let Ok(next) = queue.try_recv() {
        return Some(next);
    }
    tokio::time::timeout_at(until?, queue.recv())
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued() -> (Queued, oneshot::Receiver<bool>) {
        let (confirmed, confirmation) = oneshot::channel();
        let queued = Queued {
            envelope: serde_json::value::to_raw_value(&serde_json::json!({}))
                .unwrap_or_else(|error| panic!("an empty object encodes: {error}")),
            command_id: uuid::Uuid::nil(),
            correlation_id: "c".to_string(),
            confirmed,
        };
        (queued, confirmation)
    }

    #[tokio::test]
    async fn a_quiet_partition_takes_only_what_is_queued() {
        let (sender, mut queue) = mpsc::channel(4);
        let (first, _first) = queued();
        assert!(sender.try_send(first).is_ok());
        assert!(next_queued(&mut queue, None).await.is_some());
        // Nothing more is queued and there is no linger: no wait for the next command.
        let started = std::time::Instant::now();
        assert!(next_queued(&mut queue, None).await.is_none());
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_lingering_partition_takes_a_command_that_arrives_before_the_deadline() {
        let (sender, mut queue) = mpsc::channel(4);
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (next, _confirmation) = queued();
            drop(sender.send(next).await);
        });
        assert!(next_queued(&mut queue, Some(until)).await.is_some());
        assert!(tokio::time::Instant::now() < until);
        drop(late.await);
    }

    #[tokio::test]
    async fn a_lingering_partition_stops_waiting_at_the_deadline() {
        let (_sender, mut queue) = mpsc::channel::<Queued>(4);
        let linger = Duration::from_millis(30);
        let until = tokio::time::Instant::now() + linger;
        assert!(next_queued(&mut queue, Some(until)).await.is_none());
        assert!(tokio::time::Instant::now() >= until);
    }
}
