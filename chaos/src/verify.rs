//! The end of a run: drain the queues, then hold what the client saw against the books.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::ids;
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::records::{CommandRecord, Kind};
use crate::util::say;

/// Pause between two looks at the queues while draining.
const DRAIN_POLL_MS: u64 = 1_000;
/// Consecutive empty looks needed to call the system drained.
const DRAIN_STABLE_ROUNDS: u32 = 2;
/// Examples printed per failed check.
pub const EXAMPLES_MAX: usize = 5;

/// Postings a journal entry of each kind has.
fn expected_postings(kind: &str) -> Option<i64> {
    match kind {
        "genesis" | "top_up" | "referral_bonus" => Some(2),
        "purchase" => Some(4),
        _ => None,
    }
}

#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub drained: bool,
    pub took_ms: u64,
    /// Messages left per queue (non-empty ones), unfolded credits, unpublished follow-ups.
    pub leftovers: Vec<(String, u64)>,
    pub hot_credits: i64,
    pub outbox_unpublished: i64,
    pub dead_letters: u64,
    /// Why the last look failed, if it did.
    pub last_error: Option<String>,
}

/// Waits until the partition queues and the treasury queue are empty, every hot credit is
/// folded and every follow-up published (twice in a row), within `timeout`.
pub async fn drain(rig: &crate::Rig, prefix: &str, timeout: Duration) -> Drain {
    let started = Instant::now();
    let deadline = started + timeout;
    let dead_letter_queue = format!("{prefix}wallet.dead_letters");
    let mut stable = 0;
    let mut last = Drain::default();
    loop {
        let depths = rig.rabbit.lock().await.queue_depths().await;
        let hot: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM hot_credits")
            .fetch_one(&rig.monitor)
            .await;
        let outbox: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&rig.monitor)
                .await;
        let treasury_queue = format!("{prefix}wallet.treasury");
        // The treasury queue is always there: without it the listing was not understood.
        let depths = depths.and_then(|depths| {
            if depths.iter().any(|(name, _)| *name == treasury_queue) {
                Ok(depths)
            } else {
                Err(anyhow::anyhow!(
                    "{treasury_queue} missing from the queue listing"
                ))
            }
        });
        last.last_error = match (&depths, &hot, &outbox) {
            (Err(error), _, _) => Some(format!("listing the queues: {error:#}")),
            (_, Err(error), _) | (_, _, Err(error)) => Some(format!("querying: {error}")),
            _ => None,
        };
        if let (Ok(depths), Ok(hot), Ok(outbox)) = (depths, hot, outbox) {
            last.dead_letters = depths
                .iter()
                .find(|(name, _)| *name == dead_letter_queue)
                .map_or(0, |(_, count)| *count);
            last.leftovers = depths
                .into_iter()
                .filter(|(name, count)| {
                    name.starts_with(prefix) && *name != dead_letter_queue && *count > 0
                })
                .collect();
            last.hot_credits = hot;
            last.outbox_unpublished = outbox;
            if last.leftovers.is_empty() && hot == 0 && outbox == 0 {
                stable += 1;
                if stable >= DRAIN_STABLE_ROUNDS {
                    last.drained = true;
                    break;
                }
            } else {
                stable = 0;
            }
        } else {
            stable = 0;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
    last.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    last
}

/// Every record of one command id folded into one (a command may have been sent in several
/// rounds: a recovery probe retried, the retry after the drain).
pub fn merge(records: Vec<CommandRecord>) -> Vec<CommandRecord> {
    let mut merged: HashMap<Uuid, CommandRecord> = HashMap::new();
    let mut order = Vec::new();
    for record in records {
        match merged.get_mut(&record.command_id) {
            None => {
                order.push(record.command_id);
                merged.insert(record.command_id, record);
            }
            Some(into) => {
                into.attempts += record.attempts;
                into.accepted |= record.accepted;
                into.accepted_202 |= record.accepted_202;
                into.negative_balance_seen |= record.negative_balance_seen;
                into.duplicates_published += record.duplicates_published;
                into.unexpected.extend(record.unexpected);
                into.foreign_ids.extend(record.foreign_ids);
                match (&into.result, record.result) {
                    (None, result) => into.result = result,
                    (Some(first), Some(later)) if *first != later => into.divergent.push(later),
                    _ => {}
                }
                into.divergent.extend(record.divergent);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|id| merged.remove(&id))
        .collect()
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub commands_sent: usize,
    pub sent_by_kind: Vec<(Kind, usize)>,
    pub accepted: usize,
    pub accepted_202: usize,
    /// Stored with outcome applied / rejected (a refusal is a result too).
    pub applied: usize,
    pub rejected: usize,
    /// Never a 2xx: the client got a stored refusal (409/422/404).
    pub refused: usize,
    /// Never a 2xx nor a result (only 503s, timeouts, resets): stored anyway, or not at all.
    pub unanswered_stored: usize,
    pub unanswered_not_stored: usize,
    pub lost: Vec<Uuid>,
    pub applied_twice: Vec<Uuid>,
    pub checks: Vec<Check>,
    pub audit: Option<Value>,
}

struct Stored {
    principal: String,
    outcome: String,
    status: u16,
    body: Value,
}

fn examples<T: std::fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items
        .iter()
        .take(EXAMPLES_MAX)
        .map(ToString::to_string)
        .collect();
    if items.len() > EXAMPLES_MAX {
        format!(
            "{} (and {} more)",
            shown.join("; "),
            items.len() - EXAMPLES_MAX
        )
    } else {
        shown.join("; ")
    }
}

fn check(name: &'static str, failures: &[String], ok_detail: String) -> Check {
    Check {
        name,
        passed: failures.is_empty(),
        detail: if failures.is_empty() {
            ok_detail
        } else {
            format!("{} failures: {}", failures.len(), examples(failures))
        },
    }
}

/// Holds the merged records against the database.
pub async fn verify(pool: &PgPool, records: &[CommandRecord]) -> anyhow::Result<Verdict> {
    let stored: HashMap<Uuid, Stored> =
        sqlx::query_as::<_, (Uuid, String, String, i16, Json<Value>)>(
            "SELECT id, principal, outcome, status_code, body FROM commands",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, principal, outcome, status, Json(body))| {
            (
                id,
                Stored {
                    principal,
                    outcome,
                    status: u16::try_from(status).unwrap_or(0),
                    body,
                },
            )
        })
        .collect();
    let journals: HashMap<Uuid, (String, i64)> = sqlx::query_as::<_, (Uuid, String, i64)>(
        "SELECT j.id, j.kind, count(p.id)::bigint
         FROM journal_entries j LEFT JOIN postings p ON p.journal_id = j.id
         GROUP BY j.id, j.kind",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(id, kind, postings)| (id, (kind, postings)))
    .collect();
    let users: HashSet<Uuid> = sqlx::query_scalar::<_, Uuid>("SELECT id FROM users")
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
    // A player's GEMS balance right after each journal entry that moved it: the running sum of
    // the account's postings in posting order (the order the worker wrote them, under the
    // account's row lock).
    let balance_after: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT p.journal_id,
                (sum(p.amount) OVER (PARTITION BY p.account_id ORDER BY p.id))::bigint
         FROM postings p JOIN accounts a ON a.id = p.account_id
         WHERE a.owner_kind = 'player' AND a.asset = 'GEMS'",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let negative: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT owner_id, asset, balance FROM accounts WHERE owner_kind = 'player' AND balance < 0",
    )
    .fetch_all(pool)
    .await?;

    let mut verdict = Verdict {
        commands_sent: records.len(),
        ..Verdict::default()
    };
    let mut by_kind: HashMap<Kind, usize> = HashMap::new();
    let mut known_ids: HashSet<Uuid> = HashSet::new();
    let mut journal_mismatch = Vec::new();
    let mut follow_ups_missing = Vec::new();
    let mut diverged = Vec::new();
    let mut stored_mismatch = Vec::new();
    let mut foreign = Vec::new();
    let mut unexpected = Vec::new();
    let mut negative_seen = Vec::new();
    let mut users_missing = Vec::new();
    let mut balance_mismatch = Vec::new();
    for record in records {
        *by_kind.entry(record.kind).or_default() += 1;
        known_ids.insert(record.command_id);
        let id = record.command_id;
        let row = stored.get(&id);
        if record.accepted {
            verdict.accepted += 1;
            if record.accepted_202 {
                verdict.accepted_202 += 1;
            }
        }
        match row {
            Some(row) if row.outcome == "applied" => verdict.applied += 1,
            Some(_) => verdict.rejected += 1,
            None => {}
        }
        let refused = !record.resolved_after_drain
            && matches!(&record.result, Some((status, _)) if *status != 200);
        match (record.accepted, refused, row.is_some()) {
            (true, _, false) => verdict.lost.push(id),
            (true, _, true) => {}
            (false, true, _) => verdict.refused += 1,
            (false, false, true) => verdict.unanswered_stored += 1,
            (false, false, false) => verdict.unanswered_not_stored += 1,
        }
        // The result the client converged on is the stored one, and every retry agrees.
        if let Some((status, body)) = &record.result {
            match row {
                Some(row) if row.status == *status && row.body == *body => {}
                Some(row) => stored_mismatch.push(format!(
                    "{id} ({} {}): client got {status} {body}, stored {} {}",
                    record.kind.as_str(),
                    record.key,
                    row.status,
                    row.body
                )),
                None => stored_mismatch.push(format!(
                    "{id} ({} {}): client got {status} {body}, nothing stored",
                    record.kind.as_str(),
                    record.key
                )),
            }
            for (later_status, later_body) in &record.divergent {
                diverged.push(format!(
                    "{id} ({} {}): first {status} {body}, later {later_status} {later_body}",
                    record.kind.as_str(),
                    record.key
                ));
            }
        }
        if let Some(row) = row
            && row.principal != record.principal
        {
            stored_mismatch.push(format!(
                "{id}: stored principal {} but the client sent as {}",
                row.principal, record.principal
            ));
        }
        for foreign_id in &record.foreign_ids {
            foreign.push(format!(
                "{} {}: X-Command-Id {foreign_id}, derived {id}",
                record.kind.as_str(),
                record.key
            ));
        }
        for (status, body) in &record.unexpected {
            unexpected.push(format!(
                "{} {}: {status} {body}",
                record.kind.as_str(),
                record.key
            ));
        }
        if record.negative_balance_seen {
            negative_seen.push(format!("{} {}", record.kind.as_str(), record.key));
        }
        // Value moves exactly when the command was applied: one journal entry, id = command id.
        let applied = row.is_some_and(|row| row.outcome == "applied");
        let moves_value = match record.kind {
            Kind::TopUp | Kind::Purchase => applied,
            Kind::Signup => applied && record.referral.is_some(),
        };
        let journal = journals.get(&id);
        if moves_value != journal.is_some() {
            journal_mismatch.push(format!(
                "{id} ({} {}): stored outcome {:?}, journal entry {}",
                record.kind.as_str(),
                record.key,
                row.map(|row| row.outcome.as_str()),
                if journal.is_some() {
                    "present"
                } else {
                    "missing"
                }
            ));
        }
        // A 200 reports the balance the books had right after the command.
        if let (Kind::TopUp | Kind::Purchase, Some((200, body))) = (record.kind, &record.result)
            && let Some(reported) = body["balance"].as_i64()
        {
            match balance_after.get(&id) {
                Some(books) if *books == reported => {}
                books => balance_mismatch.push(format!(
                    "{id} ({} {}): the client was told {reported}, the books say {books:?}",
                    record.kind.as_str(),
                    record.key
                )),
            }
        }
        if record.kind == Kind::Signup && applied {
            if !users.contains(&record.player_id) {
                users_missing.push(format!("{id}: user {} missing", record.player_id));
            }
            if record.referral.is_some() {
                // The referrer's share is a follow-up command in the referrer's partition.
                let follow_up = ids::derived_id(id, "referrer-bonus");
                known_ids.insert(follow_up);
                let follow_up_applied = stored
                    .get(&follow_up)
                    .is_some_and(|row| row.outcome == "applied");
                if !follow_up_applied || !journals.contains_key(&follow_up) {
                    follow_ups_missing.push(format!(
                        "referrer bonus {follow_up} of signup {id} ({})",
                        record.key
                    ));
                }
            }
        }
    }
    let mut kinds: Vec<(Kind, usize)> = by_kind.into_iter().collect();
    kinds.sort();
    verdict.sent_by_kind = kinds;

    // Postings per journal entry: more than its kind makes means it was applied twice.
    let mut malformed = Vec::new();
    let mut unknown = Vec::new();
    for (id, (kind, postings)) in &journals {
        match expected_postings(kind) {
            Some(expected) if *postings > expected => verdict.applied_twice.push(*id),
            Some(expected) if *postings < expected => {
                malformed.push(format!(
                    "{id} ({kind}): {postings} postings, {expected} expected"
                ));
            }
            Some(_) => {}
            None => malformed.push(format!("{id}: unknown journal kind {kind}")),
        }
        if kind != "genesis" && !known_ids.contains(id) {
            unknown.push(format!("journal {id} ({kind})"));
        }
    }
    for (id, row) in &stored {
        if !known_ids.contains(id) {
            unknown.push(format!("command {id} ({})", row.principal));
        }
    }

    let lost: Vec<String> = verdict.lost.iter().map(ToString::to_string).collect();
    let twice: Vec<String> = verdict
        .applied_twice
        .iter()
        .map(ToString::to_string)
        .collect();
    let negative_rows: Vec<String> = negative
        .iter()
        .map(|(owner, asset, balance)| format!("{owner} {asset} {balance}"))
        .chain(negative_seen)
        .collect();
    verdict.checks = vec![
        check(
            "every 2xx command is stored (none lost)",
            &lost,
            format!("{} accepted, all stored", verdict.accepted),
        ),
        check(
            "no journal entry has more postings than its kind (none applied twice)",
            &twice,
            format!("{} journal entries checked", journals.len()),
        ),
        check(
            "every journal entry has the postings of its kind",
            &malformed,
            "yes".to_string(),
        ),
        check(
            "applied commands that move value have one journal entry, others none",
            &journal_mismatch,
            "yes".to_string(),
        ),
        check(
            "every applied referral signup paid the referrer once (follow-up applied)",
            &follow_ups_missing,
            "yes".to_string(),
        ),
        check(
            "every applied signup created its user",
            &users_missing,
            "yes".to_string(),
        ),
        check(
            "the result a client got is the stored one",
            &stored_mismatch,
            "yes".to_string(),
        ),
        check(
            "every 200 reports the balance the books had right after that command",
            &balance_mismatch,
            "yes".to_string(),
        ),
        check(
            "retries of one key converged on one result",
            &diverged,
            "yes".to_string(),
        ),
        check(
            "X-Command-Id is the id derived from (principal, key)",
            &foreign,
            "yes".to_string(),
        ),
        check(
            "no unexpected status (only results, 202, 502/503/504 or transport errors)",
            &unexpected,
            "yes".to_string(),
        ),
        check(
            "no player balance is negative (books and responses)",
            &negative_rows,
            "yes".to_string(),
        ),
        check(
            "the books hold only commands the client sent and their follow-ups",
            &unknown,
            "yes".to_string(),
        ),
    ];

    let audit = shared::audit::run(pool).await?;
    let failed: Vec<String> = audit
        .checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| {
            format!(
                "{} ({} violations): {}",
                check.name, check.violations, check.figures
            )
        })
        .collect();
    verdict.checks.push(check(
        "the audit passes",
        &failed,
        format!("{} checks passed", audit.checks.len()),
    ));
    verdict.audit = Some(serde_json::to_value(&audit)?);
    say(format!(
        "verified {} commands against {} stored results and {} journal entries",
        records.len(),
        stored.len(),
        journals.len()
    ));
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::records::{AttemptOutcome, Intent};

    fn record(id: u128, outcome: Option<AttemptOutcome>) -> CommandRecord {
        let mut record = CommandRecord::new(
            Kind::TopUp,
            Intent::TopUp { amount: 5 },
            format!("k{id}"),
            "player:x".to_string(),
            Uuid::from_u128(id),
            Uuid::from_u128(100),
            None,
        );
        if let Some(outcome) = outcome {
            record.observe(&outcome);
        }
        record
    }

    fn status(status: u16, body: Value) -> Option<AttemptOutcome> {
        Some(AttemptOutcome::Status {
            status,
            body,
            command_id: None,
            replayed: None,
        })
    }

    #[test]
    fn merging_keeps_order_adds_attempts_and_flags_divergence() {
        let merged = merge(vec![
            record(1, status(202, json!({}))),
            record(2, status(200, json!({ "balance": 1 }))),
            record(1, status(200, json!({ "balance": 5 }))),
            record(1, status(200, json!({ "balance": 6 }))),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].command_id, Uuid::from_u128(1));
        assert_eq!(merged[0].attempts, 3);
        assert!(merged[0].accepted && merged[0].accepted_202);
        assert_eq!(merged[0].result, Some((200, json!({ "balance": 5 }))));
        assert_eq!(merged[0].divergent, vec![(200, json!({ "balance": 6 }))]);
        assert!(merged[1].divergent.is_empty());
    }

    #[test]
    fn postings_per_kind() {
        assert_eq!(expected_postings("top_up"), Some(2));
        assert_eq!(expected_postings("purchase"), Some(4));
        assert_eq!(expected_postings("referral_bonus"), Some(2));
        assert_eq!(expected_postings("genesis"), Some(2));
        assert_eq!(expected_postings("gift"), None);
    }
}
