//! The partition consumer: collects a bounded batch, applies it, publishes what it owes and
//! acknowledges it with one multiple-ack.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, message::Delivery};
use shared::backoff::Backoff;
use shared::broker::{
    DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER, DELIVERY_MODE_PERSISTENT, Topology,
};
use shared::db::is_transient;
use shared::domain::error_body;
use shared::wire::{CommandEnvelope, CommandReply, UnreadableCommand, decode_commands};
use sqlx::PgPool;
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;

use crate::apply::{ApplyContext, BatchResult, OutboxMessage, PartitionBatch, apply};
use crate::group::{Answered, GroupAnswer, GroupCommit};
use crate::nudges::Nudges;
use crate::replies::{ReplyBatch, ReplyTarget};

/// How often a single command is retried on a data error before it is dead-lettered.
const SINGLE_COMMAND_ATTEMPTS_MAX: u32 = 3;
/// How many unpublished follow-ups one sweep republishes at most.
const OUTBOX_SWEEP_BATCH_MAX: i64 = 1_000;

pub(crate) struct PartitionConsumer {
    pub pool: PgPool,
    pub channel: Channel,
    /// Where a committed batch's hot credits are announced to the treasury.
    pub nudges: Nudges,
    pub topology: Topology,
    pub partition: u16,
    pub batch_size_max: usize,
    pub batch_wait: Duration,
    pub retry_backoff_max_ms: u64,
    pub consumer_tag: String,
    pub context: std::sync::Arc<ApplyContext>,
    /// The worker's committers, when group commit is on.
    pub group: Option<GroupCommit>,
}

/// How a batch ended.
enum Settled {
    /// Applied by a group's committer, and acknowledged.
    Grouped,
    /// Applied here (or nothing to apply), and acknowledged.
    Alone,
    /// Stopped before it could be applied: left unacknowledged.
    Stopped,
}

/// What became of one decoded command.
enum Outcome {
    /// Applied here: the reply is still to be sent.
    Reply(CommandReply),
    /// Applied by the group's committer, which already sent the reply.
    Answered(Answered),
    /// Failed on every attempt with a data error: dead-lettered with this reason.
    Failed(String),
}

impl PartitionConsumer {
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let prefetch = u16::try_from(self.batch_size_max.saturating_mul(2)).unwrap_or(u16::MAX);
        // Prefetch two batches: one being applied, the next already on its way.
        self.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .context("setting prefetch")?;
        // Publisher confirms on this channel: follow-ups and dead letters are confirmed by the
        // broker before the command that owes them is acknowledged.
        self.channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await
            .context("enabling publisher confirms")?;
        let queue = self.topology.partition_queue(self.partition);
        let mut consumer = self
            .channel
            .basic_consume(
                queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                // Manual acknowledgement (no_ack false): a command is acknowledged only after
                // its batch committed and everything it owes was published. Not exclusive: the
                // queue's single-active-consumer setting decides who is active.
                BasicConsumeOptions {
                    no_local: false,
                    no_ack: false,
                    exclusive: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        tracing::info!(partition = self.partition, consumer = %self.consumer_tag, "consuming partition");

        // Whether the last batch was applied by a group: then the committers wait a moment for
        // this partition's next batch, and are told at once when there is none yet.
        let mut grouped = false;
        loop {
            let ready = if grouped {
                consumer.next().now_or_never()
            } else {
                None
            };
            let first = match ready {
                Some(next) => next,
                None => {
                    if grouped && let Some(group) = &self.group {
                        group.nothing_ready(self.partition);
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        next = consumer.next() => next,
                    }
                }
            };
            let Some(first) = first else {
                anyhow::bail!("the consumer of {queue} was cancelled by the broker")
            };
            let mut batch = Received::default();
            batch.add(first.context("receiving a delivery")?);
            let deadline = tokio::time::Instant::now() + self.batch_wait;
            // The bound counts commands, not messages: a message from a gateway may carry
            // several (`shared::wire::CommandBatch`).
            while batch.sources.len() + batch.unreadable.len() < self.batch_size_max {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(delivery)) => batch.add(delivery.context("receiving a delivery")?),
                    Ok(None) | Err(_) => break,
                }
            }
            match self.process(batch, &stop).await? {
                Settled::Grouped => grouped = true,
                Settled::Alone => grouped = false,
                // Stopped while the database was unavailable: the batch stays unacknowledged
                // and is redelivered to whichever consumer takes the partition next.
                Settled::Stopped => break,
            }
        }
        drop(
            self.channel
                .basic_cancel(
                    self.consumer_tag.as_str().into(),
                    BasicCancelOptions { nowait: false },
                )
                .await,
        );
        // Closing the channel hands every unacknowledged delivery back to the queue.
        drop(self.channel.close(200, "partition released".into()).await);
        tracing::info!(partition = self.partition, "released partition");
        Ok(())
    }

    /// Applies one batch and settles it.
    async fn process(&self, batch: Received, stop: &CancellationToken) -> anyhow::Result<Settled> {
        let started = std::time::Instant::now();
        let Received {
            deliveries,
            envelopes,
            sources,
            unreadable,
        } = batch;
        let envelopes = std::sync::Arc::new(envelopes);
        let mut results = Vec::new();
        let mut group_published = None;
        let grouped = match &self.group {
            Some(group) if !envelopes.is_empty() => {
                let targets = sources.iter().map(|source| source.target.clone()).collect();
                group
                    .apply(self.partition, std::sync::Arc::clone(&envelopes), targets)
                    .await
            }
            Some(group) => {
                // Only unreadable commands: nothing for the committers, so a group waiting for
                // this partition need not wait any longer.
                group.nothing_ready(self.partition);
                GroupAnswer::ApplyAlone
            }
            None => GroupAnswer::ApplyAlone,
        };
        let outcomes = match grouped {
            GroupAnswer::Applied {
                answered,
                published,
            } => {
                group_published = Some(published);
                answered.into_iter().map(Outcome::Answered).collect()
            }
            GroupAnswer::ApplyAlone => {
                let Some(outcomes) = self.apply_resilient(&envelopes, stop, &mut results).await
                else {
                    return Ok(Settled::Stopped);
                };
                outcomes
            }
        };

        let mut confirms = Vec::new();
        let mut published_outbox = Vec::new();
        for result in results {
            for message in &result.outbox {
                confirms.push(publish_follow_up(&self.channel, &self.topology, message).await?);
                published_outbox.push(message.id);
            }
            self.nudges
                .send(result.hot_credit_ids, result.applied_request_ids);
        }
        let mut replies = ReplyBatch::default();
        // Commands by kind and outcome, counted here and added to the metric once per batch.
        let mut settled: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
        for (source, command) in &unreadable {
            *settled.entry(("undecodable", "dead_lettered")).or_default() += 1;
            let own = command.raw.as_ref().map(|raw| OwnCommand {
                json: raw.as_bytes().to_vec(),
                command_id: None,
            });
            confirms.push(
                self.dead_letter(&deliveries[source.delivery], source, own, &command.reason)
                    .await?,
            );
            replies.push(source.target.as_ref(), poison_reply(&command.reason));
        }
        for ((envelope, outcome), source) in envelopes.iter().zip(outcomes).zip(&sources) {
            let kind = envelope.command.kind();
            let (answered, unsent) = match outcome {
                Outcome::Reply(reply) => (
                    Answered {
                        status: reply.status,
                        replay: reply.replay,
                    },
                    Some(reply),
                ),
                Outcome::Answered(answered) => (answered, None),
                Outcome::Failed(reason) => {
                    *settled.entry((kind, "dead_lettered")).or_default() += 1;
                    tracing::error!(
                        command_id = %envelope.id,
                        request_id = envelope.request_id.as_deref().unwrap_or_default(),
                        %reason,
                        "command dead-lettered"
                    );
                    // A command of a batch message goes to the dead-letter queue alone; its
                    // neighbours were applied.
                    let own = if source.batched {
                        Some(OwnCommand {
                            json: serde_json::to_vec(envelope)?,
                            command_id: Some(envelope.id),
                        })
                    } else {
                        None
                    };
                    confirms.push(
                        self.dead_letter(&deliveries[source.delivery], source, own, &reason)
                            .await?,
                    );
                    let reply = CommandReply {
                        command_id: envelope.id,
                        status: 500,
                        body: error_body(
                            "command_failed",
                            "the command could not be applied and was set aside for an operator",
                            envelope.request_id.as_deref(),
                        ),
                        replay: false,
                    };
                    replies.push(source.target.as_ref(), reply);
                    continue;
                }
            };
            let counted_as = if answered.replay {
                "replayed"
            } else if (200..300).contains(&answered.status) {
                "applied"
            } else {
                "rejected"
            };
            *settled.entry((kind, counted_as)).or_default() += 1;
            // The request id travels in the envelope, so one id follows a command from the HTTP
            // request to here (LOG_FORMAT=json makes these fields searchable).
            tracing::debug!(
                partition = self.partition,
                command_id = %envelope.id,
                request_id = envelope.request_id.as_deref().unwrap_or_default(),
                kind,
                status = answered.status,
                replay = answered.replay,
                "command settled"
            );
            if let Some(reply) = unsent {
                replies.push(source.target.as_ref(), reply);
            }
        }
        replies.publish(&self.channel).await?;
        for confirm in confirms {
            let confirmation = confirm.await.context("waiting for a publisher confirm")?;
            anyhow::ensure!(confirmation.is_ack(), "the broker refused a publish");
        }
        let applied_by_group = group_published.is_some();
        if let Some(published) = group_published {
            // The group's committer publishes what the group owes; wait for its confirms too.
            anyhow::ensure!(
                published.await,
                "the broker refused what a group of batches owes"
            );
        }
        if !published_outbox.is_empty()
            && let Err(error) =
                sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                    .bind(&published_outbox)
                    .execute(&self.pool)
                    .await
        {
            // Harmless: the sweep republishes them and follow-ups are idempotent.
            tracing::warn!(%error, "could not mark follow-ups published");
        }
        if let Some(last) = deliveries.last() {
            self.acknowledge(last.delivery_tag)?;
        }
        let settled_as = |wanted: &str| -> u64 {
            settled
                .iter()
                .filter(|((_, outcome), _)| *outcome == wanted)
                .map(|(_, count)| count)
                .sum()
        };
        let (applied, rejected, replayed) = (
            settled_as("applied"),
            settled_as("rejected"),
            settled_as("replayed"),
        );
        for ((kind, outcome), count) in settled {
            metrics::counter!("wallet_commands_total", "kind" => kind, "outcome" => outcome)
                .increment(count);
        }
        let commands = sources.len() + unreadable.len();
        metrics::histogram!("wallet_batch_size").record(commands as f64);
        metrics::histogram!("wallet_batch_messages").record(deliveries.len() as f64);
        metrics::histogram!("wallet_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = self.partition,
            size = commands,
            messages = deliveries.len(),
            applied,
            rejected,
            replayed,
            "batch settled"
        );
        Ok(if applied_by_group {
            Settled::Grouped
        } else {
            Settled::Alone
        })
    }

    /// Acknowledges every delivery up to `delivery_tag` (one acknowledgement for the whole
    /// batch) without waiting for the frame to be written. Why: the partition collects its next
    /// batch only after this, and the committers wait for it (`group`); the write is a hop to
    /// the connection's I/O loop, which on a busy machine can take a millisecond. The first
    /// poll queues the frame on the channel, so acknowledgements still go out in order; the
    /// rest is waited for in a task that logs a failure. A lost acknowledgement is harmless:
    /// the batch is redelivered and answered from its stored results.
    fn acknowledge(&self, delivery_tag: u64) -> anyhow::Result<()> {
        let channel = self.channel.clone();
        let partition = self.partition;
        let mut acknowledged = Box::pin(async move {
            channel
                .basic_ack(delivery_tag, BasicAckOptions { multiple: true })
                .await
        });
        match (&mut acknowledged).now_or_never() {
            Some(result) => result.context("acknowledging a batch"),
            None => {
                tokio::spawn(async move {
                    if let Err(error) = acknowledged.await {
                        tracing::warn!(partition, %error, "could not acknowledge a batch");
                    }
                });
                Ok(())
            }
        }
    }

    /// Applies the envelopes, retrying transient failures with backoff (keeping order) and
    /// splitting the batch on data errors so one bad command never takes its neighbours with it.
    /// None when stopped while waiting for the database.
    async fn apply_resilient(
        &self,
        envelopes: &[CommandEnvelope],
        stop: &CancellationToken,
        results: &mut Vec<BatchResult>,
    ) -> Option<Vec<Outcome>> {
        if envelopes.is_empty() {
            return Some(Vec::new());
        }
        let mut backoff = Backoff::new(self.retry_backoff_max_ms);
        let mut data_errors = 0;
        loop {
            match self.apply_once(envelopes).await {
                Ok(mut result) => {
                    let outcomes = std::mem::take(&mut result.replies)
                        .into_iter()
                        .map(Outcome::Reply)
                        .collect();
                    results.push(result);
                    return Some(outcomes);
                }
                Err(error) if is_transient(&error) => {
                    tracing::warn!(partition = self.partition, %error, "database unavailable; partition paused");
                    if !backoff.sleep(stop).await {
                        return None;
                    }
                }
                Err(error) if envelopes.len() > 1 => {
                    tracing::warn!(partition = self.partition, %error, size = envelopes.len(), "batch failed; retrying in halves");
                    let (left, right) = envelopes.split_at(envelopes.len() / 2);
                    let mut outcomes = Box::pin(self.apply_resilient(left, stop, results)).await?;
                    outcomes.extend(Box::pin(self.apply_resilient(right, stop, results)).await?);
                    return Some(outcomes);
                }
                Err(error) => {
                    // A conflict with a concurrent apply of the same command resolves on retry
                    // (the stored result is found); anything still failing is poison.
                    data_errors += 1;
                    if data_errors >= SINGLE_COMMAND_ATTEMPTS_MAX {
                        return Some(vec![Outcome::Failed(format!(
                            "database refused the command: {error}"
                        ))]);
                    }
                }
            }
        }
    }

    async fn apply_once(&self, envelopes: &[CommandEnvelope]) -> Result<BatchResult, sqlx::Error> {
        let batch = PartitionBatch {
            partition: self.partition,
            envelopes,
        };
        apply(&self.pool, &[batch], &self.context).await
    }

    /// Sets a command aside in the dead-letter queue, with the reason and the queue it came
    /// from. A single-command message goes as it came; a command of a batch message goes alone
    /// (`own` is its JSON), as a single-command message that an operator can replay.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        source: &Source,
        own: Option<OwnCommand>,
        reason: &str,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(DEAD_LETTER_REASON_HEADER),
            AMQPValue::LongString(LongString::from(reason.to_string())),
        );
        headers.insert(
            ShortString::from(DEAD_LETTER_SOURCE_HEADER),
            AMQPValue::LongString(LongString::from(delivery.routing_key.to_string())),
        );
        let (payload, properties) = match &own {
            None => (&delivery.data[..], delivery.properties.clone()),
            Some(own) => {
                let mut properties =
                    BasicProperties::default().with_content_type("application/json".into());
                if let Some(target) = &source.target {
                    properties = target.describe(properties);
                }
                if let Some(command_id) = own.command_id {
                    properties = properties.with_message_id(command_id.to_string().as_str().into());
                }
                (&own.json[..], properties)
            }
        };
        self.channel
            .basic_publish(
                "".into(),
                self.topology.dead_letter_queue().as_str().into(),
                BasicPublishOptions::default(),
                payload,
                properties
                    .with_headers(headers)
                    .with_delivery_mode(DELIVERY_MODE_PERSISTENT),
            )
            .await
            .context("publishing a dead letter")
    }
}

/// A command of a batch message on its way to the dead-letter queue alone.
struct OwnCommand {
    json: Vec<u8>,
    /// Its id, when it could be read.
    command_id: Option<uuid::Uuid>,
}

/// Where a command of a batch came from and where its answer goes.
pub(crate) struct Source {
    /// Its delivery's index in the batch.
    delivery: usize,
    target: Option<ReplyTarget>,
    /// True when its message carried several commands: it is dead-lettered on its own.
    batched: bool,
}

/// A partition's batch as it is collected: the deliveries and the commands read from them.
#[derive(Default)]
pub(crate) struct Received {
    deliveries: Vec<Delivery>,
    envelopes: Vec<CommandEnvelope>,
    /// Where each envelope came from, in the same order.
    sources: Vec<Source>,
    /// Commands (or whole messages) that cannot be read: they go to the dead-letter queue.
    unreadable: Vec<(Source, UnreadableCommand)>,
}

impl Received {
    fn add(&mut self, delivery: Delivery) {
        let index = self.deliveries.len();
        let message_type = delivery.properties.kind().as_ref().map(ShortString::as_str);
        match decode_commands(message_type, &delivery.data) {
            Ok(commands) => {
                for received in commands {
                    let batched = received.correlation_id.is_some();
                    let target = match received.correlation_id {
                        Some(correlation_id) => ReplyTarget::addressed(&delivery, correlation_id),
                        None => ReplyTarget::of(&delivery),
                    };
                    let source = Source {
                        delivery: index,
                        target,
                        batched,
                    };
                    match received.command {
                        Ok(envelope) => {
                            self.envelopes.push(envelope);
                            self.sources.push(source);
                        }
                        Err(unreadable) => self.unreadable.push((source, unreadable)),
                    }
                }
            }
            Err(reason) => {
                let source = Source {
                    delivery: index,
                    target: ReplyTarget::of(&delivery),
                    batched: false,
                };
                self.unreadable
                    .push((source, UnreadableCommand { reason, raw: None }));
            }
        }
        self.deliveries.push(delivery);
    }
}

fn poison_reply(reason: &str) -> CommandReply {
    CommandReply {
        command_id: uuid::Uuid::nil(),
        status: 500,
        body: error_body(
            "command_dead_lettered",
            &format!("the command could not be read ({reason}) and was set aside for an operator"),
            None,
        ),
        replay: false,
    }
}

pub(crate) async fn publish_follow_up(
    channel: &Channel,
    topology: &Topology,
    message: &OutboxMessage,
) -> anyhow::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            topology.commands_exchange().as_str().into(),
            message.routing_key.as_str().into(),
            // Mandatory: an unroutable follow-up comes back instead of vanishing.
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &message.payload,
            BasicProperties::default()
                .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                .with_content_type("application/json".into()),
        )
        .await
        .context("publishing a follow-up")
}

/// Periodically republishes follow-ups that were committed but never marked published (their
/// worker died between commit and publish, or could not mark them).
pub(crate) async fn sweep_outbox(
    pool: PgPool,
    channel: Channel,
    topology: Topology,
    interval: Duration,
    age: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions { nowait: false })
        .await
        .context("enabling publisher confirms")?;
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
        let owed: Vec<(i64, String, Json<serde_json::Value>)> = match sqlx::query_as(
            "SELECT id, routing_key, payload FROM outbox
             WHERE published_at IS NULL AND created_at < now() - make_interval(secs => $1::float8 / 1000)
             ORDER BY id LIMIT $2",
        )
        .bind(age_ms as f64)
        .bind(OUTBOX_SWEEP_BATCH_MAX)
        .fetch_all(&pool)
        .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "outbox sweep could not read the outbox");
                continue;
            }
        };
        if owed.is_empty() {
            continue;
        }
        let mut confirms = Vec::with_capacity(owed.len());
        let mut ids = Vec::with_capacity(owed.len());
        for (id, routing_key, Json(payload)) in owed {
            let message = OutboxMessage {
                id,
                routing_key,
                payload: payload.to_string().into_bytes(),
            };
            confirms.push(publish_follow_up(&channel, &topology, &message).await?);
            ids.push(id);
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a follow-up");
        }
        tracing::info!(count = ids.len(), "outbox sweep republished follow-ups");
        if let Err(error) = sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&pool)
            .await
        {
            tracing::warn!(%error, "outbox sweep could not mark follow-ups published");
        }
    }
}
