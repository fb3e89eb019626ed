//! Replies to the gateways, one message per reply queue and batch.
//!
//! A batch's commands come from a few gateway channels, each with its own direct reply-to
//! address; sending their replies as one message per address instead of one per command takes
//! most of the reply traffic off the broker (`shared::wire::CommandReplies`).

use std::collections::HashMap;

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, message::Delivery};
use shared::wire::{
    AddressedReply, CommandReplies, CommandReply, REPLIES_MESSAGE_TYPE, REPLIES_VERSION,
};

/// Where the answer to one delivery goes: its reply queue and correlation id.
#[derive(Debug, Clone)]
pub(crate) struct ReplyTarget {
    reply_to: ShortString,
    correlation_id: String,
}

impl ReplyTarget {
    /// None when nobody waits for an answer (a follow-up, a replayed dead letter).
    pub fn of(delivery: &Delivery) -> Option<Self> {
        let correlation_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::to_string)
            .unwrap_or_default();
        Self::addressed(delivery, correlation_id)
    }

    /// The target of one command of a batch message: the message's reply queue and the
    /// command's own correlation id. None when nobody waits for an answer.
    pub fn addressed(delivery: &Delivery, correlation_id: String) -> Option<Self> {
        Some(Self {
            reply_to: delivery.properties.reply_to().clone()?,
            correlation_id,
        })
    }

    /// Adds the reply queue and correlation id to a message's properties (a dead letter keeps
    /// them, so an operator sees who waited for the command).
    pub fn describe(&self, properties: BasicProperties) -> BasicProperties {
        properties
            .with_reply_to(self.reply_to.clone())
            .with_correlation_id(self.correlation_id.as_str().into())
    }
}

/// The replies of one batch, by reply queue.
#[derive(Default)]
pub(crate) struct ReplyBatch {
    by_queue: HashMap<ShortString, Vec<AddressedReply>>,
}

impl ReplyBatch {
    pub fn push(&mut self, target: Option<&ReplyTarget>, reply: CommandReply) {
        if let Some(target) = target {
            self.by_queue
                .entry(target.reply_to.clone())
                .or_default()
                .push(AddressedReply {
                    correlation_id: target.correlation_id.clone(),
                    reply,
                });
        }
    }

    /// Sends one message per reply queue. Replies are not persisted and their confirms are not
    /// awaited: a gateway that is gone, or a reply that is dropped, loses nothing, since the
    /// result is stored and the client can poll the command's status.
    pub async fn publish(self, channel: &Channel) -> anyhow::Result<()> {
        for (reply_to, replies) in self.by_queue {
            let payload = serde_json::to_vec(&CommandReplies {
                v: REPLIES_VERSION,
                replies,
            })?;
            drop(
                channel
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &payload,
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_type(REPLIES_MESSAGE_TYPE.into()),
                    )
                    .await
                    .context("publishing replies")?,
            );
        }
        Ok(())
    }
}
