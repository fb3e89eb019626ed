//! Treasury nudges, coalesced: one message to the treasury per interval for every batch that
//! committed hot credits in it, instead of one per batch.
//!
//! A nudge is a hint. The credits it names are already committed in `hot_credits`, and the
//! treasury's sweep folds every credit whose nudge never came (`TREASURY_SWEEP_INTERVAL_MS`). So
//! a nudge is published without publisher confirms, a command never waits for one, and a nudge
//! that cannot be queued here (the bound is full) is dropped and counted rather than waited for.
//! Why coalesce: under load a worker commits a few hundred groups a second, and each nudge is a
//! quorum-queue publish, a delivery and an acknowledgement on the broker, which is the busiest
//! process on the machine; the treasury folds them in batches anyway.

use std::time::Duration;

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use shared::broker::{DELIVERY_MODE_PERSISTENT, Topology};
use shared::wire::TreasuryMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Batches' nudges waiting for the next message; past this they are dropped (the sweep folds
/// their credits).
const NUDGES_WAITING_MAX: usize = 1_024;
/// Most credits named in one message, which keeps it far below the broker's message limit.
const NUDGE_CREDITS_MAX: usize = 20_000;

/// The batches' side: hands over the hot credits a committed batch wrote.
#[derive(Clone)]
pub(crate) struct Nudges {
    sender: mpsc::Sender<TreasuryMessage>,
}

impl Nudges {
    /// Starts the task that publishes the nudges on `channel` (without publisher confirms), at
    /// most one message per `interval`. It ends when `stop` is cancelled, when every handle is
    /// dropped, or when a publish fails (the channel is gone).
    pub fn spawn(
        channel: Channel,
        topology: Topology,
        interval: Duration,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(NUDGES_WAITING_MAX);
        let task = tokio::spawn(publish_nudges(receiver, channel, topology, interval, stop));
        (Self { sender }, task)
    }

    /// Asks for the treasury to fold these credits soon. Never waits.
    pub fn send(&self, credit_ids: Vec<i64>, request_ids: Vec<String>) {
        if credit_ids.is_empty() {
            return;
        }
        let nudge = TreasuryMessage {
            v: 1,
            credit_ids,
            request_ids,
        };
        if self.sender.try_send(nudge).is_err() {
            metrics::counter!("wallet_treasury_nudges_dropped_total").increment(1);
        }
    }
}

async fn publish_nudges(
    mut receiver: mpsc::Receiver<TreasuryMessage>,
    channel: Channel,
    topology: Topology,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            first = receiver.recv() => first,
        };
        let Some(mut nudge) = first else {
            return;
        };
        // What other batches commit meanwhile goes in the same message.
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(interval) => {}
        }
        while nudge.credit_ids.len() < NUDGE_CREDITS_MAX {
            let Ok(next) = receiver.try_recv() else {
                break;
            };
            nudge.credit_ids.extend(next.credit_ids);
            nudge.request_ids.extend(next.request_ids);
        }
        if let Err(error) = publish(&channel, &topology, &nudge).await {
            // The channel is gone, and with it the connection: the worker reconnects, and the
            // treasury's sweep folds these credits.
            tracing::warn!(
                error = format!("{error:#}"),
                credits = nudge.credit_ids.len(),
                "could not publish a treasury nudge"
            );
            return;
        }
        metrics::counter!("wallet_treasury_nudges_published_total").increment(1);
    }
}

/// Publishes one nudge on `channel`, which has no publisher confirms: the treasury's sweep folds
/// every credit whose nudge never came (`TREASURY_SWEEP_INTERVAL_MS`), so nothing waits for the
/// broker's disk here.
async fn publish(
    channel: &Channel,
    topology: &Topology,
    nudge: &TreasuryMessage,
) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(nudge)?;
    // Without confirm mode on the channel the returned confirm is already resolved; dropping it
    // keeps nothing in lapin.
    drop(
        channel
            .basic_publish(
                "".into(),
                topology.treasury_queue().as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default()
                    .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                    .with_content_type("application/json".into()),
            )
            .await
            .context("publishing to the treasury")?,
    );
    Ok(())
}
