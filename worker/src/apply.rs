//! Applying a batch of commands of one or more partitions, all or nothing.
//!
//! The batch is set-based: one statement per table, whatever the batch size. Commands are decided
//! in memory, in delivery order, against the balances read, so each command sees the balances
//! the commands before it left: the result is the same as applying them one by one.
//!
//! Steps, all inside the caller's transaction (`apply_batch`, the locked path):
//! 1. in one statement: look up stored results (dedup by command id), read the items bought and
//!    lock every existing account of the players involved, in id order;
//! 2. create the users of new signups (`ON CONFLICT DO NOTHING` tells who got the name);
//! 3. create the missing accounts, then lock them;
//! 4. decide each command in order (overdraft checks, checked arithmetic, postings);
//! 5. write journals, postings, balances, hot credits, command results and outbox rows.
//!
//! A batch without signups, gifts or reversals needs neither the transaction nor the locks.
//! `apply` runs such a batch without a transaction (`apply_unlocked`): step 1 without locks;
//! step 3, when an account is missing, committing the new empty accounts at once (harmless:
//! they change no balance); and step 5 as one statement that commits on its own and updates an
//! account only if its version is still the one read, failing as a whole otherwise. That is two
//! round trips instead of four and no row locks, for the same result. Anything else, or a
//! failed write, goes the locked path.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use shared::domain::{
    self, GEMS, PURCHASE_QUANTITY_MAX, SHOP_OWNER_ID, TRANSIT_OWNER_ID, TREASURY_OWNER_ID,
};
use shared::ids;
use shared::partition::partition_of;
use shared::results::{
    ErrorBody, Gift, GiftResult, GiftStatus, PurchaseResult, Purchased, ReferrerBonusResult,
    ReversalResult, Reversed, SignupResult, Wallet, to_body,
};
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope, CommandReply};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// A message owed after the commit: a follow-up command for another partition.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: i64,
    pub routing_key: String,
    pub payload: Vec<u8>,
}

/// What a committed batch owes the outside world.
#[derive(Debug, Default)]
pub struct BatchResult {
    /// One reply per input envelope, in input order.
    pub replies: Vec<CommandReply>,
    /// Follow-up commands to publish before acknowledging.
    pub outbox: Vec<OutboxMessage>,
    /// Hot credits written by this batch, for the treasury consumer.
    pub hot_credit_ids: Vec<i64>,
    /// Request ids of the commands applied by this batch (every applied command moves money
    /// through a hot account), carried to the treasury for its logs.
    pub applied_request_ids: Vec<String>,
    /// Whether the batch was applied in a transaction with its accounts locked (`true`) or by
    /// one version-checked write statement (`false`).
    pub locked: bool,
}

/// What the applying worker knows beyond the commands: the partition count (to route
/// follow-ups) and a cache of the hot accounts' ids. One context serves every partition.
pub struct ApplyContext {
    pub partitions: u16,
    /// Ids of the hot system accounts, loaded once and again only when one is missing (a new
    /// item's shop account). They never change once created.
    pub hot_accounts: std::sync::Mutex<HashMap<(Uuid, String), i64>>,
}

impl ApplyContext {
    pub fn new(partitions: u16) -> Self {
        Self {
            partitions,
            hot_accounts: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

struct Decision {
    outcome: &'static str,
    status: u16,
    body: Value,
}

impl Decision {
    fn applied(body: Value) -> Self {
        Self {
            outcome: "applied",
            status: 200,
            body,
        }
    }

    /// 409 `insufficient_funds`, with the balance there is and the amount that was required.
    fn insufficient_funds(
        message: &str,
        balance: i64,
        required: i64,
        request_id: Option<&str>,
    ) -> Self {
        Self {
            outcome: "rejected",
            status: 409,
            body: to_body(&ErrorBody {
                balance: Some(balance),
                required: Some(required),
                ..ErrorBody::new("insufficient_funds", message, request_id)
            }),
        }
    }

    fn rejected(status: u16, code: &str, message: &str, request_id: Option<&str>) -> Self {
        Self {
            outcome: "rejected",
            status,
            body: domain::error_body(code, message, request_id),
        }
    }
}

struct AccountState {
    id: i64,
    balance: i64,
    version: i64,
    /// The version read, which the write requires to be still there.
    read_version: i64,
    changed: bool,
}

/// Everything the batch writes, collected while deciding.
#[derive(Default)]
struct Writes {
    journal_ids: Vec<Uuid>,
    journal_kinds: Vec<String>,
    journal_details: Vec<String>,
    posting_journals: Vec<Uuid>,
    posting_accounts: Vec<i64>,
    posting_assets: Vec<String>,
    posting_amounts: Vec<i64>,
    /// Signed credits per hot account; a second entry starts when a sum would overflow.
    hot_credits: HashMap<i64, Vec<i64>>,
    outbox_commands: Vec<Uuid>,
    outbox_routing_keys: Vec<String>,
    outbox_payloads: Vec<String>,
    /// (reversed journal, reversal journal) pairs of this batch.
    reversals: Vec<(Uuid, Uuid)>,
}

impl Writes {
    fn journal(&mut self, id: Uuid, kind: &str, details: Value, postings: &[(i64, &str, i64)]) {
        self.journal_ids.push(id);
        self.journal_kinds.push(kind.to_string());
        self.journal_details.push(details.to_string());
        for (account, asset, amount) in postings {
            self.posting_journals.push(id);
            self.posting_accounts.push(*account);
            self.posting_assets.push((*asset).to_string());
            self.posting_amounts.push(*amount);
        }
    }

    fn hot_credit(&mut self, account: i64, amount: i64) {
        let sums = self.hot_credits.entry(account).or_default();
        match sums
            .last_mut()
            .and_then(|last| last.checked_add(amount).map(|sum| (last, sum)))
        {
            Some((last, sum)) => *last = sum,
            None => sums.push(amount),
        }
    }
}

/// The state the in-memory decisions work on: locked player accounts and the hot accounts.
struct Books {
    accounts: HashMap<(Uuid, String), AccountState>,
    /// The assets each player has an account in (the accounts never change during a batch), so
    /// a balance view does not scan every account of the batch.
    assets: HashMap<Uuid, Vec<String>>,
    hot_accounts: HashMap<(Uuid, String), i64>,
    players: HashMap<Uuid, (String, String)>,
}

impl Books {
    fn balance(&self, player: Uuid, asset: &str) -> i64 {
        self.accounts
            .get(&(player, asset.to_string()))
            .map_or(0, |account| account.balance)
    }

    /// Adds a signed amount to a locked player account; None when it would overflow or go
    /// below zero (the caller checks funds first, so the latter means a bug, not a client).
    fn apply(&mut self, player: Uuid, asset: &str, amount: i64) -> Option<i64> {
        let account = self.accounts.get_mut(&(player, asset.to_string()))?;
        let balance = account.balance.checked_add(amount)?;
        if balance < 0 {
            return None;
        }
        account.balance = balance;
        account.version += 1;
        account.changed = true;
        Some(account.id)
    }

    fn hot(&self, owner: Uuid, asset: &str) -> Option<i64> {
        self.hot_accounts.get(&(owner, asset.to_string())).copied()
    }

    fn view(&self, player: Uuid) -> Wallet {
        let (username, referral_code) = self
            .players
            .get(&player)
            .cloned()
            .unwrap_or_else(|| (String::new(), String::new()));
        let holdings: Vec<(String, i64)> = self
            .assets
            .get(&player)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|asset| (asset.clone(), self.balance(player, asset)))
            .collect();
        let version = self
            .accounts
            .get(&(player, GEMS.to_string()))
            .map_or(0, |account| account.version);
        domain::wallet_view(&username, &referral_code, &holdings, version)
    }
}

struct Item {
    asset: String,
    price_asset: String,
    price: i64,
}

/// The commands of one partition, in delivery order.
#[derive(Debug, Clone, Copy)]
pub struct PartitionBatch<'a> {
    pub partition: u16,
    pub envelopes: &'a [CommandEnvelope],
}

/// How a batch keeps the accounts it read from changing before it writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locking {
    /// Inside the caller's transaction: the accounts are locked when they are read
    /// (`FOR UPDATE`, in id order) and stay locked until the caller commits.
    Rows,
    /// Without a transaction: the accounts are read unlocked, and the one write statement
    /// updates each changed account only if its version is still the one read, failing as a
    /// whole otherwise (`wallet_require`, SQLSTATE 40001). Two round trips instead of four
    /// (no `BEGIN`, no `COMMIT`) and no row locks to write.
    Versions,
}

/// Applies the batches of one or more partitions as one batch, inside the caller's
/// transaction, with the accounts locked. Different partitions never share a player, so
/// deciding their commands together gives each one the same result as applying its
/// partition's batch alone; within a partition, delivery order is kept. The replies come in
/// input order, batch after batch.
pub async fn apply_batch(
    transaction: &mut Transaction<'_, Postgres>,
    batches: &[PartitionBatch<'_>],
    context: &ApplyContext,
) -> Result<BatchResult, sqlx::Error> {
    apply_with(transaction, batches, context, Locking::Rows)
        .await?
        .ok_or_else(|| sqlx::Error::Protocol("a locked batch always applies".into()))
}

/// Whether a batch can be applied without a transaction at all: the commands whose decision
/// reads or writes more than the accounts, items and stored results of one statement
/// (signups create users, gifts check their receiver and owe a delivery, reversals read old
/// postings) need the locked path.
fn can_apply_unlocked(batches: &[PartitionBatch<'_>]) -> bool {
    batches
        .iter()
        .flat_map(|batch| batch.envelopes)
        .all(|envelope| {
            !matches!(
                envelope.command,
                Command::Signup { .. } | Command::Gift { .. } | Command::Reverse { .. }
            )
        })
}

/// Applies the batches like `apply_batch`, but with no transaction: one unlocked read, then one
/// write statement that commits on its own and checks the versions of the accounts it changes.
/// Missing accounts are created (and commit) before the write, as empty accounts. Returns
/// `None`, having written nothing else, when the batch turns out to owe a follow-up or a
/// reversal, which the locked path writes. An error means nothing but such accounts was
/// written either: the write failed as a whole, for instance because an account changed after
/// the read (SQLSTATE 40001) or another apply stored the same command id first.
pub async fn apply_unlocked(
    connection: &mut PgConnection,
    batches: &[PartitionBatch<'_>],
    context: &ApplyContext,
) -> Result<Option<BatchResult>, sqlx::Error> {
    if !can_apply_unlocked(batches) {
        return Ok(None);
    }
    apply_with(connection, batches, context, Locking::Versions).await
}

/// Why a batch that could have gone the unlocked way went the locked way.
fn fallback_reason(outcome: &Result<Option<BatchResult>, sqlx::Error>) -> &'static str {
    match outcome {
        Ok(_) => "needs_locks",
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("40001") => {
            "version_changed"
        }
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => "already_stored",
        Err(_) => "error",
    }
}

/// The committers' entry: applies the batches unlocked when they can be, and otherwise (or when
/// that fails, having written nothing) in a transaction with the accounts locked. The result is
/// the same either way; `BatchResult::locked` says which way it went.
pub async fn apply(
    pool: &PgPool,
    batches: &[PartitionBatch<'_>],
    context: &ApplyContext,
) -> Result<BatchResult, sqlx::Error> {
    if can_apply_unlocked(batches) {
        let mut connection = pool.acquire().await?;
        let outcome = apply_unlocked(&mut connection, batches, context).await;
        drop(connection);
        if let Ok(Some(result)) = outcome {
            metrics::counter!("wallet_applies_total", "path" => "unlocked").increment(1);
            return Ok(result);
        }
        let reason = fallback_reason(&outcome);
        if let Err(error) = &outcome {
            // The locked path below decides the outcome; an error that persists surfaces there.
            tracing::debug!(%error, reason, "unlocked apply failed, applying locked");
        }
        metrics::counter!("wallet_unlocked_fallbacks_total", "reason" => reason).increment(1);
    }
    let mut transaction = pool.begin().await?;
    let result = apply_batch(&mut transaction, batches, context).await?;
    transaction.commit().await?;
    metrics::counter!("wallet_applies_total", "path" => "locked").increment(1);
    Ok(result)
}

/// `apply_batch` and `apply_unlocked`: read, decide in order, write. With `Locking::Versions`
/// it returns `None` when the batch owes a follow-up message or a reversal, having written
/// nothing but empty accounts, so that the locked path writes those beside the batch.
async fn apply_with(
    connection: &mut PgConnection,
    batches: &[PartitionBatch<'_>],
    context: &ApplyContext,
    locking: Locking,
) -> Result<Option<BatchResult>, sqlx::Error> {
    let mut result = BatchResult {
        locked: locking == Locking::Rows,
        ..BatchResult::default()
    };
    let envelopes: Vec<(u16, &CommandEnvelope)> = batches
        .iter()
        .flat_map(|batch| {
            batch
                .envelopes
                .iter()
                .map(move |envelope| (batch.partition, envelope))
        })
        .collect();

    // 1. One round trip reads what is stored: the results of command ids seen before (dedup),
    //    the items bought, and every account of the players involved, locked in id order.
    let StoredState {
        commands: stored,
        items,
        mut accounts,
        players: mut known_players,
    } = read_stored(connection, &envelopes, locking).await?;

    // The first delivery of each new command id in this batch is decided; the rest replay it.
    let mut first_new: HashSet<Uuid> = HashSet::new();
    let (new_partitions, new_commands): (Vec<u16>, Vec<&CommandEnvelope>) = envelopes
        .iter()
        .filter(|(_, envelope)| !stored.contains_key(&envelope.id) && first_new.insert(envelope.id))
        .copied()
        .unzip();

    let replayed_ids: Vec<Uuid> = stored.keys().copied().collect();
    if !replayed_ids.is_empty() {
        // A redelivered command republishes whatever it still owes.
        let owed: Vec<(i64, String, Json<Value>)> = sqlx::query_as(
            "SELECT id, routing_key, payload FROM outbox
             WHERE command_id = ANY($1) AND published_at IS NULL ORDER BY id",
        )
        .bind(&replayed_ids)
        .fetch_all(&mut *connection)
        .await?;
        result
            .outbox
            .extend(
                owed.into_iter()
                    .map(|(id, routing_key, Json(payload))| OutboxMessage {
                        id,
                        routing_key,
                        payload: payload.to_string().into_bytes(),
                    }),
            );
    }

    // 2. Users of new signups.
    let signup_outcomes = create_users(connection, &new_commands).await?;

    // 3. Accounts of every player involved: those that exist were locked by step 1; the missing
    //    ones are created, then locked.
    let mut wanted_accounts: Vec<(Uuid, String)> = Vec::new();
    for envelope in &new_commands {
        let player = envelope.command.partition_player();
        if let Command::Signup { user_id, .. } = &envelope.command
            && !matches!(
                signup_outcomes.get(user_id),
                Some(SignupOutcome::Created { .. })
            )
        {
            continue;
        }
        wanted_accounts.push((player, GEMS.to_string()));
        match &envelope.command {
            Command::Purchase { item, .. } => {
                if let Some(item) = items.get(item) {
                    wanted_accounts.push((player, item.asset.clone()));
                }
            }
            Command::Gift { asset, .. } | Command::GiftDelivery { asset, .. } => {
                wanted_accounts.push((player, asset.clone()));
            }
            _ => {}
        }
    }
    // Most commands touch accounts that exist, so step 1 locked them and only what is missing
    // is created (no insert attempts for existing accounts).
    let missing: Vec<(Uuid, String)> = wanted_accounts
        .into_iter()
        .filter(|key| !accounts.contains_key(key))
        .collect();
    if !missing.is_empty() {
        // Unlocked, the new accounts commit at once, before the batch: harmless, since an
        // empty account of an existing player in an existing asset changes no balance, and
        // creating it again does nothing.
        create_accounts(connection, &missing).await?;
        let mut again: Vec<Uuid> = missing.iter().map(|(player, _)| *player).collect();
        again.sort_unstable();
        again.dedup();
        // The same statement locks them, with nothing else to read.
        let created = query_stored(connection, &[], &[], &again, locking).await?;
        accounts.extend(created.accounts);
        known_players.extend(created.players);
    }
    let receivers = existing_receivers(connection, &new_commands).await?;
    let reversed = load_reversed_journals(connection, &new_commands).await?;
    let mut needed_hot = vec![(TREASURY_OWNER_ID, GEMS.to_string())];
    for envelope in &new_commands {
        if let Command::Gift { asset, .. } | Command::GiftDelivery { asset, .. } = &envelope.command
        {
            needed_hot.push((TRANSIT_OWNER_ID, asset.clone()));
        }
    }
    for item in items.values() {
        needed_hot.push((TREASURY_OWNER_ID, item.price_asset.clone()));
        needed_hot.push((SHOP_OWNER_ID, item.asset.clone()));
    }
    let mut assets: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (player, asset) in accounts.keys() {
        assets.entry(*player).or_default().push(asset.clone());
    }
    let mut books = Books {
        accounts,
        assets,
        hot_accounts: hot_accounts(connection, context, &needed_hot).await?,
        players: known_players,
    };

    // 4. Decide in order.
    let mut writes = Writes::default();
    let mut decided: HashMap<Uuid, (String, u16, Value)> = HashMap::new();
    let mut command_rows = CommandRows::default();
    for (envelope, partition) in new_commands.iter().zip(&new_partitions) {
        let request_id = envelope.request_id.as_deref();
        let decision = match &envelope.command {
            Command::Signup { .. } => decide_signup(
                envelope,
                signup_outcomes.get(&envelope.command.partition_player()),
                &mut books,
                &mut writes,
                context,
            ),
            Command::TopUp { player_id, amount } => decide_credit(
                envelope.id,
                "top_up",
                json!({ "player": player_id, "amount": amount }),
                *player_id,
                *amount,
                &mut books,
                &mut writes,
                request_id,
            ),
            Command::GrantBonus {
                player_id,
                amount,
                reason,
            } => decide_credit(
                envelope.id,
                "bonus",
                json!({ "player": player_id, "amount": amount, "reason": reason }),
                *player_id,
                *amount,
                &mut books,
                &mut writes,
                request_id,
            ),
            Command::Purchase {
                player_id,
                item,
                quantity,
            } => decide_purchase(
                envelope.id,
                *player_id,
                item,
                *quantity,
                &items,
                &mut books,
                &mut writes,
                request_id,
            ),
            Command::Gift {
                giver_id,
                receiver_id,
                asset,
                amount,
            } => decide_gift(
                envelope,
                (*giver_id, *receiver_id),
                asset,
                *amount,
                receivers.contains(receiver_id),
                &mut books,
                &mut writes,
                context,
            ),
            Command::GiftDelivery {
                gift_id,
                giver_id,
                receiver_id,
                asset,
                amount,
            } => decide_gift_delivery(
                envelope.id,
                (*gift_id, *giver_id, *receiver_id),
                asset,
                *amount,
                &mut books,
                &mut writes,
                request_id,
            ),
            Command::Reverse {
                player_id,
                journal_id,
            } => {
                let original = reversed
                    .journals
                    .get(journal_id)
                    .map(|(kind, legs)| {
                        (kind.clone(), legs.iter().map(ReversedLeg::clone).collect())
                    })
                    .or_else(|| legs_from_batch(&writes, &books, *journal_id));
                if reversed.already_reversed.contains(journal_id)
                    || writes
                        .reversals
                        .iter()
                        .any(|(reversed, _)| reversed == journal_id)
                {
                    Decision::rejected(
                        409,
                        "already_reversed",
                        "this journal entry was already reversed",
                        request_id,
                    )
                } else {
                    decide_reversal(
                        envelope.id,
                        *player_id,
                        *journal_id,
                        original.as_ref(),
                        &mut books,
                        &mut writes,
                        request_id,
                    )
                }
            }
            Command::ReferrerBonus {
                referrer_id,
                referee_id,
                amount,
            } => decide_referrer_bonus(
                envelope.id,
                *referrer_id,
                *referee_id,
                *amount,
                &mut books,
                &mut writes,
                request_id,
            ),
        };
        if decision.outcome == "applied"
            && let Some(request_id) = &envelope.request_id
        {
            result.applied_request_ids.push(request_id.clone());
        }
        command_rows.push(envelope, *partition, &decision);
        decided.insert(
            envelope.id,
            (envelope.fingerprint.clone(), decision.status, decision.body),
        );
    }

    if locking == Locking::Versions
        && !(writes.outbox_commands.is_empty() && writes.reversals.is_empty())
    {
        // Nothing was written: the locked path writes these beside the batch.
        return Ok(None);
    }

    // 5. Write everything in one statement (one round trip), then the rare follow-ups.
    result.hot_credit_ids = write_batch(connection, &writes, &books, &command_rows).await?;
    write_reversals(connection, &writes).await?;
    result
        .outbox
        .extend(write_outbox(connection, &writes).await?);

    // Replies, in input order: new commands answer with their decision, everything else replays.
    let mut answered: HashSet<Uuid> = HashSet::new();
    for (_, envelope) in envelopes {
        let first_answer = answered.insert(envelope.id);
        let (fingerprint, status, body, replay) =
            match (stored.get(&envelope.id), decided.get(&envelope.id)) {
                (Some((fingerprint, status, body)), _) => (fingerprint, *status, body, true),
                (None, Some((fingerprint, status, body))) => {
                    (fingerprint, *status, body, !first_answer)
                }
                (None, None) => unreachable!("every envelope is stored or decided"),
            };
        let reply = if *fingerprint == envelope.fingerprint {
            CommandReply {
                command_id: envelope.id,
                status,
                body: body.clone(),
                replay,
            }
        } else {
            CommandReply {
                command_id: envelope.id,
                status: 422,
                body: domain::error_body(
                    "idempotency_key_reused",
                    "this Idempotency-Key was already used for a different request",
                    envelope.request_id.as_deref(),
                ),
                replay: false,
            }
        };
        result.replies.push(reply);
    }
    Ok(Some(result))
}

enum SignupOutcome {
    Created { referrer: Option<Uuid> },
    UsernameTaken,
    UnknownReferralCode,
}

/// Inserts the users of the batch's signups. A referral code must name an existing user (or one
/// created earlier in this batch); a username already taken, in the database or earlier in the
/// batch, is refused.
async fn create_users(
    connection: &mut PgConnection,
    new_commands: &[&CommandEnvelope],
) -> Result<HashMap<Uuid, SignupOutcome>, sqlx::Error> {
    let signups: Vec<_> = new_commands
        .iter()
        .filter_map(|envelope| match &envelope.command {
            Command::Signup {
                user_id,
                username,
                password_hash,
                referral_code,
                referred_by_code,
                ..
            } => Some((
                *user_id,
                username,
                password_hash,
                referral_code,
                referred_by_code,
            )),
            _ => None,
        })
        .collect();
    let mut outcomes = HashMap::new();
    if signups.is_empty() {
        return Ok(outcomes);
    }
    let codes: Vec<String> = signups
        .iter()
        .filter_map(|signup| signup.4.clone())
        .collect();
    let known: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT referral_code, id FROM users WHERE referral_code = ANY($1)")
            .bind(&codes)
            .fetch_all(&mut *connection)
            .await?;
    let mut code_owners: HashMap<String, Uuid> = known.into_iter().collect();
    let mut usernames_in_batch: HashSet<String> = HashSet::new();
    let (
        mut insert_ids,
        mut insert_names,
        mut insert_hashes,
        mut insert_codes,
        mut insert_referrers,
    ) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (user_id, username, password_hash, referral_code, referred_by_code) in signups {
        let referrer = match referred_by_code {
            None => None,
            Some(code) => match code_owners.get(code) {
                Some(owner) if *owner != user_id => Some(*owner),
                _ => {
                    outcomes.insert(user_id, SignupOutcome::UnknownReferralCode);
                    continue;
                }
            },
        };
        if !usernames_in_batch.insert(username.to_lowercase()) {
            outcomes.insert(user_id, SignupOutcome::UsernameTaken);
            continue;
        }
        code_owners.insert(referral_code.clone(), user_id);
        insert_ids.push(user_id);
        insert_names.push(username.clone());
        insert_hashes.push(password_hash.clone());
        insert_codes.push(referral_code.clone());
        insert_referrers.push(referrer);
        outcomes.insert(user_id, SignupOutcome::Created { referrer });
    }
    let created: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO users (id, username, password_hash, referral_code, referred_by)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[])
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&insert_ids)
    .bind(&insert_names)
    .bind(&insert_hashes)
    .bind(&insert_codes)
    .bind(&insert_referrers)
    .fetch_all(&mut *connection)
    .await?;
    let created: HashSet<Uuid> = created.into_iter().collect();
    for id in insert_ids {
        if !created.contains(&id) {
            outcomes.insert(id, SignupOutcome::UsernameTaken);
        }
    }
    Ok(outcomes)
}

/// What a batch needs of the stored state before deciding (`read_stored`).
struct StoredState {
    /// Command ids already applied: their fingerprint, status and body.
    commands: HashMap<Uuid, (String, u16, Value)>,
    /// The active items the batch's purchases name.
    items: HashMap<String, Item>,
    /// Every existing account of the players asked for, locked.
    accounts: HashMap<(Uuid, String), AccountState>,
    /// Those players' names and referral codes.
    players: HashMap<Uuid, (String, String)>,
}

/// One row of `READ_STORED`: which part it belongs to (`STORED_*`), then the part's columns.
type StoredRow = (
    i16,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<Json<Value>>,
);

const STORED_COMMAND: i16 = 1;
const STORED_ITEM: i16 = 2;
const STORED_ACCOUNT: i16 = 3;

/// Three reads in one statement, because every round trip costs both processes a wake-up on a
/// busy machine and a batch needs all three before deciding. The accounts are locked in id order
/// (the materialized CTE's `ORDER BY ... FOR UPDATE`) so that two transactions touching
/// overlapping players never deadlock. Run with players only, it locks the accounts a batch has
/// just created.
macro_rules! read_stored_sql {
    ($lock:literal) => {
        concat!(
            "WITH locked AS MATERIALIZED (
                SELECT a.id, a.owner_id, a.asset, a.balance, a.version, u.username, u.referral_code
                FROM accounts a JOIN users u ON u.id = a.owner_id
                WHERE a.owner_id = ANY($3) AND a.owner_kind = 'player'
                ORDER BY a.id ",
            $lock,
            "
            )
            SELECT 1::int2, id, fingerprint, NULL::text, NULL::text,
                   status_code::int8, NULL::int8, NULL::int8, body
            FROM commands WHERE id = ANY($1)
            UNION ALL
            SELECT 2::int2, NULL, item, asset, price_asset, price, NULL, NULL, NULL
            FROM items WHERE item = ANY($2) AND active
            UNION ALL
            SELECT 3::int2, owner_id, asset, username, referral_code, id, balance, version, NULL
            FROM locked"
        )
    };
}
const READ_STORED: &str = read_stored_sql!("FOR UPDATE OF a");

/// `READ_STORED` without the locks, for `Locking::Versions`: the write checks the versions.
const READ_UNLOCKED: &str = read_stored_sql!("");

/// Reads, in one round trip, the stored results of the batch's command ids, the items its
/// purchases name and, locked, the accounts of the players its commands act for. Signups are
/// left out: their players are new, so their accounts are created and locked after their users.
/// A replayed command's player is locked too, which is harmless: only this partition's owner
/// writes that player's accounts.
async fn read_stored(
    connection: &mut PgConnection,
    envelopes: &[(u16, &CommandEnvelope)],
    locking: Locking,
) -> Result<StoredState, sqlx::Error> {
    let ids: Vec<Uuid> = envelopes.iter().map(|(_, envelope)| envelope.id).collect();
    let mut item_names: Vec<&str> = Vec::new();
    let mut players: Vec<Uuid> = Vec::new();
    for (_, envelope) in envelopes {
        match &envelope.command {
            Command::Signup { .. } => continue,
            Command::Purchase { item, .. } => item_names.push(item),
            _ => {}
        }
        players.push(envelope.command.partition_player());
    }
    item_names.sort_unstable();
    item_names.dedup();
    players.sort_unstable();
    players.dedup();
    query_stored(connection, &ids, &item_names, &players, locking).await
}

/// Runs `READ_STORED` (or, unlocked, `READ_UNLOCKED`) for these command ids, item names and
/// players (each may be empty).
async fn query_stored(
    connection: &mut PgConnection,
    ids: &[Uuid],
    item_names: &[&str],
    players: &[Uuid],
    locking: Locking,
) -> Result<StoredState, sqlx::Error> {
    let statement = match locking {
        Locking::Rows => READ_STORED,
        Locking::Versions => READ_UNLOCKED,
    };
    let rows: Vec<StoredRow> = sqlx::query_as(statement)
        .bind(ids)
        .bind(item_names)
        .bind(players)
        .fetch_all(&mut *connection)
        .await?;
    let mut state = StoredState {
        commands: HashMap::new(),
        items: HashMap::new(),
        accounts: HashMap::with_capacity(rows.len()),
        players: HashMap::new(),
    };
    for row in rows {
        match row {
            (STORED_COMMAND, Some(id), Some(fingerprint), _, _, Some(status), _, _, Some(body)) => {
                let status = u16::try_from(status).unwrap_or(500);
                state.commands.insert(id, (fingerprint, status, body.0));
            }
            (STORED_ITEM, _, Some(item), Some(asset), Some(price_asset), Some(price), _, _, _) => {
                state.items.insert(
                    item,
                    Item {
                        asset,
                        price_asset,
                        price,
                    },
                );
            }
            (
                STORED_ACCOUNT,
                Some(owner),
                Some(asset),
                Some(username),
                Some(referral_code),
                Some(id),
                Some(balance),
                Some(version),
                _,
            ) => {
                state
                    .players
                    .entry(owner)
                    .or_insert((username, referral_code));
                state.accounts.insert(
                    (owner, asset),
                    AccountState {
                        id,
                        balance,
                        version,
                        read_version: version,
                        changed: false,
                    },
                );
            }
            // Every column the parts select is NOT NULL in its table, so no other row exists.
            _ => {
                return Err(sqlx::Error::Protocol(
                    "unexpected row from READ_STORED".into(),
                ));
            }
        }
    }
    Ok(state)
}

/// Creates the missing accounts of existing players in existing assets (an id that names no
/// player, or an asset that does not exist, gets none: the decision then refuses the command).
async fn create_accounts(
    connection: &mut PgConnection,
    wanted: &[(Uuid, String)],
) -> Result<(), sqlx::Error> {
    if wanted.is_empty() {
        return Ok(());
    }
    let owners: Vec<Uuid> = wanted.iter().map(|(owner, _)| *owner).collect();
    let assets: Vec<String> = wanted.iter().map(|(_, asset)| asset.clone()).collect();
    // Sorted so that concurrent inserts for overlapping accounts take their index locks in one
    // order and never deadlock.
    sqlx::query(
        "INSERT INTO accounts (owner_id, owner_kind, asset)
         SELECT owner_id, 'player', asset FROM UNNEST($1::uuid[], $2::text[]) AS t(owner_id, asset)
         WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = t.owner_id)
           AND EXISTS (SELECT 1 FROM assets x WHERE x.code = t.asset)
         ORDER BY owner_id, asset
         ON CONFLICT (owner_id, asset) DO NOTHING",
    )
    .bind(&owners)
    .bind(&assets)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Hot accounts are never locked by workers: their legs become hot credits. Their ids come
/// from the context's cache, reloaded when one that is needed is missing.
async fn hot_accounts(
    connection: &mut PgConnection,
    context: &ApplyContext,
    needed: &[(Uuid, String)],
) -> Result<HashMap<(Uuid, String), i64>, sqlx::Error> {
    let cached = context
        .hot_accounts
        .lock()
        .map(|cache| cache.clone())
        .unwrap_or_default();
    if needed.iter().all(|key| cached.contains_key(key)) {
        return Ok(cached);
    }
    let rows: Vec<(i64, Uuid, String)> =
        sqlx::query_as("SELECT id, owner_id, asset FROM accounts WHERE is_hot")
            .fetch_all(&mut *connection)
            .await?;
    let loaded: HashMap<(Uuid, String), i64> = rows
        .into_iter()
        .map(|(id, owner, asset)| ((owner, asset), id))
        .collect();
    if let Ok(mut cache) = context.hot_accounts.lock() {
        cache.clone_from(&loaded);
    }
    Ok(loaded)
}

fn unknown_player(request_id: Option<&str>) -> Decision {
    Decision::rejected(404, "unknown_player", "no such player", request_id)
}

fn decide_signup(
    envelope: &CommandEnvelope,
    outcome: Option<&SignupOutcome>,
    books: &mut Books,
    writes: &mut Writes,
    context: &ApplyContext,
) -> Decision {
    let request_id = envelope.request_id.as_deref();
    let Command::Signup {
        user_id,
        referral_bonus,
        ..
    } = &envelope.command
    else {
        unreachable!("decide_signup is called for signups only");
    };
    let referrer = match outcome {
        Some(SignupOutcome::Created { referrer }) => *referrer,
        Some(SignupOutcome::UnknownReferralCode) => {
            return Decision::rejected(
                422,
                "unknown_referral_code",
                "no player has this referral code",
                request_id,
            );
        }
        Some(SignupOutcome::UsernameTaken) | None => {
            return Decision::rejected(409, "username_taken", "this username is taken", request_id);
        }
    };
    if let Some(referrer) = referrer
        && *referral_bonus > 0
    {
        // The referee's share is applied here; the referrer's share is owed as a follow-up
        // command in the referrer's partition, with an id derived from this command so it is
        // applied exactly once however often it is republished.
        let Some(treasury) = books.hot(TREASURY_OWNER_ID, GEMS) else {
            return Decision::rejected(
                503,
                "books_not_ready",
                "treasury account missing",
                request_id,
            );
        };
        let Some(account) = books.apply(*user_id, GEMS, *referral_bonus) else {
            return Decision::rejected(
                422,
                "invalid_amount",
                "referral bonus out of range",
                request_id,
            );
        };
        writes.journal(
            envelope.id,
            "referral_bonus",
            json!({ "referee": user_id, "referrer": referrer, "share": "referee" }),
            &[
                (treasury, GEMS, -referral_bonus),
                (account, GEMS, *referral_bonus),
            ],
        );
        writes.hot_credit(treasury, -referral_bonus);
        let follow_up = CommandEnvelope {
            v: COMMAND_VERSION,
            id: ids::derived_id(envelope.id, "referrer-bonus"),
            principal: "system".to_string(),
            fingerprint: format!("referrer-bonus:{user_id}"),
            request_id: envelope.request_id.clone(),
            command: Command::ReferrerBonus {
                referrer_id: referrer,
                referee_id: *user_id,
                amount: *referral_bonus,
            },
        };
        writes.outbox_commands.push(envelope.id);
        writes
            .outbox_routing_keys
            .push(shared::broker::Topology::partition_routing_key(
                partition_of(referrer, context.partitions),
            ));
        writes
            .outbox_payloads
            .push(serde_json::to_string(&follow_up).unwrap_or_default());
    }
    Decision::applied(to_body(&SignupResult {
        user_id: *user_id,
        status: "Created".to_string(),
    }))
}

/// The treasury pays the player: a top-up or a bonus, told apart by the journal's kind.
#[allow(clippy::too_many_arguments)]
fn decide_credit(
    command_id: Uuid,
    kind: &str,
    details: Value,
    player: Uuid,
    amount: i64,
    books: &mut Books,
    writes: &mut Writes,
    request_id: Option<&str>,
) -> Decision {
    if !books.players.contains_key(&player) {
        return unknown_player(request_id);
    }
    if amount <= 0 {
        return Decision::rejected(
            422,
            "invalid_amount",
            "amount must be a positive integer",
            request_id,
        );
    }
    let Some(treasury) = books.hot(TREASURY_OWNER_ID, GEMS) else {
        return Decision::rejected(
            503,
            "books_not_ready",
            "treasury account missing",
            request_id,
        );
    };
    let Some(account) = books.apply(player, GEMS, amount) else {
        return Decision::rejected(
            422,
            "balance_limit_exceeded",
            "this credit would exceed the largest balance an account can hold",
            request_id,
        );
    };
    writes.journal(
        command_id,
        kind,
        details,
        &[(treasury, GEMS, -amount), (account, GEMS, amount)],
    );
    writes.hot_credit(treasury, -amount);
    Decision::applied(to_body(&books.view(player)))
}

#[allow(clippy::too_many_arguments)]
fn decide_purchase(
    command_id: Uuid,
    player: Uuid,
    item_name: &str,
    quantity: i64,
    items: &HashMap<String, Item>,
    books: &mut Books,
    writes: &mut Writes,
    request_id: Option<&str>,
) -> Decision {
    if !books.players.contains_key(&player) {
        return unknown_player(request_id);
    }
    let Some(item) = items.get(item_name) else {
        return Decision::rejected(
            422,
            "unknown_item",
            "the shop does not sell this item",
            request_id,
        );
    };
    if !(1..=PURCHASE_QUANTITY_MAX).contains(&quantity) {
        return Decision::rejected(
            422,
            "invalid_quantity",
            &format!("quantity must be between 1 and {PURCHASE_QUANTITY_MAX}"),
            request_id,
        );
    }
    let Some(total) = item.price.checked_mul(quantity) else {
        return Decision::rejected(
            422,
            "invalid_quantity",
            "the total price is out of range",
            request_id,
        );
    };
    let balance = books.balance(player, &item.price_asset);
    if balance < total {
        return Decision::insufficient_funds(
            &format!(
                "this purchase costs {total} {} but the balance is {balance}",
                item.price_asset
            ),
            balance,
            total,
            request_id,
        );
    }
    let (Some(treasury), Some(shop)) = (
        books.hot(TREASURY_OWNER_ID, &item.price_asset),
        books.hot(SHOP_OWNER_ID, &item.asset),
    ) else {
        return Decision::rejected(503, "books_not_ready", "system account missing", request_id);
    };
    // Both legs are checked before either is applied, so a refusal leaves nothing half-done.
    if books
        .balance(player, &item.asset)
        .checked_add(quantity)
        .is_none()
    {
        return Decision::rejected(
            422,
            "balance_limit_exceeded",
            "this purchase would exceed the largest quantity an account can hold",
            request_id,
        );
    }
    let (Some(paying), Some(receiving)) = (
        books.apply(player, &item.price_asset, -total),
        books.apply(player, &item.asset, quantity),
    ) else {
        unreachable!("funds and limits were checked above");
    };
    writes.journal(
        command_id,
        "purchase",
        json!({ "player": player, "item": item_name, "quantity": quantity,
                "unit_price": item.price, "price_asset": item.price_asset, "total": total }),
        &[
            (paying, item.price_asset.as_str(), -total),
            (treasury, item.price_asset.as_str(), total),
            (shop, item.asset.as_str(), -quantity),
            (receiving, item.asset.as_str(), quantity),
        ],
    );
    writes.hot_credit(treasury, total);
    writes.hot_credit(shop, -quantity);
    Decision::applied(to_body(&PurchaseResult {
        wallet: books.view(player),
        purchased: Purchased {
            item: item_name.to_string(),
            quantity,
            unit_price: item.price,
            total,
        },
    }))
}

/// The referrer's share of a referral bonus: a credit from the treasury, answered with who was
/// paid (nobody waits for this follow-up's reply; its stored result records it).
fn decide_referrer_bonus(
    command_id: Uuid,
    referrer: Uuid,
    referee: Uuid,
    amount: i64,
    books: &mut Books,
    writes: &mut Writes,
    request_id: Option<&str>,
) -> Decision {
    let decision = decide_credit(
        command_id,
        "referral_bonus",
        json!({ "referee": referee, "referrer": referrer, "share": "referrer" }),
        referrer,
        amount,
        books,
        writes,
        request_id,
    );
    if decision.outcome == "applied" {
        Decision::applied(to_body(&ReferrerBonusResult {
            referrer_id: referrer,
            referee_id: referee,
            amount,
        }))
    } else {
        decision
    }
}

/// Which receivers of the batch's gifts exist (read without locking: their accounts belong to
/// their own partition and are only written by the delivery follow-up there).
async fn existing_receivers(
    connection: &mut PgConnection,
    new_commands: &[&CommandEnvelope],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let receivers: Vec<Uuid> = new_commands
        .iter()
        .filter_map(|envelope| match &envelope.command {
            Command::Gift { receiver_id, .. } => Some(*receiver_id),
            _ => None,
        })
        .collect();
    if receivers.is_empty() {
        return Ok(HashSet::new());
    }
    let found: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1)")
        .bind(&receivers)
        .fetch_all(&mut *connection)
        .await?;
    Ok(found.into_iter().collect())
}

/// One posting of a journal to be reversed.
#[derive(Clone)]
struct ReversedLeg {
    account_id: i64,
    owner_id: Uuid,
    owner_kind: String,
    is_hot: bool,
    asset: String,
    amount: i64,
}

/// A posting of a reversed journal: journal, kind, account, owner, owner kind, hot, asset, amount.
type PostingRow = (Uuid, String, i64, Uuid, String, bool, String, i64);

/// The postings and kind of every journal the batch reverses.
async fn load_reversed_journals(
    connection: &mut PgConnection,
    new_commands: &[&CommandEnvelope],
) -> Result<ReversalInputs, sqlx::Error> {
    let journals: Vec<Uuid> = new_commands
        .iter()
        .filter_map(|envelope| match &envelope.command {
            Command::Reverse { journal_id, .. } => Some(*journal_id),
            _ => None,
        })
        .collect();
    if journals.is_empty() {
        return Ok(ReversalInputs::default());
    }
    let already: Vec<Uuid> =
        sqlx::query_scalar("SELECT journal_id FROM reversals WHERE journal_id = ANY($1)")
            .bind(&journals)
            .fetch_all(&mut *connection)
            .await?;
    let rows: Vec<PostingRow> = sqlx::query_as(
        "SELECT p.journal_id, j.kind, p.account_id, a.owner_id, a.owner_kind, a.is_hot, p.asset, p.amount
         FROM postings p
         JOIN journal_entries j ON j.id = p.journal_id
         JOIN accounts a ON a.id = p.account_id
         WHERE p.journal_id = ANY($1)
         ORDER BY p.id",
    )
    .bind(&journals)
    .fetch_all(&mut *connection)
    .await?;
    let mut reversed: HashMap<Uuid, (String, Vec<ReversedLeg>)> = HashMap::new();
    for (journal_id, kind, account_id, owner_id, owner_kind, is_hot, asset, amount) in rows {
        reversed
            .entry(journal_id)
            .or_insert_with(|| (kind, Vec::new()))
            .1
            .push(ReversedLeg {
                account_id,
                owner_id,
                owner_kind,
                is_hot,
                asset,
                amount,
            });
    }
    Ok(ReversalInputs {
        journals: reversed,
        already_reversed: already.into_iter().collect(),
    })
}

/// What reversals need from the database: the original journals, and which were reversed.
#[derive(Default)]
struct ReversalInputs {
    journals: HashMap<Uuid, (String, Vec<ReversedLeg>)>,
    already_reversed: HashSet<Uuid>,
}

/// The legs of a journal written earlier in this batch (not yet in the database).
fn legs_from_batch(
    writes: &Writes,
    books: &Books,
    journal_id: Uuid,
) -> Option<(String, Vec<ReversedLeg>)> {
    let index = writes.journal_ids.iter().position(|id| *id == journal_id)?;
    let kind = writes.journal_kinds[index].clone();
    let mut legs = Vec::new();
    for position in (0..writes.posting_journals.len())
        .filter(|position| writes.posting_journals[*position] == journal_id)
    {
        let account_id = writes.posting_accounts[position];
        let player = books
            .accounts
            .iter()
            .find(|(_, account)| account.id == account_id)
            .map(|((owner, _), _)| *owner);
        let hot_owner = books
            .hot_accounts
            .iter()
            .find(|(_, id)| **id == account_id)
            .map(|((owner, _), _)| *owner);
        let (owner_id, owner_kind, is_hot) = match (player, hot_owner) {
            (Some(owner), _) => (owner, "player", false),
            (None, Some(owner)) => (owner, "system", true),
            (None, None) => return None,
        };
        legs.push(ReversedLeg {
            account_id,
            owner_id,
            owner_kind: owner_kind.to_string(),
            is_hot,
            asset: writes.posting_assets[position].clone(),
            amount: writes.posting_amounts[position],
        });
    }
    Some((kind, legs))
}

/// Journal kinds a reversal may undo: those that touch exactly one player.
const REVERSIBLE_KINDS: [&str; 4] = ["top_up", "bonus", "purchase", "referral_bonus"];

#[allow(clippy::too_many_arguments)]
fn decide_gift(
    envelope: &CommandEnvelope,
    (giver, receiver): (Uuid, Uuid),
    asset: &str,
    amount: i64,
    receiver_exists: bool,
    books: &mut Books,
    writes: &mut Writes,
    context: &ApplyContext,
) -> Decision {
    let request_id = envelope.request_id.as_deref();
    if !books.players.contains_key(&giver) {
        return unknown_player(request_id);
    }
    if !receiver_exists || receiver == giver {
        return Decision::rejected(
            422,
            "invalid_receiver",
            "the receiver must be another existing player",
            request_id,
        );
    }
    if amount <= 0 {
        return Decision::rejected(
            422,
            "invalid_amount",
            "amount must be a positive integer",
            request_id,
        );
    }
    let Some(transit) = books.hot(TRANSIT_OWNER_ID, asset) else {
        return Decision::rejected(422, "unknown_asset", "no such asset", request_id);
    };
    let balance = books.balance(giver, asset);
    if balance < amount {
        return Decision::insufficient_funds(
            &format!("this gift needs {amount} {asset} but the balance is {balance}"),
            balance,
            amount,
            request_id,
        );
    }
    let Some(account) = books.apply(giver, asset, -amount) else {
        unreachable!("funds were checked above");
    };
    writes.journal(
        envelope.id,
        "gift",
        json!({ "giver": giver, "receiver": receiver, "asset": asset, "amount": amount }),
        &[(account, asset, -amount), (transit, asset, amount)],
    );
    writes.hot_credit(transit, amount);
    let delivery = CommandEnvelope {
        v: COMMAND_VERSION,
        id: ids::derived_id(envelope.id, "gift-delivery"),
        principal: "system".to_string(),
        fingerprint: format!("gift-delivery:{}", envelope.id),
        request_id: envelope.request_id.clone(),
        command: Command::GiftDelivery {
            gift_id: envelope.id,
            giver_id: giver,
            receiver_id: receiver,
            asset: asset.to_string(),
            amount,
        },
    };
    writes.outbox_commands.push(envelope.id);
    writes
        .outbox_routing_keys
        .push(shared::broker::Topology::partition_routing_key(
            partition_of(receiver, context.partitions),
        ));
    writes
        .outbox_payloads
        .push(serde_json::to_string(&delivery).unwrap_or_default());
    Decision::applied(to_body(&GiftResult {
        wallet: books.view(giver),
        gift: Gift {
            gift_id: envelope.id,
            receiver_id: receiver,
            asset: asset.to_string(),
            amount,
            status: GiftStatus::Sent,
        },
    }))
}

fn decide_gift_delivery(
    command_id: Uuid,
    (gift_id, giver, receiver): (Uuid, Uuid, Uuid),
    asset: &str,
    amount: i64,
    books: &mut Books,
    writes: &mut Writes,
    request_id: Option<&str>,
) -> Decision {
    let Some(transit) = books.hot(TRANSIT_OWNER_ID, asset) else {
        return Decision::rejected(
            503,
            "books_not_ready",
            "transit account missing",
            request_id,
        );
    };
    let Some(account) = books.apply(receiver, asset, amount) else {
        return Decision::rejected(
            422,
            "balance_limit_exceeded",
            "the gift would overflow the receiver's balance",
            request_id,
        );
    };
    writes.journal(
        command_id,
        "gift_delivery",
        json!({ "gift": gift_id, "giver": giver, "receiver": receiver, "asset": asset, "amount": amount }),
        &[(transit, asset, -amount), (account, asset, amount)],
    );
    writes.hot_credit(transit, -amount);
    Decision::applied(to_body(&Gift {
        gift_id,
        receiver_id: receiver,
        asset: asset.to_string(),
        amount,
        status: GiftStatus::Delivered,
    }))
}

fn decide_reversal(
    command_id: Uuid,
    player: Uuid,
    journal_id: Uuid,
    original: Option<&(String, Vec<ReversedLeg>)>,
    books: &mut Books,
    writes: &mut Writes,
    request_id: Option<&str>,
) -> Decision {
    let Some((kind, legs)) = original else {
        return Decision::rejected(404, "unknown_journal", "no such journal entry", request_id);
    };
    let one_player = legs
        .iter()
        .filter(|leg| leg.owner_kind == "player")
        .all(|leg| leg.owner_id == player);
    if !REVERSIBLE_KINDS.contains(&kind.as_str())
        || !one_player
        || !books.players.contains_key(&player)
    {
        return Decision::rejected(
            422,
            "not_reversible",
            "this journal entry cannot be reversed",
            request_id,
        );
    }
    // Every player leg is checked before any is applied, so a refusal leaves nothing half-done.
    for leg in legs
        .iter()
        .filter(|leg| !leg.is_hot && leg.owner_kind == "player")
    {
        let balance = books.balance(player, &leg.asset);
        match balance.checked_sub(leg.amount) {
            Some(remaining) if remaining >= 0 => {}
            Some(_) => {
                let mut decision = Decision::insufficient_funds(
                    "the player no longer holds what this reversal would take back",
                    balance,
                    leg.amount,
                    request_id,
                );
                decision.body["asset"] = leg.asset.clone().into();
                return decision;
            }
            None => {
                return Decision::rejected(
                    422,
                    "balance_limit_exceeded",
                    "the reversal would overflow a balance",
                    request_id,
                );
            }
        }
    }
    let mut postings = Vec::with_capacity(legs.len());
    for leg in legs {
        if leg.is_hot {
            writes.hot_credit(leg.account_id, -leg.amount);
        } else if books.apply(player, &leg.asset, -leg.amount).is_none() {
            unreachable!("every player leg was checked above");
        }
        postings.push((leg.account_id, leg.asset.as_str(), -leg.amount));
    }
    writes.journal(
        command_id,
        "reversal",
        json!({ "reverses": journal_id, "kind": kind }),
        &postings,
    );
    writes.reversals.push((journal_id, command_id));
    Decision::applied(to_body(&ReversalResult {
        wallet: books.view(player),
        reversed: Reversed {
            journal_id,
            kind: kind.to_string(),
        },
    }))
}

#[derive(Default)]
struct CommandRows {
    ids: Vec<Uuid>,
    principals: Vec<String>,
    kinds: Vec<String>,
    fingerprints: Vec<String>,
    partitions: Vec<i32>,
    outcomes: Vec<String>,
    statuses: Vec<i16>,
    bodies: Vec<String>,
    request_ids: Vec<Option<String>>,
}

impl CommandRows {
    fn push(&mut self, envelope: &CommandEnvelope, partition: u16, decision: &Decision) {
        self.ids.push(envelope.id);
        self.principals.push(envelope.principal.clone());
        self.kinds.push(envelope.command.kind().to_string());
        self.fingerprints.push(envelope.fingerprint.clone());
        self.partitions.push(i32::from(partition));
        self.outcomes.push(decision.outcome.to_string());
        self.statuses
            .push(i16::try_from(decision.status).unwrap_or(i16::MAX));
        self.bodies.push(decision.body.to_string());
        self.request_ids.push(envelope.request_id.clone());
    }
}

/// Writes the batch's journals, postings, balances, command results and hot credits in one
/// statement (data-modifying CTEs, one round trip). Foreign keys are checked at the end of the
/// statement, so postings may reference journals inserted beside them. Each changed account is
/// updated only if its version is still the one read; if any is not, `wallet_require` fails
/// the whole statement, so nothing of the batch is written. (With the accounts locked that
/// cannot happen; without, it means another apply changed them after the read.) Returns the
/// hot credits' ids for the treasury.
async fn write_batch(
    connection: &mut PgConnection,
    writes: &Writes,
    books: &Books,
    commands: &CommandRows,
) -> Result<Vec<i64>, sqlx::Error> {
    let changed: Vec<&AccountState> = books
        .accounts
        .values()
        .filter(|account| account.changed)
        .collect();
    let account_ids: Vec<i64> = changed.iter().map(|account| account.id).collect();
    let balances: Vec<i64> = changed.iter().map(|account| account.balance).collect();
    let versions: Vec<i64> = changed.iter().map(|account| account.version).collect();
    let read_versions: Vec<i64> = changed.iter().map(|account| account.read_version).collect();
    let (mut credit_accounts, mut credit_amounts) = (Vec::new(), Vec::new());
    for (account, sums) in &writes.hot_credits {
        for amount in sums.iter().filter(|amount| **amount != 0) {
            credit_accounts.push(*account);
            credit_amounts.push(*amount);
        }
    }
    sqlx::query_scalar(
        "WITH journals AS (
             INSERT INTO journal_entries (id, kind, details)
             SELECT id, kind, details::json FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS t(id, kind, details)
         ), posted AS (
             INSERT INTO postings (journal_id, account_id, asset, amount)
             SELECT * FROM UNNEST($4::uuid[], $5::int8[], $6::text[], $7::int8[])
         ), balances AS (
             UPDATE accounts AS a SET balance = u.balance, version = u.version
             FROM UNNEST($8::int8[], $9::int8[], $10::int8[], $11::int8[]) AS u(id, balance, version, read_version)
             WHERE a.id = u.id AND a.version = u.read_version
             RETURNING a.id
         ), results AS (
             INSERT INTO commands (id, principal, kind, fingerprint, partition, outcome, status_code, body, request_id)
             SELECT id, principal, kind, fingerprint, partition, outcome, status_code, body::json, request_id
             FROM UNNEST($12::uuid[], $13::text[], $14::text[], $15::text[], $16::int4[], $17::text[], $18::int2[], $19::text[], $20::text[])
                  AS t(id, principal, kind, fingerprint, partition, outcome, status_code, body, request_id)
         ), credits AS (
             INSERT INTO hot_credits (account_id, amount)
             SELECT * FROM UNNEST($21::int8[], $22::int8[])
             RETURNING id
         )
         SELECT ARRAY(SELECT id FROM credits)
         WHERE wallet_require((SELECT count(*) FROM balances) = cardinality($8::int8[]),
                              'an account changed after the batch read it')",
    )
    .bind(&writes.journal_ids)
    .bind(&writes.journal_kinds)
    .bind(&writes.journal_details)
    .bind(&writes.posting_journals)
    .bind(&writes.posting_accounts)
    .bind(&writes.posting_assets)
    .bind(&writes.posting_amounts)
    .bind(&account_ids)
    .bind(&balances)
    .bind(&versions)
    .bind(&read_versions)
    .bind(&commands.ids)
    .bind(&commands.principals)
    .bind(&commands.kinds)
    .bind(&commands.fingerprints)
    .bind(&commands.partitions)
    .bind(&commands.outcomes)
    .bind(&commands.statuses)
    .bind(&commands.bodies)
    .bind(&commands.request_ids)
    .bind(&credit_accounts)
    .bind(&credit_amounts)
    .fetch_one(&mut *connection)
    .await
}

async fn write_reversals(
    connection: &mut PgConnection,
    writes: &Writes,
) -> Result<(), sqlx::Error> {
    if writes.reversals.is_empty() {
        return Ok(());
    }
    let (reversed, reversals): (Vec<Uuid>, Vec<Uuid>) = writes.reversals.iter().copied().unzip();
    sqlx::query("INSERT INTO reversals (journal_id, reversal_id) SELECT * FROM UNNEST($1::uuid[], $2::uuid[])")
        .bind(&reversed)
        .bind(&reversals)
        .execute(&mut *connection)
        .await?;
    Ok(())
}

async fn write_outbox(
    connection: &mut PgConnection,
    writes: &Writes,
) -> Result<Vec<OutboxMessage>, sqlx::Error> {
    if writes.outbox_commands.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "INSERT INTO outbox (command_id, routing_key, payload)
         SELECT command_id, routing_key, payload::jsonb
         FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS t(command_id, routing_key, payload)
         RETURNING id, routing_key, payload::text",
    )
    .bind(&writes.outbox_commands)
    .bind(&writes.outbox_routing_keys)
    .bind(&writes.outbox_payloads)
    .fetch_all(&mut *connection)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, routing_key, payload)| OutboxMessage {
            id,
            routing_key,
            payload: payload.into_bytes(),
        })
        .collect())
}
