//! Group commit: the batches that the partitions of one worker have ready at the same moment are
//! applied in one PostgreSQL transaction.
//!
//! Why: under load each partition's batch is small (a few commands), and a transaction costs
//! about the same whatever its size: the same dozen statements, one commit, one fsync. Applying
//! the ready batches of all of a worker's partitions together makes one transaction of them.
//!
//! Why it is safe: different partitions never share a player, so deciding their commands
//! together gives every command the result it would get in its own partition's batch
//! (`apply::apply_batch`). Each partition hands over one batch and waits for its answer before
//! it collects the next, so the order within a partition is kept. Nothing is acknowledged before
//! the group has committed and the broker has confirmed the group's follow-ups (its treasury
//! nudge is a hint and is not waited for: `nudges`). When a group cannot be applied, for any
//! reason, each partition applies its batch alone, with the retries and splitting of `consumer`
//! (a command is never lost: a redelivered command that did commit is answered from its stored
//! result).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use lapin::Channel;
use shared::broker::Topology;
use shared::wire::CommandEnvelope;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::apply::{ApplyContext, BatchResult, PartitionBatch, apply};
use crate::consumer::publish_follow_up;
use crate::nudges::Nudges;
use crate::replies::{ReplyBatch, ReplyTarget};

/// How many batches may wait for a committer: one per partition is the most there can be, since
/// each partition has at most one batch outstanding; the bound only guards against a bug.
const WAITING_BATCHES_MAX: usize = 4_096;

/// Resolves to true once the broker confirmed everything a committed group owes.
pub(crate) type Published = Shared<BoxFuture<'static, bool>>;

/// What a partition tells the committers.
enum ToCommitters {
    /// Its next batch, to be applied in a group.
    Batch(GroupRequest),
    /// A partition that a group just answered has nothing more ready: the next group need not
    /// wait for it.
    NothingReady(u16),
}

/// A partition's batch handed to the committers.
struct GroupRequest {
    partition: u16,
    envelopes: Arc<Vec<CommandEnvelope>>,
    /// Where each envelope's reply goes, in the same order.
    targets: Vec<Option<ReplyTarget>>,
    answer: oneshot::Sender<GroupAnswer>,
}

/// What the partition needs of a reply the committer sent: its counts and its log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answered {
    pub status: u16,
    pub replay: bool,
}

pub(crate) enum GroupAnswer {
    /// Committed together with other partitions' batches: one reply per envelope, in order,
    /// already sent to the gateways. Acknowledge only after `published` resolved to true.
    Applied {
        answered: Vec<Answered>,
        published: Published,
    },
    /// Not applied as part of a group: apply the batch alone.
    ApplyAlone,
}

/// The partitions' side: hands a batch to the committers and waits for the answer.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    sender: mpsc::Sender<ToCommitters>,
}

impl GroupCommit {
    pub async fn apply(
        &self,
        partition: u16,
        envelopes: Arc<Vec<CommandEnvelope>>,
        targets: Vec<Option<ReplyTarget>>,
    ) -> GroupAnswer {
        let (answer, answered) = oneshot::channel();
        let request = GroupRequest {
            partition,
            envelopes,
            targets,
            answer,
        };
        if self
            .sender
            .send(ToCommitters::Batch(request))
            .await
            .is_err()
        {
            return GroupAnswer::ApplyAlone;
        }
        // A committer that stopped before answering dropped the request: apply alone.
        answered.await.unwrap_or(GroupAnswer::ApplyAlone)
    }

    /// Tells the committers that a partition a group just answered has nothing more ready, so
    /// the next group starts without waiting for it.
    pub fn nothing_ready(&self, partition: u16) {
        // When the channel is full or closed the next group waits out `return_wait` instead:
        // later, never wrong.
        drop(self.sender.try_send(ToCommitters::NothingReady(partition)));
    }
}

/// The committers' side: `count` tasks taking turns at collecting what the partitions have
/// ready, so one group is applied while the next one gathers.
pub(crate) struct Committers {
    pub pool: PgPool,
    /// Where a committed group's hot credits are announced to the treasury.
    pub nudges: Nudges,
    pub topology: Topology,
    pub context: Arc<ApplyContext>,
    /// A group stops taking batches once it holds this many commands.
    pub commands_max: usize,
    /// A committer starts a group while another committer is busy only when it holds at least
    /// this many commands; a smaller group waits until no other committer is busy.
    pub overlap_commands_min: usize,
    /// Longest wait, once no other committer is busy, for the partitions the last group
    /// answered to hand their next batch (or say they have none); zero never waits.
    pub return_wait: Duration,
}

impl Committers {
    /// Starts `channels.len()` committers, one per channel (publisher confirms are enabled on
    /// each). The tasks end when every `GroupCommit` handle is dropped, or with an error when
    /// their channel fails.
    pub async fn spawn(
        self,
        channels: Vec<Channel>,
    ) -> anyhow::Result<(
        GroupCommit,
        Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    )> {
        let (sender, receiver) = mpsc::channel(WAITING_BATCHES_MAX);
        let receiver = Arc::new(Mutex::new(receiver));
        let gatherer = Gatherer::new(
            self.commands_max,
            self.overlap_commands_min,
            self.return_wait,
        );
        let shared = Arc::new(Running {
            committers: self,
            gatherer,
        });
        let mut tasks = Vec::with_capacity(channels.len());
        for channel in channels {
            // Publisher confirms: a group's follow-ups are confirmed by the broker before any
            // command of the group is acknowledged.
            channel
                .confirm_select(lapin::options::ConfirmSelectOptions { nowait: false })
                .await?;
            tasks.push(tokio::spawn(
                Arc::clone(&shared).run(channel, Arc::clone(&receiver)),
            ));
        }
        Ok((GroupCommit { sender }, tasks))
    }
}

/// The committers' settings and what they share.
struct Running {
    committers: Committers,
    gatherer: Gatherer,
}

/// What decides when a group starts, shared by the committers.
struct Gatherer {
    /// `Committers::commands_max`.
    commands_max: usize,
    /// `Committers::overlap_commands_min`.
    overlap_commands_min: usize,
    /// `Committers::return_wait`.
    return_wait: Duration,
    /// Committers busy with a group right now: from taking it until its partitions are answered
    /// (applied, committed, replies sent). Waiting for the broker's confirms does not count.
    busy: watch::Sender<usize>,
    /// Partitions a group answered that have not yet handed their next batch or said they have
    /// none. Why the next group waits a moment for them: a partition collects its next batch
    /// only after its answer, and a group that started the moment the last one ended would
    /// miss every partition of that group, so each partition would take part in every other
    /// group only and its commands would wait a whole group longer (BENCHMARKS.md, profile
    /// item 23).
    returning: std::sync::Mutex<HashSet<u16>>,
}

/// Counts a committer as busy until dropped, however its group ends.
struct Busy<'a>(&'a watch::Sender<usize>);

impl<'a> Busy<'a> {
    fn new(busy: &'a watch::Sender<usize>) -> Self {
        busy.send_modify(|count| *count += 1);
        Self(busy)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// A group being gathered: the batches taken so far and how many commands they hold.
#[derive(Default)]
struct Gathering {
    requests: Vec<GroupRequest>,
    commands: usize,
}

impl Gatherer {
    fn new(commands_max: usize, overlap_commands_min: usize, return_wait: Duration) -> Self {
        Self {
            commands_max,
            overlap_commands_min,
            return_wait,
            busy: watch::Sender::new(0),
            returning: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Records that a group answered these partitions: the next group waits for them.
    fn answered(&self, partitions: impl Iterator<Item = u16>) {
        if let Ok(mut returning) = self.returning.lock() {
            returning.extend(partitions);
        }
    }

    /// Takes what a partition sent into the group being gathered.
    fn take(&self, group: &mut Gathering, message: ToCommitters) {
        let partition = match &message {
            ToCommitters::Batch(request) => request.partition,
            ToCommitters::NothingReady(partition) => *partition,
        };
        if let Ok(mut returning) = self.returning.lock() {
            returning.remove(&partition);
        }
        if let ToCommitters::Batch(request) = message {
            group.commands += request.envelopes.len();
            group.requests.push(request);
        }
    }

    /// True when every partition the last group answered has handed its next batch or said it
    /// has none.
    fn all_returned(&self) -> bool {
        self.returning
            .lock()
            .map(|returning| returning.is_empty())
            .unwrap_or(true)
    }

    /// Stops waiting for the partitions that have not come back: they join a later group.
    fn forget_returning(&self) {
        if let Ok(mut returning) = self.returning.lock() {
            returning.clear();
        }
    }

    /// Takes the next group's batches. None when every partition's handle is gone.
    async fn gather(
        &self,
        receiver: &mut mpsc::Receiver<ToCommitters>,
        busy: &mut watch::Receiver<usize>,
    ) -> Option<Vec<GroupRequest>> {
        let mut group = Gathering::default();
        while group.requests.is_empty() {
            let message = receiver.recv().await?;
            self.take(&mut group, message);
        }
        // Set once no other committer is busy: since when this group waits for the partitions
        // the last group answered.
        let mut waiting_since: Option<Instant> = None;
        loop {
            // Only what is ready now: waiting on a timer would add latency to every batch. The
            // one wait below is for the partitions the last group answered, and they say when
            // they have nothing.
            while group.commands < self.commands_max {
                let Ok(message) = receiver.try_recv() else {
                    break;
                };
                self.take(&mut group, message);
            }
            // Two groups at once pay off only when both are large (a backlog): then one applies
            // while the other commits and publishes. Under a steady load the machine is busy
            // anyway, and two small groups cost more than one larger one (measured: 24 commands
            // a group instead of 34, and 7 % less throughput end to end). So a small group waits
            // until no other committer is busy, taking the batches that arrive meanwhile.
            if group.commands >= self.commands_max || group.commands >= self.overlap_commands_min {
                return Some(group.requests);
            }
            if *busy.borrow_and_update() == 0 {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                let returned = self.all_returned();
                if returned || waited >= self.return_wait {
                    if !returned {
                        metrics::counter!("wallet_group_return_timeouts_total").increment(1);
                        self.forget_returning();
                    }
                    metrics::histogram!("wallet_group_return_wait_seconds")
                        .record(waited.as_secs_f64());
                    return Some(group.requests);
                }
            }
            let return_deadline = waiting_since.map(|since| since + self.return_wait);
            let return_wait = async {
                match return_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = receiver.recv() => match message {
                    Some(message) => self.take(&mut group, message),
                    None => return Some(group.requests),
                },
                changed = busy.changed() => {
                    if changed.is_err() {
                        return Some(group.requests);
                    }
                }
                () = return_wait => {}
            }
        }
    }
}

impl Running {
    async fn run(
        self: Arc<Self>,
        channel: Channel,
        receiver: Arc<Mutex<mpsc::Receiver<ToCommitters>>>,
    ) -> anyhow::Result<()> {
        let mut busy = self.gatherer.busy.subscribe();
        loop {
            // Counted busy before the receiver is released, so the next committer to take it
            // sees this group.
            let (requests, busy_guard) = {
                let mut receiver = receiver.lock().await;
                let Some(requests) = self.gatherer.gather(&mut receiver, &mut busy).await else {
                    return Ok(());
                };
                (requests, Busy::new(&self.gatherer.busy))
            };
            self.commit(&channel, requests, busy_guard).await?;
        }
    }

    /// Applies and commits a group, answers its partitions, then waits for the broker to confirm
    /// what the group owes. The committer stops counting as busy once the partitions are
    /// answered: the confirm is a wait on the broker's disk, not work, and the next group may
    /// start its transaction meanwhile. Order is not at stake here: a partition sends its next
    /// batch only after `published` resolved and it queued the acknowledgement of this one.
    async fn commit(
        &self,
        channel: &Channel,
        requests: Vec<GroupRequest>,
        busy: Busy<'_>,
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let batches: Vec<PartitionBatch<'_>> = requests
            .iter()
            .map(|request| PartitionBatch {
                partition: request.partition,
                envelopes: request.envelopes.as_slice(),
            })
            .collect();
        let result = self.apply_once(&batches).await;
        let transaction_seconds = started.elapsed().as_secs_f64();
        metrics::histogram!("wallet_group_transaction_seconds").record(transaction_seconds);
        let result = match result {
            Ok(result) => result,
            Err(error) => {
                tracing::warn!(%error, batches = requests.len(), "group failed; partitions apply alone");
                metrics::counter!("wallet_group_fallbacks_total").increment(1);
                for request in requests {
                    drop(request.answer.send(GroupAnswer::ApplyAlone));
                }
                return Ok(());
            }
        };
        let commands: usize = requests.iter().map(|request| request.envelopes.len()).sum();
        let BatchResult {
            replies,
            outbox,
            hot_credit_ids,
            applied_request_ids,
            locked: _,
        } = result;
        // Committed. What fails from here fails the connection: the partitions are answered
        // with ApplyAlone (their requests are dropped), their redelivered commands are
        // answered from the stored results, and the sweeps publish what is still owed.
        let mut confirms = Vec::with_capacity(outbox.len());
        for message in &outbox {
            confirms.push(publish_follow_up(channel, &self.committers.topology, message).await?);
        }
        self.committers
            .nudges
            .send(hot_credit_ids, applied_request_ids);
        let published: Published = async move {
            for confirm in confirms {
                match confirm.await {
                    Ok(confirmation) if confirmation.is_ack() => {}
                    _ => return false,
                }
            }
            true
        }
        .boxed()
        .shared();
        // One reply message per gateway channel for the whole group.
        let mut replies = replies.into_iter();
        let mut answers = Vec::with_capacity(requests.len());
        let mut reply_batch = ReplyBatch::default();
        for request in &requests {
            let mut answered = Vec::with_capacity(request.envelopes.len());
            // One target per envelope, so this takes exactly this batch's replies.
            for (target, reply) in request.targets.iter().zip(replies.by_ref()) {
                answered.push(Answered {
                    status: reply.status,
                    replay: reply.replay,
                });
                reply_batch.push(target.as_ref(), reply);
            }
            answers.push(answered);
        }
        reply_batch.publish(channel).await?;
        let partitions = requests.len();
        // Before the answers: a partition's next batch comes only after its answer.
        self.gatherer
            .answered(requests.iter().map(|request| request.partition));
        for (request, answered) in requests.into_iter().zip(answers) {
            drop(request.answer.send(GroupAnswer::Applied {
                answered,
                published: published.clone(),
            }));
        }
        drop(busy);
        anyhow::ensure!(published.await, "the broker refused a follow-up");
        if !outbox.is_empty() {
            let ids: Vec<i64> = outbox.iter().map(|message| message.id).collect();
            if let Err(error) =
                sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&self.committers.pool)
                    .await
            {
                // Harmless: the sweep republishes them and follow-ups are idempotent.
                tracing::warn!(%error, "could not mark follow-ups published");
            }
        }
        let group_seconds = started.elapsed().as_secs_f64();
        metrics::histogram!("wallet_group_partitions").record(partitions as f64);
        metrics::histogram!("wallet_group_commands").record(commands as f64);
        metrics::histogram!("wallet_group_seconds").record(group_seconds);
        // One line a group at debug level (`RUST_LOG=worker::group=debug`), so a slow stretch
        // can be laid out group by group against a bench trace.
        tracing::debug!(
            partitions,
            commands,
            transaction_ms = transaction_seconds * 1_000.0,
            group_ms = group_seconds * 1_000.0,
            "group settled"
        );
        Ok(())
    }

    async fn apply_once(&self, batches: &[PartitionBatch<'_>]) -> Result<BatchResult, sqlx::Error> {
        apply(&self.committers.pool, batches, &self.committers.context).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENT: Duration = Duration::from_secs(10);

    fn batch(partition: u16) -> ToCommitters {
        let (answer, _answered) = oneshot::channel();
        ToCommitters::Batch(GroupRequest {
            partition,
            envelopes: Arc::new(Vec::new()),
            targets: Vec::new(),
            answer,
        })
    }

    fn partitions(requests: &[GroupRequest]) -> Vec<u16> {
        requests.iter().map(|request| request.partition).collect()
    }

    /// Gathers one group with no other committer busy: its partitions, and how long it took.
    async fn gather_timed(
        gatherer: &Gatherer,
        receiver: &mut mpsc::Receiver<ToCommitters>,
    ) -> (Vec<u16>, Duration) {
        let started = Instant::now();
        let requests = gatherer
            .gather(receiver, &mut gatherer.busy.subscribe())
            .await
            .unwrap_or_default();
        (partitions(&requests), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_starts_at_once_when_no_partition_is_coming_back() {
        let gatherer = Gatherer::new(2_048, 256, PATIENT);
        let (sender, mut receiver) = mpsc::channel(8);
        assert!(sender.try_send(batch(3)).is_ok());
        let (gathered, took) = gather_timed(&gatherer, &mut receiver).await;
        assert_eq!(gathered, [3]);
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_waits_for_the_partitions_the_last_group_answered() {
        let gatherer = Gatherer::new(2_048, 256, PATIENT);
        gatherer.answered([1, 2].into_iter());
        let (sender, mut receiver) = mpsc::channel(8);
        assert!(sender.try_send(batch(3)).is_ok());
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(sender.try_send(batch(1)).is_ok());
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Partition 2 has nothing more: the group starts without it.
            assert!(sender.try_send(ToCommitters::NothingReady(2)).is_ok());
            sender
        });
        let (gathered, took) = gather_timed(&gatherer, &mut receiver).await;
        assert_eq!(gathered, [3, 1]);
        assert_eq!(took, Duration::from_millis(200));
        assert!(gatherer.all_returned());
        drop(late.await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_stops_waiting_for_a_partition_after_the_return_wait() {
        let gatherer = Gatherer::new(2_048, 256, Duration::from_millis(2));
        gatherer.answered([1].into_iter());
        let (sender, mut receiver) = mpsc::channel(8);
        assert!(sender.try_send(batch(3)).is_ok());
        let (gathered, took) = gather_timed(&gatherer, &mut receiver).await;
        assert_eq!(gathered, [3]);
        assert_eq!(took, Duration::from_millis(2));
        // Forgotten: the next group does not wait for it again.
        assert!(gatherer.all_returned());
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_waits_for_a_busy_committer_before_it_waits_for_partitions() {
        let gatherer = Arc::new(Gatherer::new(2_048, 256, PATIENT));
        let (sender, mut receiver) = mpsc::channel(8);
        assert!(sender.try_send(batch(3)).is_ok());
        let busy = Busy::new(&gatherer.busy);
        let mut subscribed = gatherer.busy.subscribe();
        let gathering = {
            let gatherer = Arc::clone(&gatherer);
            tokio::spawn(async move {
                let started = Instant::now();
                let requests = gatherer
                    .gather(&mut receiver, &mut subscribed)
                    .await
                    .unwrap_or_default();
                (partitions(&requests), started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The busy committer's group answers partition 1, then stops counting as busy.
        gatherer.answered([1].into_iter());
        drop(busy);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(sender.try_send(batch(1)).is_ok());
        let (gathered, waited) = gathering.await.unwrap_or_default();
        assert_eq!(gathered, [3, 1]);
        assert_eq!(waited, Duration::from_millis(80));
    }
}
