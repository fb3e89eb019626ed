//! Partition ownership with PostgreSQL advisory locks (see `shared::ownership`).
//!
//! Why this is safe: at most one session can hold a partition's lock, and a worker consumes a
//! partition only while it holds the lock. A worker hands a partition over by stopping its
//! consumer (the in-flight batch finishes and is acknowledged, or stays unacknowledged), closing
//! the channel (the broker requeues what was prefetched, in order), and only then unlocking; the
//! next owner can lock it only after that, so order within the partition is kept across the
//! handover. A killed worker's connections close, the broker requeues its unacknowledged
//! messages and PostgreSQL frees its locks; a redelivered command that was already committed is
//! answered from its stored result. The queues' single-active-consumer setting is a second guard,
//! and the database transaction alone keeps the books right if two workers ever overlap.

use std::collections::BTreeMap;
use std::future::Future;

use anyhow::Context;
use shared::config::CommonConfig;
use shared::ownership::{OWNER_APPLICATION_PREFIX, OWNERSHIP_LOCK_NAMESPACE};
use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// PostgreSQL truncates application_name at 63 bytes.
const APPLICATION_NAME_LENGTH_MAX: usize = 63;

/// The dedicated connection holding this worker's partition locks.
pub struct LockSession {
    connection: PgConnection,
}

impl LockSession {
    pub async fn connect(config: &CommonConfig, worker_id: &str) -> anyhow::Result<Self> {
        let mut name = format!("{OWNER_APPLICATION_PREFIX}{worker_id}");
        while name.len() > APPLICATION_NAME_LENGTH_MAX {
            name.pop();
        }
        let options = shared::db::connect_options(&config.database_url)?.application_name(&name);
        let mut connection = PgConnection::connect_with(&options)
            .await
            .context("opening the ownership lock session")?;
        // The server notices a silently vanished worker within about 11 s and frees its locks.
        for setting in [
            "SET tcp_keepalives_idle = 5",
            "SET tcp_keepalives_interval = 2",
            "SET tcp_keepalives_count = 3",
        ] {
            sqlx::query(setting)
                .execute(&mut connection)
                .await
                .context("setting keepalives on the lock session")?;
        }
        Ok(Self { connection })
    }

    /// This worker's fair share: the partitions divided by the live workers, rounded up. Also
    /// proves the lock session is alive; an error means the locks may be gone.
    pub async fn fair_share(&mut self, partitions: u16) -> anyhow::Result<usize> {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND starts_with(application_name, $1)",
        )
        .bind(OWNER_APPLICATION_PREFIX)
        .fetch_one(&mut self.connection)
        .await?;
        let live = usize::try_from(live.max(1)).unwrap_or(1);
        Ok(usize::from(partitions).div_ceil(live))
    }

    async fn try_lock(&mut self, partition: u16) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(OWNERSHIP_LOCK_NAMESPACE)
            .bind(i32::from(partition))
            .fetch_one(&mut self.connection)
            .await?)
    }

    async fn unlock(&mut self, partition: u16) -> anyhow::Result<()> {
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(OWNERSHIP_LOCK_NAMESPACE)
            .bind(i32::from(partition))
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }

    pub async fn close(self) {
        drop(self.connection.close().await);
    }
}

struct Owned {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The partitions this worker consumes, each with its consumer task.
#[derive(Default)]
pub struct OwnedPartitions {
    owned: BTreeMap<u16, Owned>,
}

impl OwnedPartitions {
    /// The error of a consumer that stopped by itself (its channel or connection failed).
    pub async fn take_failure(&mut self) -> Option<anyhow::Error> {
        let finished = self
            .owned
            .iter()
            .find(|(_, owned)| owned.task.is_finished())
            .map(|(partition, _)| *partition)?;
        let owned = self.owned.remove(&finished)?;
        Some(match owned.task.await {
            Ok(Ok(())) => anyhow::anyhow!("the consumer of partition {finished} stopped"),
            Ok(Err(error)) => error,
            Err(error) => anyhow::anyhow!("the consumer of partition {finished} panicked: {error}"),
        })
    }

    /// Releases partitions above `target`, or locks free ones below it, starting the scan at
    /// a place that depends on the worker id so that workers do not all race for partition 0.
    pub async fn rebalance<F, Fut>(
        &mut self,
        locks: &mut LockSession,
        target: usize,
        partitions: u16,
        worker_id: &str,
        mut start: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut(u16, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<JoinHandle<anyhow::Result<()>>>>,
    {
        while self.owned.len() > target {
            let Some((&partition, _)) = self.owned.last_key_value() else {
                break;
            };
            self.release(locks, partition).await?;
            tracing::info!(
                partition,
                owned = self.owned.len(),
                target,
                "released partition to rebalance"
            );
        }
        if self.owned.len() >= target {
            return Ok(());
        }
        let offset = u16::try_from(
            shared::partition::fnv1a_64(worker_id.as_bytes()) % u64::from(partitions.max(1)),
        )
        .unwrap_or(0);
        for step in 0..partitions {
            if self.owned.len() >= target {
                break;
            }
            let partition = (offset + step) % partitions;
            if self.owned.contains_key(&partition) || !locks.try_lock(partition).await? {
                continue;
            }
            let stop = CancellationToken::new();
            match start(partition, stop.clone()).await {
                Ok(task) => {
                    self.owned.insert(partition, Owned { stop, task });
                    set_owned_gauge(partition, true, self.owned.len());
                    tracing::info!(
                        partition,
                        owned = self.owned.len(),
                        target,
                        "acquired partition"
                    );
                }
                Err(error) => {
                    drop(locks.unlock(partition).await);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Stops the partition's consumer (its in-flight batch finishes first), then unlocks it.
    async fn release(&mut self, locks: &mut LockSession, partition: u16) -> anyhow::Result<()> {
        if let Some(owned) = self.owned.remove(&partition) {
            owned.stop.cancel();
            drop(owned.task.await);
        }
        set_owned_gauge(partition, false, self.owned.len());
        locks.unlock(partition).await
    }

    /// Stops every consumer; the caller then closes the lock session, which unlocks them all.
    pub async fn release_all(&mut self) {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        for (partition, owned) in std::mem::take(&mut self.owned) {
            drop(owned.task.await);
            set_owned_gauge(partition, false, 0);
            tracing::info!(partition, "released partition");
        }
    }
}

/// `wallet_partition_owned{partition}` is 1 while this worker consumes the partition.
fn set_owned_gauge(partition: u16, owned: bool, owned_count: usize) {
    metrics::gauge!("wallet_partition_owned", "partition" => partition.to_string()).set(if owned {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("wallet_partitions_owned").set(owned_count as f64);
}
