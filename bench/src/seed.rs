//! Creating many players straight in the database, with balanced books: used when signing up
//! and logging in over HTTP would take too long (100,000 players cost 200,000 argon2 hashes),
//! and by `worker-only`, where the gateway is off.
//!
//! Each chunk of players is one transaction and one journal entry (`bench_seed`): every player
//! gets a GEMS account with `balance`, the treasury's leg is posted, and, as the worker does, the
//! treasury's cached balance is owed as a hot credit that the treasury consumer folds (the
//! baseline server folds the ones present when it starts; the audit balances either way).

use serde_json::json;
use shared::domain::{GEMS, TREASURY_OWNER_ID};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::{BENCH_PASSWORD, hash_password_blocking, referral_code_for};

/// Players created per transaction.
pub const SEED_CHUNK_PLAYERS: usize = 5_000;

#[derive(Debug, Clone)]
pub struct SeededPlayer {
    pub id: Uuid,
    pub username: String,
}

/// Creates `count` players named `<prefix><index>` with `balance` GEMS each, all with the
/// password [`BENCH_PASSWORD`].
pub async fn seed_players(
    pool: &PgPool,
    prefix: &str,
    count: usize,
    balance: i64,
) -> anyhow::Result<Vec<SeededPlayer>> {
    anyhow::ensure!(balance >= 0, "a seeded balance cannot be negative");
    let password_hash =
        tokio::task::spawn_blocking(|| hash_password_blocking(BENCH_PASSWORD)).await??;
    let treasury: i64 =
        sqlx::query_scalar("SELECT id FROM accounts WHERE owner_id = $1 AND asset = $2")
            .bind(TREASURY_OWNER_ID)
            .bind(GEMS)
            .fetch_one(pool)
            .await?;
    let mut players = Vec::with_capacity(count);
    let mut index = 0;
    while index < count {
        let chunk_end = (index + SEED_CHUNK_PLAYERS).min(count);
        let chunk: Vec<SeededPlayer> = (index..chunk_end)
            .map(|number| SeededPlayer {
                id: Uuid::new_v4(),
                username: format!("{prefix}{number}"),
            })
            .collect();
        seed_chunk(pool, &chunk, &password_hash, balance, treasury).await?;
        players.extend(chunk);
        index = chunk_end;
    }
    Ok(players)
}

async fn seed_chunk(
    pool: &PgPool,
    chunk: &[SeededPlayer],
    password_hash: &str,
    balance: i64,
    treasury: i64,
) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = chunk.iter().map(|player| player.id).collect();
    let names: Vec<String> = chunk.iter().map(|player| player.username.clone()).collect();
    let codes: Vec<String> = ids.iter().map(|id| referral_code_for(*id)).collect();
    let total = balance
        .checked_mul(i64::try_from(chunk.len())?)
        .ok_or_else(|| anyhow::anyhow!("the seeded GEMS of one chunk overflow"))?;
    let mut transaction = pool.begin().await?;
    sqlx::query(
        "INSERT INTO users (id, username, password_hash, referral_code)
         SELECT id, username, $3, code FROM UNNEST($1::uuid[], $2::text[], $4::text[]) AS t(id, username, code)",
    )
    .bind(&ids)
    .bind(&names)
    .bind(password_hash)
    .bind(&codes)
    .execute(&mut *transaction)
    .await?;
    let accounts: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO accounts (owner_id, owner_kind, asset, balance, version)
         SELECT id, 'player', $2, $3, CASE WHEN $3 > 0 THEN 1 ELSE 0 END FROM UNNEST($1::uuid[]) AS t(id)
         RETURNING id",
    )
    .bind(&ids)
    .bind(GEMS)
    .bind(balance)
    .fetch_all(&mut *transaction)
    .await?;
    if total > 0 {
        let journal = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO journal_entries (id, kind, details) VALUES ($1, 'bench_seed', $2)",
        )
        .bind(journal)
        .bind(sqlx::types::Json(
            json!({ "players": chunk.len(), "balance": balance }),
        ))
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO postings (journal_id, account_id, asset, amount)
             SELECT $1, account, $3, $4 FROM UNNEST($2::int8[]) AS t(account)
             UNION ALL SELECT $1, $5, $3, -$6::bigint",
        )
        .bind(journal)
        .bind(&accounts)
        .bind(GEMS)
        .bind(balance)
        .bind(treasury)
        .bind(total)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("INSERT INTO hot_credits (account_id, amount) VALUES ($1, -$2::bigint)")
            .bind(treasury)
            .bind(total)
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}
