//! The unlocked path (`apply_unlocked`): an account that changes between its unlocked read and
//! its version-checked write fails the whole write, writes nothing, and the committers' entry
//! (`apply`) then applies the batch locked, against the new balance.

use std::time::{Duration, Instant};

use shared::domain::GEMS;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope};
use sqlx::PgPool;
use uuid::Uuid;
use worker::apply::{ApplyContext, PartitionBatch, apply, apply_batch, apply_unlocked};

const PLAYER: Uuid = Uuid::from_u128(0xA1);
const WAIT_FOR_LOCK: Duration = Duration::from_secs(10);

fn envelope(id: u128, command: Command) -> CommandEnvelope {
    CommandEnvelope {
        v: COMMAND_VERSION,
        id: Uuid::from_u128(id),
        principal: "test".to_string(),
        fingerprint: format!("fingerprint-{id}"),
        request_id: None,
        command,
    }
}

fn top_up(id: u128, amount: i64) -> CommandEnvelope {
    envelope(
        id,
        Command::TopUp {
            player_id: PLAYER,
            amount,
        },
    )
}

fn purchase(id: u128) -> CommandEnvelope {
    envelope(
        id,
        Command::Purchase {
            player_id: PLAYER,
            item: "gold_coin".to_string(),
            quantity: 1,
        },
    )
}

fn batch(envelopes: &[CommandEnvelope]) -> [PartitionBatch<'_>; 1] {
    [PartitionBatch {
        partition: 0,
        envelopes,
    }]
}

async fn gems(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT balance, version FROM accounts WHERE owner_id = $1 AND asset = $2")
        .bind(PLAYER)
        .bind(GEMS)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn stored_commands(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM commands WHERE id = $1)
              + (SELECT count(*) FROM journal_entries WHERE id = $1)",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Runs `racing` while a locked apply of a top-up of 5 (command `top_up_id`) holds the player's
/// accounts uncommitted; commits the top-up once `racing` waits for those rows, and returns
/// what `racing` returned.
async fn while_locked_by_top_up<T: Send + 'static>(
    pool: &PgPool,
    top_up_id: u128,
    racing: impl Future<Output = T> + Send + 'static,
) -> T {
    let context = ApplyContext::new(1);
    let mut concurrent = pool.begin().await.unwrap();
    apply_batch(&mut concurrent, &batch(&[top_up(top_up_id, 5)]), &context)
        .await
        .unwrap();
    let racing = tokio::spawn(racing);
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < WAIT_FOR_LOCK,
            "the racing write never waited for the locked account"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    concurrent.commit().await.unwrap();
    racing.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_account_fails_the_unlocked_write_and_the_entry_applies_it_locked() {
    let config = shared::testing::isolated_config(1);
    // Drops the database even if an assertion below fails.
    let mut cleanup = shared::testing::Cleanup::new(&config);
    let pool = shared::db::bootstrap(&config).await.expect("database");
    let context = ApplyContext::new(1);
    let signup = envelope(
        1,
        Command::Signup {
            user_id: PLAYER,
            username: "player".to_string(),
            password_hash: "not-a-real-hash".to_string(),
            referral_code: "CODE0001".to_string(),
            referred_by_code: None,
            referral_bonus: 0,
        },
    );
    assert!(
        apply_unlocked(
            &mut pool.acquire().await.unwrap(),
            &batch(std::slice::from_ref(&signup)),
            &context
        )
        .await
        .unwrap()
        .is_none(),
        "a signup needs the locked path"
    );
    // The signup takes the locked path; the top-up does not, nor does the first purchase, which
    // creates the player's GOLD_COIN account (so the races below are on the GEMS account).
    for (envelope, locked) in [
        (signup, true),
        (top_up(2, 1_000), false),
        (purchase(100), false),
    ] {
        let result = apply(&pool, &batch(&[envelope]), &context).await.unwrap();
        assert_eq!(result.replies[0].status, 200);
        assert_eq!(result.locked, locked);
    }
    let price: i64 = sqlx::query_scalar("SELECT price FROM items WHERE item = 'gold_coin'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (before, _) = gems(&pool).await;

    // The player's accounts change between the unlocked read and the write: nothing is written.
    let racing = {
        let pool = pool.clone();
        async move {
            let mut connection = pool.acquire().await.unwrap();
            let context = ApplyContext::new(1);
            apply_unlocked(&mut connection, &batch(&[purchase(4)]), &context).await
        }
    };
    let error = while_locked_by_top_up(&pool, 3, racing)
        .await
        .expect_err("the write must fail: the account changed after the read");
    let code = error
        .as_database_error()
        .and_then(|error| error.code())
        .map(|code| code.to_string());
    assert_eq!(code.as_deref(), Some("40001"), "{error}");
    assert_eq!(
        stored_commands(&pool, Uuid::from_u128(4)).await,
        0,
        "nothing of the failed write is stored"
    );
    assert_eq!(gems(&pool).await.0, before + 5, "only the top-up landed");

    // The same race through the entry: it falls back to the locked path, against the new balance.
    let racing = {
        let pool = pool.clone();
        async move {
            let context = ApplyContext::new(1);
            apply(&pool, &batch(&[purchase(4)]), &context).await
        }
    };
    let result = while_locked_by_top_up(&pool, 5, racing).await.unwrap();
    assert_eq!(result.replies[0].status, 200);
    assert!(
        result.locked,
        "the failed unlocked write fell back to the locked path"
    );
    assert_eq!(gems(&pool).await.0, before + 10 - price);

    // Nothing racing: a purchase goes unlocked.
    let result = apply(&pool, &batch(&[purchase(6)]), &context)
        .await
        .unwrap();
    assert_eq!(result.replies[0].status, 200);
    assert!(!result.locked, "nothing raced it");
    assert_eq!(gems(&pool).await.0, before + 10 - 2 * price);

    // A redelivery is answered from the stored result, unlocked too, and changes nothing.
    let replay = apply(&pool, &batch(&[purchase(6)]), &context)
        .await
        .unwrap();
    assert!(replay.replies[0].replay);
    assert!(!replay.locked);
    assert_eq!(gems(&pool).await.0, before + 10 - 2 * price);

    pool.close().await;
    cleanup.run().await;
}
