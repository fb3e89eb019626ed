//! The same command stream applied in batches and one command at a time leaves identical books
//! and identical results (issue: batched apply must not change semantics). The same holds for
//! group commit, where the batches of several partitions are applied in one transaction.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope};
use sqlx::PgPool;
use uuid::Uuid;
use worker::apply::{ApplyContext, PartitionBatch, apply, apply_batch};

const PLAYERS: usize = 40;
const COMMANDS: usize = 1_500;

fn envelope(id: Uuid, fingerprint: &str, command: Command) -> CommandEnvelope {
    CommandEnvelope {
        v: COMMAND_VERSION,
        id,
        principal: "test".to_string(),
        fingerprint: fingerprint.to_string(),
        request_id: None,
        command,
    }
}

/// A stream with signups (some referred, some taken names, some unknown codes), top-ups,
/// purchases that often overdraw, unknown items, redeliveries and reused keys.
fn command_stream(seed: u64) -> Vec<CommandEnvelope> {
    let mut rng = StdRng::seed_from_u64(seed);
    let players: Vec<Uuid> = (0..PLAYERS)
        .map(|index| Uuid::from_u128(0xA000 + index as u128))
        .collect();
    let code = |index: usize| format!("CODE{index:04}");
    let mut stream = Vec::new();
    for (index, player) in players.iter().enumerate() {
        let referred =
            (index > 0 && rng.random_bool(0.5)).then(|| code(rng.random_range(0..index)));
        let referred = if rng.random_bool(0.05) {
            Some("NOSUCHCODE".to_string())
        } else {
            referred
        };
        let username = if rng.random_bool(0.05) && index > 0 {
            format!("player{}", index - 1)
        } else {
            format!("player{index}")
        };
        stream.push(envelope(
            Uuid::from_u128(0xB000 + index as u128),
            &format!("signup-{index}"),
            Command::Signup {
                user_id: *player,
                username,
                password_hash: "not-a-real-hash".to_string(),
                referral_code: code(index),
                referred_by_code: referred,
                referral_bonus: 50,
            },
        ));
    }
    // Earlier commands whose journal a reversal may name (whether or not they were applied).
    let mut reversible: Vec<(Uuid, Uuid)> = Vec::new();
    for index in 0..COMMANDS {
        let player = players[rng.random_range(0..PLAYERS)];
        let roll = rng.random_range(0..100);
        let command = if roll < 30 {
            Command::TopUp {
                player_id: player,
                amount: rng.random_range(1..200),
            }
        } else if roll < 34 {
            Command::GrantBonus {
                player_id: player,
                amount: rng.random_range(1..50),
                reason: "stream".to_string(),
            }
        } else if roll < 40 {
            let receiver = players[rng.random_range(0..PLAYERS)];
            let asset = ["GEMS", "GOLD_COIN", "DRAGON"][rng.random_range(0..3)];
            Command::Gift {
                giver_id: player,
                receiver_id: receiver,
                asset: asset.to_string(),
                amount: rng.random_range(1..40),
            }
        } else if roll < 44 && !reversible.is_empty() {
            let (journal_id, owner) = reversible[rng.random_range(0..reversible.len())];
            Command::Reverse {
                player_id: owner,
                journal_id,
            }
        } else if roll < 95 {
            let item = if rng.random_bool(0.97) {
                ["gold_coin", "treasure_box"][rng.random_range(0..2)]
            } else {
                "dragon"
            };
            Command::Purchase {
                player_id: player,
                item: item.to_string(),
                quantity: rng.random_range(1..4),
            }
        } else {
            Command::TopUp {
                player_id: Uuid::from_u128(0xDEAD),
                amount: 5,
            }
        };
        let fresh = envelope(
            Uuid::from_u128(0xC000_0000 + index as u128),
            &format!("command-{index}"),
            command,
        );
        if let Command::TopUp { player_id, .. } | Command::Purchase { player_id, .. } =
            &fresh.command
        {
            reversible.push((fresh.id, *player_id));
        }
        // Sometimes redeliver an earlier command, or reuse its id for a different request.
        if !stream.is_empty() && rng.random_bool(0.05) {
            let earlier = stream[rng.random_range(0..stream.len())].clone();
            stream.push(earlier);
        }
        if !stream.is_empty() && rng.random_bool(0.02) {
            let mut reused = fresh.clone();
            reused.id = stream[rng.random_range(0..stream.len())].id;
            stream.push(reused);
        }
        stream.push(fresh);
    }
    stream
}

#[derive(Debug, PartialEq)]
struct Books {
    replies: Vec<(Uuid, u16, Value, bool)>,
    accounts: BTreeMap<(Uuid, String), (i64, i64)>,
    postings: Vec<(Uuid, Uuid, String, i64)>,
    journals: Vec<(Uuid, String, Value)>,
    commands: Vec<(Uuid, String, i16, Value)>,
    hot_sums: BTreeMap<(Uuid, String), i64>,
    outbox: Vec<(Uuid, String, Value)>,
    users: Vec<(Uuid, String, Option<Uuid>)>,
}

/// One transaction: the batches of one or more partitions, applied together.
type Transaction = Vec<(u16, Vec<CommandEnvelope>)>;

/// How the test applies each transaction's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// `apply_batch` in a transaction, with the accounts locked, and one commit.
    Locked,
    /// `apply`, the committers' entry: unlocked and version-checked where it can be.
    Entry,
}

async fn apply_stream(stream: &[CommandEnvelope], batch_size: usize, path: Path) -> Applied {
    let transactions: Vec<Transaction> = stream
        .chunks(batch_size)
        .map(|chunk| vec![(0, chunk.to_vec())])
        .collect();
    apply_transactions(&transactions, 1, path).await
}

/// The books a run left, and how many of its transactions went the unlocked way.
struct Applied {
    books: Books,
    unlocked: usize,
}

/// Applies each transaction's batches with one call along `path`, and returns the books, the
/// replies in input order, and checks that every command row records the partition of the
/// batch that decided it.
async fn apply_transactions(transactions: &[Transaction], partitions: u16, path: Path) -> Applied {
    let config = shared::testing::isolated_config(1);
    // Drops the database even if an assertion below fails.
    let mut cleanup = shared::testing::Cleanup::new(&config);
    let pool = shared::db::bootstrap_with_planner(&config, shared::db::Planner::PointLookups)
        .await
        .expect("database");
    let context = ApplyContext::new(partitions);
    let mut replies = Vec::new();
    let mut unlocked = 0;
    let mut decided_in: BTreeMap<Uuid, i32> = BTreeMap::new();
    for batches in transactions {
        let batches: Vec<PartitionBatch<'_>> = batches
            .iter()
            .map(|(partition, envelopes)| PartitionBatch {
                partition: *partition,
                envelopes,
            })
            .collect();
        let result = match path {
            Path::Locked => {
                let mut transaction = pool.begin().await.unwrap();
                let result = apply_batch(&mut transaction, &batches, &context)
                    .await
                    .expect("batch applies");
                transaction.commit().await.unwrap();
                result
            }
            Path::Entry => apply(&pool, &batches, &context)
                .await
                .expect("batch applies"),
        };
        if !result.locked {
            unlocked += 1;
        }
        for batch in &batches {
            for envelope in batch.envelopes {
                decided_in
                    .entry(envelope.id)
                    .or_insert(i32::from(batch.partition));
            }
        }
        replies.extend(
            result
                .replies
                .into_iter()
                .map(|reply| (reply.command_id, reply.status, reply.body, reply.replay)),
        );
    }
    let recorded: Vec<(Uuid, i32)> = sqlx::query_as("SELECT id, partition FROM commands")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (id, partition) in recorded {
        assert_eq!(
            decided_in.get(&id),
            Some(&partition),
            "command {id} records the partition that decided it"
        );
    }
    let books = read_books(&pool, replies).await;
    pool.close().await;
    cleanup.run().await;
    Applied { books, unlocked }
}

async fn read_books(pool: &PgPool, replies: Vec<(Uuid, u16, Value, bool)>) -> Books {
    let accounts: Vec<(Uuid, String, i64, i64)> =
        sqlx::query_as("SELECT owner_id, asset, balance, version FROM accounts WHERE NOT is_hot")
            .fetch_all(pool)
            .await
            .unwrap();
    let postings: Vec<(Uuid, Uuid, String, i64)> = sqlx::query_as(
        "SELECT p.journal_id, a.owner_id, p.asset, p.amount FROM postings p JOIN accounts a ON a.id = p.account_id
         ORDER BY p.journal_id, a.owner_id, p.asset, p.amount",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let journals: Vec<(Uuid, String, sqlx::types::Json<Value>)> =
        sqlx::query_as("SELECT id, kind, details FROM journal_entries ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    let commands: Vec<(Uuid, String, i16, sqlx::types::Json<Value>)> =
        sqlx::query_as("SELECT id, outcome, status_code, body FROM commands ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    let hot: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT a.owner_id, a.asset, (a.balance + coalesce((SELECT sum(amount) FROM hot_credits h WHERE h.account_id = a.id), 0))::bigint
         FROM accounts a WHERE a.is_hot",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let outbox: Vec<(Uuid, String, sqlx::types::Json<Value>)> =
        sqlx::query_as("SELECT command_id, routing_key, payload FROM outbox ORDER BY command_id")
            .fetch_all(pool)
            .await
            .unwrap();
    let users: Vec<(Uuid, String, Option<Uuid>)> =
        sqlx::query_as("SELECT id, username, referred_by FROM users ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    Books {
        replies,
        accounts: accounts
            .into_iter()
            .map(|(owner, asset, balance, version)| ((owner, asset), (balance, version)))
            .collect(),
        postings,
        journals: journals
            .into_iter()
            .map(|(id, kind, details)| (id, kind, details.0))
            .collect(),
        commands: commands
            .into_iter()
            .map(|(id, outcome, status, body)| (id, outcome, status, body.0))
            .collect(),
        hot_sums: hot
            .into_iter()
            .map(|(owner, asset, sum)| ((owner, asset), sum))
            .collect(),
        outbox: outbox
            .into_iter()
            .map(|(id, key, payload)| (id, key, payload.0))
            .collect(),
        users,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_and_one_by_one_give_identical_books_and_results() {
    let stream = command_stream(7);
    let one_by_one = apply_stream(&stream, 1, Path::Locked).await.books;
    let batched = apply_stream(&stream, 64, Path::Locked).await.books;
    let whole = apply_stream(&stream, stream.len(), Path::Locked)
        .await
        .books;

    // The stream exercises what it should.
    let statuses: Vec<u16> = one_by_one.replies.iter().map(|reply| reply.1).collect();
    for status in [200, 404, 409, 422] {
        assert!(statuses.contains(&status), "the stream produces {status}");
    }
    assert!(
        one_by_one.replies.iter().any(|reply| reply.3),
        "the stream has redeliveries"
    );
    assert!(
        !one_by_one.outbox.is_empty(),
        "the stream owes referrer bonuses and gift deliveries"
    );
    for kind in [
        "bonus",
        "gift",
        "reversal",
        "purchase",
        "top_up",
        "referral_bonus",
    ] {
        assert!(
            one_by_one.journals.iter().any(|journal| journal.1 == kind),
            "the stream applies a {kind}"
        );
    }
    // genesis holds the negative side of the supply; every player account is at zero or above.
    assert!(
        one_by_one
            .accounts
            .iter()
            .filter(|((owner, _), _)| *owner != shared::domain::GENESIS_OWNER_ID)
            .all(|(_, (balance, _))| *balance >= 0)
    );

    for (index, (single, batch)) in one_by_one.replies.iter().zip(&batched.replies).enumerate() {
        assert_eq!(
            single, batch,
            "the first differing reply is number {index}: {:?}",
            stream[index].command
        );
    }
    assert_eq!(one_by_one.replies, batched.replies, "replies");
    assert_eq!(one_by_one, batched, "books with batches of 64");
    assert_eq!(one_by_one, whole, "books with one batch");
}

/// Group commit: the partitions' batches of each round applied in one transaction give the same
/// books and replies as applying the same commands one at a time, in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_partitions_give_identical_books_and_results() {
    const PARTITIONS: u16 = 4;
    let stream = command_stream(11);
    let partition_of = |envelope: &CommandEnvelope| {
        shared::partition::partition_of(envelope.command.partition_player(), PARTITIONS)
    };
    // The signups come first, on their own, so that every later command finds its players
    // whatever the interleaving of partitions.
    let (signups, rest): (Vec<CommandEnvelope>, Vec<CommandEnvelope>) = stream
        .into_iter()
        .partition(|envelope| matches!(envelope.command, Command::Signup { .. }));
    // A command id reused in another partition is a race between partitions in any design; the
    // comparison keeps the reuses within one partition only.
    let mut first_partition: BTreeMap<Uuid, u16> = BTreeMap::new();
    let rest: Vec<CommandEnvelope> = rest
        .into_iter()
        .filter(|envelope| {
            *first_partition
                .entry(envelope.id)
                .or_insert(partition_of(envelope))
                == partition_of(envelope)
        })
        .collect();
    let mut queues: Vec<std::collections::VecDeque<CommandEnvelope>> =
        vec![std::collections::VecDeque::new(); usize::from(PARTITIONS)];
    for envelope in rest {
        queues[usize::from(partition_of(&envelope))].push_back(envelope);
    }
    // Rounds of uneven batches, some partitions idle in a round, as under real load.
    let mut grouped: Vec<Transaction> = signups
        .iter()
        .map(|signup| vec![(partition_of(signup), vec![signup.clone()])])
        .collect();
    let mut round = 0_usize;
    while queues.iter().any(|queue| !queue.is_empty()) {
        let mut batches = Vec::new();
        for (partition, queue) in queues.iter_mut().enumerate() {
            let take = (round * 7 + partition * 3) % 23;
            let batch: Vec<CommandEnvelope> = queue.drain(..take.min(queue.len())).collect();
            if !batch.is_empty() {
                batches.push((u16::try_from(partition).unwrap(), batch));
            }
        }
        if !batches.is_empty() {
            grouped.push(batches);
        }
        round += 1;
    }
    assert!(
        grouped.iter().filter(|batches| batches.len() > 1).count() > 10,
        "many transactions hold several partitions' batches"
    );
    let one_by_one: Vec<Transaction> = grouped
        .iter()
        .flatten()
        .flat_map(|(partition, batch)| {
            batch
                .iter()
                .map(|envelope| vec![(*partition, vec![envelope.clone()])])
        })
        .collect();

    let single = apply_transactions(&one_by_one, PARTITIONS, Path::Locked)
        .await
        .books;
    assert!(
        single.replies.iter().any(|reply| reply.3),
        "the stream has redeliveries"
    );
    for path in [Path::Locked, Path::Entry] {
        let Applied {
            books: together,
            unlocked,
        } = apply_transactions(&grouped, PARTITIONS, path).await;
        // Most rounds hold a gift, a reversal or a redelivery somewhere, which goes locked.
        assert!(
            path == Path::Locked || unlocked > 0,
            "some grouped transactions went unlocked"
        );
        for (index, (single, together)) in single.replies.iter().zip(&together.replies).enumerate()
        {
            assert_eq!(
                single, together,
                "{path:?}: the first differing reply is number {index}"
            );
        }
        assert_eq!(single, together, "{path:?}: books with grouped partitions");
    }
}

/// The committers' entry (unlocked and version-checked where it can be, locked otherwise)
/// gives the same books and replies as the locked path one command at a time, whatever the
/// batch size, and takes the unlocked way for most batches of a stream that is mostly top-ups
/// and purchases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlocked_applies_give_identical_books_and_results() {
    let stream = command_stream(13);
    let one_by_one = apply_stream(&stream, 1, Path::Locked).await.books;
    for batch_size in [1, 8, 64] {
        let entry = apply_stream(&stream, batch_size, Path::Entry).await;
        let batches = stream.len().div_ceil(batch_size);
        if batch_size == 1 {
            // Signups, gifts, reversals, redeliveries and commands for unknown players go locked.
            assert!(
                entry.unlocked > batches / 2,
                "{} of {batches} single commands went unlocked",
                entry.unlocked
            );
        } else {
            assert!(
                entry.unlocked > 0,
                "some batches of {batch_size} went unlocked"
            );
        }
        for (index, (single, entry)) in one_by_one
            .replies
            .iter()
            .zip(&entry.books.replies)
            .enumerate()
        {
            assert_eq!(
                single, entry,
                "batches of {batch_size}: the first differing reply is number {index}: {:?}",
                stream[index].command
            );
        }
        assert_eq!(
            one_by_one, entry.books,
            "books with batches of {batch_size}"
        );
    }
}
