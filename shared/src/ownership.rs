//! Who owns which partition. A worker owns a partition while it holds a session-level PostgreSQL
//! advisory lock `(OWNERSHIP_LOCK_NAMESPACE, partition)` on its dedicated lock connection, whose
//! `application_name` is `OWNER_APPLICATION_PREFIX` + the worker id. PostgreSQL is the source of
//! truth: a worker that dies loses its connection and with it every lock, at once for a killed
//! process, within the TCP keepalive window for a lost network.

use serde::Serialize;
use sqlx::PgPool;

/// First key of every ownership advisory lock; the second key is the partition number.
pub const OWNERSHIP_LOCK_NAMESPACE: i32 = 0x5741_4C54; // "WALT"
/// Prefix of the lock connection's application_name; what follows is the worker id.
pub const OWNER_APPLICATION_PREFIX: &str = "wallet-worker/";

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct PartitionOwner {
    pub partition: i32,
    /// The owning worker's id, or None when no worker holds the partition.
    #[schema(required = true)]
    pub owner: Option<String>,
    #[schema(required = true)]
    pub owner_connected_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Ownership {
    pub partitions: Vec<PartitionOwner>,
    /// Workers whose lock connection is open, whether or not they own anything yet.
    pub live_workers: Vec<String>,
}

/// Reads the current owners from `pg_locks` and `pg_stat_activity` (needs a role that may read
/// other sessions' activity: a superuser or a member of `pg_read_all_stats`).
pub async fn current(pool: &PgPool, partitions: u16) -> Result<Ownership, sqlx::Error> {
    let owners: Vec<(i32, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT l.objid::int, substr(a.application_name, length($2) + 1), a.backend_start
         FROM pg_locks l
         JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.classid::bigint = $1::bigint
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY 1",
    )
    .bind(i64::from(OWNERSHIP_LOCK_NAMESPACE))
    .bind(OWNER_APPLICATION_PREFIX)
    .fetch_all(pool)
    .await?;
    let live_workers: Vec<String> = sqlx::query_scalar(
        "SELECT substr(application_name, length($1) + 1) FROM pg_stat_activity
         WHERE datname = current_database() AND starts_with(application_name, $1)
         ORDER BY 1",
    )
    .bind(OWNER_APPLICATION_PREFIX)
    .fetch_all(pool)
    .await?;
    let partitions = (0..i32::from(partitions))
        .map(|partition| {
            let owner = owners.iter().find(|(owned, _, _)| *owned == partition);
            PartitionOwner {
                partition,
                owner: owner.map(|(_, worker, _)| worker.clone()),
                owner_connected_at: owner.map(|(_, _, since)| *since),
            }
        })
        .collect();
    Ok(Ownership {
        partitions,
        live_workers,
    })
}
