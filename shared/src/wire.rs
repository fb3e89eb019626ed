//! The wire format between the gateway, the workers and the treasury. JSON, versioned: a
//! message with an unknown version is poison and goes to the dead-letter queue.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The only command envelope version this build understands.
pub const COMMAND_VERSION: u32 = 1;

/// A command as published to a partition queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandEnvelope {
    /// Envelope version; see [`COMMAND_VERSION`].
    pub v: u32,
    /// Derived from (principal, idempotency key); the unit of deduplication.
    pub id: Uuid,
    /// Who sent it: `player:<uuid>`, `signup:<username>`, `system` (follow-ups) or `key:<id>`.
    pub principal: String,
    /// Keyed hash of the request; the same id with another fingerprint is refused.
    pub fingerprint: String,
    /// The HTTP request id, carried through for logs.
    #[serde(default)]
    pub request_id: Option<String>,
    pub command: Command,
}

/// The commands a worker applies. The player named first decides the partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Creates a player; pays the referral bonus to the new player when a code is given, and owes
    /// the referrer's share as a follow-up command in the referrer's partition.
    Signup {
        user_id: Uuid,
        username: String,
        password_hash: String,
        referral_code: String,
        referred_by_code: Option<String>,
        referral_bonus: i64,
    },
    /// Treasury pays the player `amount` GEMS.
    TopUp { player_id: Uuid, amount: i64 },
    /// A game backend grants the player a bonus of `amount` GEMS from the treasury.
    GrantBonus {
        player_id: Uuid,
        amount: i64,
        reason: String,
    },
    /// Player pays price × quantity GEMS to the treasury and receives quantity of the item.
    Purchase {
        player_id: Uuid,
        item: String,
        quantity: i64,
    },
    /// The giver gives `amount` of `asset` to the receiver: applied in the giver's partition
    /// (to transit), delivered by a `GiftDelivery` follow-up in the receiver's partition.
    Gift {
        giver_id: Uuid,
        receiver_id: Uuid,
        asset: String,
        amount: i64,
    },
    /// Follow-up of a gift: transit pays the receiver.
    GiftDelivery {
        gift_id: Uuid,
        giver_id: Uuid,
        receiver_id: Uuid,
        asset: String,
        amount: i64,
    },
    /// Reverses a journal entry of one player (top-up, bonus, purchase, referral share),
    /// refused when the player no longer holds what it would take back.
    Reverse { player_id: Uuid, journal_id: Uuid },
    /// Follow-up of a signup with a referral code: the treasury pays the referrer.
    ReferrerBonus {
        referrer_id: Uuid,
        referee_id: Uuid,
        amount: i64,
    },
}

impl Command {
    /// The player whose partition applies this command.
    pub fn partition_player(&self) -> Uuid {
        match self {
            Command::Signup { user_id, .. } => *user_id,
            Command::TopUp { player_id, .. }
            | Command::GrantBonus { player_id, .. }
            | Command::Purchase { player_id, .. } => *player_id,
            Command::ReferrerBonus { referrer_id, .. } => *referrer_id,
            Command::Gift { giver_id, .. } => *giver_id,
            Command::GiftDelivery { receiver_id, .. } => *receiver_id,
            Command::Reverse { player_id, .. } => *player_id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Command::Signup { .. } => "signup",
            Command::TopUp { .. } => "top_up",
            Command::GrantBonus { .. } => "bonus",
            Command::Purchase { .. } => "purchase",
            Command::ReferrerBonus { .. } => "referrer_bonus",
            Command::Gift { .. } => "gift",
            Command::GiftDelivery { .. } => "gift_delivery",
            Command::Reverse { .. } => "reversal",
        }
    }
}

/// The worker's answer to one command, sent to the gateway's reply queue.
///
/// `Body` is how the body is held: a `serde_json::Value` where it is built or inspected (the
/// worker, tests), a `Box<RawValue>` where it is only passed on (the gateway, which sends it
/// to the client as it came, without parsing it into a tree and printing it again).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandReply<Body = serde_json::Value> {
    pub command_id: Uuid,
    /// The HTTP status the client gets.
    pub status: u16,
    /// The HTTP body the client gets.
    pub body: Body,
    /// True when this is the stored result of an earlier delivery of the same command.
    pub replay: bool,
}

/// The AMQP message type of a message carrying several replies ([`CommandReplies`]). A message
/// without it carries one [`CommandReply`], addressed by the message's correlation id.
pub const REPLIES_MESSAGE_TYPE: &str = "wallet.command-replies";
/// Version of [`CommandReplies`].
pub const REPLIES_VERSION: u32 = 1;

/// One reply and the correlation id of the request it answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddressedReply<Body = serde_json::Value> {
    pub correlation_id: String,
    pub reply: CommandReply<Body>,
}

/// The replies of one batch to one reply queue, in one message: a batch's commands mostly come
/// from a few gateway channels, and one message per channel costs the broker far less than one
/// per command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandReplies<Body = serde_json::Value> {
    /// See [`REPLIES_VERSION`].
    pub v: u32,
    pub replies: Vec<AddressedReply<Body>>,
}

/// Reads a reply message, batched or single, into (correlation id, reply) pairs, with each body
/// held as `Body` (see [`CommandReply`]).
pub fn decode_replies<Body: serde::de::DeserializeOwned>(
    message_type: Option<&str>,
    correlation_id: Option<&str>,
    data: &[u8],
) -> Result<Vec<(String, CommandReply<Body>)>, String> {
    if message_type == Some(REPLIES_MESSAGE_TYPE) {
        let batch: CommandReplies<Body> =
            serde_json::from_slice(data).map_err(|error| format!("unreadable replies: {error}"))?;
        return Ok(batch
            .replies
            .into_iter()
            .map(|addressed| (addressed.correlation_id, addressed.reply))
            .collect());
    }
    let correlation_id = correlation_id.ok_or("a reply without a correlation id")?;
    let reply: CommandReply<Body> =
        serde_json::from_slice(data).map_err(|error| format!("unreadable reply: {error}"))?;
    Ok(vec![(correlation_id.to_string(), reply)])
}

/// A nudge to the treasury consumer: these hot credits are committed and can be folded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TreasuryMessage {
    pub v: u32,
    pub credit_ids: Vec<i64>,
    /// Request ids of the commands whose postings made these credits, so the treasury's logs
    /// carry the same ids as the gateway's and the worker's. Absent in nudges of older workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

/// The AMQP message type of a message carrying several commands ([`CommandBatch`]). A message
/// without it carries one [`CommandEnvelope`], answered at the message's correlation id.
pub const COMMANDS_MESSAGE_TYPE: &str = "wallet.command-batch";
/// Version of [`CommandBatch`].
pub const COMMANDS_VERSION: u32 = 1;
/// Most commands one message may carry. A worker dead-letters a message with more unread, so
/// no publisher can make it take an unbounded batch.
pub const COMMANDS_PER_MESSAGE_MAX: usize = 1_024;

/// One command of a [`CommandBatch`] and the correlation id its answer goes to. The envelope is
/// kept as raw JSON: the gateway serialises each envelope in its request's task and the batch
/// only joins them, and a worker reads each one on its own, so one unreadable command is
/// dead-lettered without its neighbours.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddressedCommand<'a> {
    #[serde(borrow)]
    pub correlation_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub envelope: &'a serde_json::value::RawValue,
}

/// Several commands for the same partition in one message: the gateway publishes the commands
/// that wait for the same partition together, so the broker stores, delivers and acknowledges
/// one message per group of commands instead of one per command.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommandBatch<'a> {
    /// See [`COMMANDS_VERSION`].
    pub v: u32,
    #[serde(borrow)]
    pub commands: Vec<AddressedCommand<'a>>,
}

/// Encodes the commands of one message for a partition queue: one command as its plain envelope
/// (what every worker version reads), several as a [`CommandBatch`]. Returns the payload and the
/// AMQP message type to set, None for a plain envelope.
pub fn encode_commands(
    commands: Vec<AddressedCommand<'_>>,
) -> serde_json::Result<(Vec<u8>, Option<&'static str>)> {
    match commands.as_slice() {
        [single] => Ok((single.envelope.get().as_bytes().to_vec(), None)),
        _ => {
            let batch = CommandBatch {
                v: COMMANDS_VERSION,
                commands,
            };
            Ok((serde_json::to_vec(&batch)?, Some(COMMANDS_MESSAGE_TYPE)))
        }
    }
}

/// A command read from a message, or why it could not be.
#[derive(Debug, PartialEq)]
pub struct ReceivedCommand {
    /// The correlation id of a batch's command; None for a single-command message, which is
    /// answered at the message's own correlation id.
    pub correlation_id: Option<String>,
    pub command: Result<CommandEnvelope, UnreadableCommand>,
}

/// A command that cannot be applied as it is: it goes to the dead-letter queue.
#[derive(Debug, PartialEq)]
pub struct UnreadableCommand {
    pub reason: String,
    /// Its own bytes when it came in a batch; None when it is the whole message.
    pub raw: Option<String>,
}

/// Reads a message from a partition queue, batched or single, into its commands. Err when the
/// message as a whole cannot be read (a batch that is not one, or one of an unknown version or
/// too large): it goes to the dead-letter queue whole.
pub fn decode_commands(
    message_type: Option<&str>,
    data: &[u8],
) -> Result<Vec<ReceivedCommand>, String> {
    if message_type != Some(COMMANDS_MESSAGE_TYPE) {
        let command =
            decode_command(data).map_err(|reason| UnreadableCommand { reason, raw: None });
        return Ok(vec![ReceivedCommand {
            correlation_id: None,
            command,
        }]);
    }
    let batch: CommandBatch<'_> =
        serde_json::from_slice(data).map_err(|error| format!("undecodable batch: {error}"))?;
    if batch.v != COMMANDS_VERSION {
        return Err(format!("unknown batch version {}", batch.v));
    }
    if batch.commands.len() > COMMANDS_PER_MESSAGE_MAX {
        return Err(format!(
            "a batch of {} commands, over the limit of {COMMANDS_PER_MESSAGE_MAX}",
            batch.commands.len()
        ));
    }
    Ok(batch
        .commands
        .into_iter()
        .map(|addressed| ReceivedCommand {
            command: decode_command(addressed.envelope.get().as_bytes()).map_err(|reason| {
                UnreadableCommand {
                    reason,
                    raw: Some(addressed.envelope.get().to_string()),
                }
            }),
            correlation_id: Some(addressed.correlation_id.into_owned()),
        })
        .collect())
}

/// Decodes a command envelope, telling apart bytes that are not a command at all from a
/// command of a version this build does not know.
pub fn decode_command(bytes: &[u8]) -> Result<CommandEnvelope, String> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly =
        serde_json::from_slice(bytes).map_err(|error| format!("undecodable message: {error}"))?;
    if version.v != COMMAND_VERSION {
        return Err(format!("unknown command version {}", version.v));
    }
    serde_json::from_slice(bytes).map_err(|error| format!("undecodable command: {error}"))
}

#[cfg(test)]
mod tests {
    use super::{
        AddressedCommand, AddressedReply, COMMAND_VERSION, COMMANDS_MESSAGE_TYPE,
        COMMANDS_PER_MESSAGE_MAX, COMMANDS_VERSION, Command, CommandBatch, CommandEnvelope,
        CommandReplies, CommandReply, REPLIES_MESSAGE_TYPE, REPLIES_VERSION, TreasuryMessage,
        decode_commands, decode_replies, encode_commands,
    };
    use uuid::Uuid;

    #[test]
    fn treasury_nudges_carry_request_ids_and_read_old_ones() {
        let nudge = TreasuryMessage {
            v: 1,
            credit_ids: vec![7, 8],
            request_ids: vec!["request-1".to_string()],
        };
        let bytes = serde_json::to_vec(&nudge).expect("encoded");
        assert_eq!(
            serde_json::from_slice::<TreasuryMessage>(&bytes).expect("decoded"),
            nudge
        );
        // A nudge from a worker that predates request ids still folds its credits.
        let old: TreasuryMessage =
            serde_json::from_str(r#"{"v":1,"credit_ids":[3]}"#).expect("decoded");
        assert_eq!(old.credit_ids, vec![3]);
        assert!(old.request_ids.is_empty());
    }

    #[test]
    fn replies_decode_batched_and_single() {
        let reply = |status| CommandReply {
            command_id: Uuid::nil(),
            status,
            body: serde_json::json!({ "ok": true }),
            replay: false,
        };
        let batch = CommandReplies {
            v: REPLIES_VERSION,
            replies: vec![
                AddressedReply {
                    correlation_id: "a".to_string(),
                    reply: reply(200),
                },
                AddressedReply {
                    correlation_id: "b".to_string(),
                    reply: reply(409),
                },
            ],
        };
        let data = serde_json::to_vec(&batch).expect("encoded");
        let decoded = decode_replies(Some(REPLIES_MESSAGE_TYPE), None, &data).expect("decoded");
        assert_eq!(
            decoded,
            vec![("a".to_string(), reply(200)), ("b".to_string(), reply(409))]
        );
        let single = serde_json::to_vec(&reply(200)).expect("encoded");
        assert_eq!(
            decode_replies(None, Some("c"), &single).expect("decoded"),
            vec![("c".to_string(), reply(200))]
        );
        assert!(decode_replies::<serde_json::Value>(None, None, &single).is_err());
        assert!(
            decode_replies::<serde_json::Value>(Some(REPLIES_MESSAGE_TYPE), None, b"not json")
                .is_err()
        );
        // Read with raw bodies (as the gateway does), each body is the very text the worker's
        // serialization of its `Value` wrote, so passing it on sends the client the same bytes.
        let raw: Vec<(String, CommandReply<Box<serde_json::value::RawValue>>)> =
            decode_replies(Some(REPLIES_MESSAGE_TYPE), None, &data).expect("decoded");
        for ((correlation_id, raw_reply), (expected_id, expected)) in raw.iter().zip(&decoded) {
            assert_eq!(correlation_id, expected_id);
            assert_eq!(raw_reply.status, expected.status);
            assert_eq!(
                raw_reply.body.get(),
                serde_json::to_string(&expected.body).expect("encoded")
            );
        }
    }

    fn top_up(amount: i64) -> CommandEnvelope {
        CommandEnvelope {
            v: COMMAND_VERSION,
            id: Uuid::new_v4(),
            principal: "system".to_string(),
            fingerprint: "f".to_string(),
            request_id: None,
            command: Command::TopUp {
                player_id: Uuid::new_v4(),
                amount,
            },
        }
    }

    #[test]
    fn command_batches_decode_each_command_on_its_own() {
        let (first, second) = (top_up(5), top_up(7));
        let raw = |envelope: &CommandEnvelope| serde_json::value::to_raw_value(envelope).unwrap();
        let (first_raw, second_raw) = (raw(&first), raw(&second));
        let unreadable =
            serde_json::value::RawValue::from_string(r#"{"v":1,"id":"not a uuid"}"#.to_string())
                .unwrap();
        let batch = CommandBatch {
            v: COMMANDS_VERSION,
            commands: vec![
                AddressedCommand {
                    correlation_id: "a".into(),
                    envelope: &first_raw,
                },
                AddressedCommand {
                    correlation_id: "b".into(),
                    envelope: &unreadable,
                },
                AddressedCommand {
                    correlation_id: "c".into(),
                    envelope: &second_raw,
                },
            ],
        };
        let data = serde_json::to_vec(&batch).unwrap();
        let decoded = decode_commands(Some(COMMANDS_MESSAGE_TYPE), &data).expect("a batch");
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[0].correlation_id.as_deref(), Some("a"));
        assert_eq!(decoded[0].command.as_ref().unwrap(), &first);
        assert_eq!(decoded[2].command.as_ref().unwrap(), &second);
        let bad = decoded[1].command.as_ref().unwrap_err();
        assert!(bad.reason.starts_with("undecodable command"), "{bad:?}");
        assert_eq!(bad.raw.as_deref(), Some(r#"{"v":1,"id":"not a uuid"}"#));

        // Without the batch type, a message is one command answered at its own correlation id.
        let single = serde_json::to_vec(&first).unwrap();
        let decoded = decode_commands(None, &single).unwrap();
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].correlation_id, None);
        assert_eq!(decoded[0].command.as_ref().unwrap(), &first);
        let decoded = decode_commands(None, b"not json").unwrap();
        assert_eq!(decoded[0].command.as_ref().unwrap_err().raw, None);

        // A batch that cannot be read as a whole is refused whole.
        assert!(decode_commands(Some(COMMANDS_MESSAGE_TYPE), &single).is_err());
        let unknown = r#"{"v":9,"commands":[]}"#;
        assert_eq!(
            decode_commands(Some(COMMANDS_MESSAGE_TYPE), unknown.as_bytes()).unwrap_err(),
            "unknown batch version 9"
        );
        let too_many = CommandBatch {
            v: COMMANDS_VERSION,
            commands: (0..=COMMANDS_PER_MESSAGE_MAX)
                .map(|_| AddressedCommand {
                    correlation_id: "x".into(),
                    envelope: &first_raw,
                })
                .collect(),
        };
        let data = serde_json::to_vec(&too_many).unwrap();
        assert!(
            decode_commands(Some(COMMANDS_MESSAGE_TYPE), &data)
                .unwrap_err()
                .contains("over the limit")
        );
    }

    #[test]
    fn one_command_is_encoded_plain_and_several_as_a_batch() {
        let (first, second) = (top_up(1), top_up(2));
        let raw = |envelope: &CommandEnvelope| serde_json::value::to_raw_value(envelope).unwrap();
        let (first_raw, second_raw) = (raw(&first), raw(&second));
        let addressed = |id: &'static str, envelope| AddressedCommand {
            correlation_id: id.into(),
            envelope,
        };
        let (payload, message_type) =
            encode_commands(vec![addressed("a", &first_raw)]).expect("encoded");
        assert_eq!(message_type, None);
        let decoded = decode_commands(message_type, &payload).unwrap();
        assert_eq!(decoded[0].command.as_ref().unwrap(), &first);

        let (payload, message_type) = encode_commands(vec![
            addressed("a", &first_raw),
            addressed("b", &second_raw),
        ])
        .expect("encoded");
        assert_eq!(message_type, Some(COMMANDS_MESSAGE_TYPE));
        let decoded = decode_commands(message_type, &payload).unwrap();
        let read: Vec<(Option<&str>, &CommandEnvelope)> = decoded
            .iter()
            .map(|received| {
                (
                    received.correlation_id.as_deref(),
                    received.command.as_ref().unwrap(),
                )
            })
            .collect();
        assert_eq!(read, vec![(Some("a"), &first), (Some("b"), &second)]);
    }
}
