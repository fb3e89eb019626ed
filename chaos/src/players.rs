//! Virtual players. Each slot signs a player up (some with a referral code, a few with a bogus
//! code or a taken name), logs in, then tops up and buys (some purchases deliberately overdraw),
//! then starts over with a new player, until the load stops.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, Session};
use crate::records::{CommandRecord, Intent};
use uuid::Uuid;

/// Commands one player sends before its slot starts over with a new player. Signups and logins
/// cost an argon2 hash each (about a CPU-second in a debug build), so they stay a small share.
const COMMANDS_PER_PLAYER_MIN: u32 = 40;
const COMMANDS_PER_PLAYER_MAX: u32 = 120;
/// Pause between two commands of one player.
const THINK_TIME_MAX_MS: u64 = 20;
/// Largest top-up a player asks for.
const TOP_UP_AMOUNT_MAX: i64 = 500;
/// Ordinary purchases buy this many gold coins at most.
const PURCHASE_QUANTITY_MAX: i64 = 3;
/// Overdrawing purchases buy this many treasure boxes (50 GEMS each): far above any balance a
/// player builds here, so they are refused with 409.
const OVERDRAW_QUANTITY_MIN: i64 = 200;
const OVERDRAW_QUANTITY_MAX: i64 = 1_000;
/// Mix of commands, in whole percent (the rest are top-ups).
const PURCHASE_PERCENT: u32 = 30;
const OVERDRAW_PERCENT: u32 = 10;
/// Signups: with a real referral code, with a bogus one, or with a name already taken.
const REFERRAL_PERCENT: u32 = 40;
const BOGUS_REFERRAL_PERCENT: u32 = 3;
const TAKEN_NAME_PERCENT: u32 = 3;
/// A code no player has (the real ones are 12 Crockford base32 characters).
const BOGUS_REFERRAL_CODE: &str = "NOSUCHCODE0";
/// Referral codes kept for later signups.
const REFERRAL_CODES_KEPT: usize = 256;
/// Signups a slot tries in a row before pausing (the gateway may be down).
const SIGNUP_FAILURE_PAUSE_MS: u64 = 500;

/// What the slots share: the referral codes of players that exist, and every session (so
/// commands can be retried after the run).
#[derive(Default)]
pub struct Shared {
    codes: Mutex<VecDeque<String>>,
    sessions: Mutex<HashMap<Uuid, Session>>,
}

impl Shared {
    pub fn add_session(&self, session: &Session) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(session.player_id, session.clone());
        }
    }

    pub fn session(&self, player_id: Uuid) -> Option<Session> {
        self.sessions.lock().ok()?.get(&player_id).cloned()
    }

    fn add_code(&self, code: String) {
        if let Ok(mut codes) = self.codes.lock() {
            if codes.len() >= REFERRAL_CODES_KEPT {
                codes.pop_front();
            }
            codes.push_back(code);
        }
    }

    fn pick_code(&self, rng: &mut StdRng) -> Option<String> {
        let codes = self.codes.lock().ok()?;
        if codes.is_empty() {
            return None;
        }
        codes.get(rng.random_range(0..codes.len())).cloned()
    }
}

/// Runs one player slot until `stop`; returns the records of every command it sent.
pub async fn run_slot(
    client: Arc<Client>,
    shared: Arc<Shared>,
    slot: u32,
    seed: u64,
    stop: CancellationToken,
) -> Vec<CommandRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut records = Vec::new();
    let mut generation = 0u32;
    while !stop.is_cancelled() {
        generation += 1;
        let username = format!("p{slot}g{generation}");
        // A few signups reuse the name of this slot's previous player (taken: 409), a few send
        // a code nobody has (422); both are results that must replay identically.
        let roll = rng.random_range(0..100);
        let (name, referral_code, expect_player) = if generation > 1 && roll < TAKEN_NAME_PERCENT {
            (format!("p{slot}g{}", generation - 1), None, false)
        } else if roll < TAKEN_NAME_PERCENT + BOGUS_REFERRAL_PERCENT {
            (username, Some(BOGUS_REFERRAL_CODE.to_string()), false)
        } else if roll < TAKEN_NAME_PERCENT + BOGUS_REFERRAL_PERCENT + REFERRAL_PERCENT {
            let code = shared.pick_code(&mut rng);
            (username, code, true)
        } else {
            (username, None, true)
        };
        let key = format!("signup-{slot}-{generation}");
        let signup = client
            .command(
                None,
                &Intent::Signup {
                    username: name.clone(),
                    referral_code,
                },
                key,
                &mut rng,
            )
            .await;
        let created = matches!(signup.result, Some((200, _)));
        records.push(signup);
        if !expect_player || !created {
            if !created {
                tokio::time::sleep(Duration::from_millis(SIGNUP_FAILURE_PAUSE_MS)).await;
            }
            continue;
        }
        let Some(session) = client.login(&name, &mut rng).await else {
            continue;
        };
        shared.add_session(&session);
        if let Some(balance) = client.balance(&session, &mut rng).await
            && let Some(code) = balance["referralCode"].as_str()
        {
            shared.add_code(code.to_string());
        }
        let commands = rng.random_range(COMMANDS_PER_PLAYER_MIN..=COMMANDS_PER_PLAYER_MAX);
        for sequence in 0..commands {
            if stop.is_cancelled() {
                break;
            }
            let roll = rng.random_range(0..100);
            let intent = if roll < OVERDRAW_PERCENT {
                Intent::Purchase {
                    item: "treasure_box",
                    quantity: rng.random_range(OVERDRAW_QUANTITY_MIN..=OVERDRAW_QUANTITY_MAX),
                }
            } else if roll < OVERDRAW_PERCENT + PURCHASE_PERCENT {
                Intent::Purchase {
                    item: "gold_coin",
                    quantity: rng.random_range(1..=PURCHASE_QUANTITY_MAX),
                }
            } else {
                Intent::TopUp {
                    amount: rng.random_range(1..=TOP_UP_AMOUNT_MAX),
                }
            };
            let key = format!("{name}-{sequence}");
            records.push(client.command(Some(&session), &intent, key, &mut rng).await);
            tokio::time::sleep(Duration::from_millis(
                rng.random_range(0..=THINK_TIME_MAX_MS),
            ))
            .await;
        }
    }
    records
}
