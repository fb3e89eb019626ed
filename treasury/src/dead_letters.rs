//! Archives the dead-letter queue into the `dead_letters` table, where operators list and
//! replay them (`GET /v1/admin/dead-letters`, `POST /v1/admin/dead-letters/{id}/replay`).

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use shared::backoff::Backoff;
use shared::broker::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER, Topology};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Dead letters archived per transaction at most.
const ARCHIVE_BATCH_MAX: u16 = 100;
/// Longest wait for more dead letters once one arrived.
const ARCHIVE_BATCH_WAIT_MS: u64 = 50;

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

pub async fn run_archiver(
    amqp_url: String,
    pool: PgPool,
    topology: Topology,
    retry_backoff_max_ms: u64,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(retry_backoff_max_ms);
    while !shutdown.is_cancelled() {
        match archive(&amqp_url, &pool, &topology, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "dead-letter archiver failed; retrying"
                );
                if !backoff.sleep(&shutdown).await {
                    break;
                }
            }
        }
    }
}

async fn archive(
    amqp_url: &str,
    pool: &PgPool,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let connection = shared::broker::connect(amqp_url, "treasury dead-letter archiver")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology")?;
    // Prefetch one batch: dead letters are rare, there is nothing to pipeline.
    channel
        .basic_qos(ARCHIVE_BATCH_MAX, BasicQosOptions { global: false })
        .await
        .context("setting prefetch")?;
    let mut consumer = channel
        .basic_consume(
            topology.dead_letter_queue().as_str().into(),
            "dead-letter-archiver".into(),
            // Manual acknowledgement after the rows are committed, so a crash re-archives
            // rather than loses a dead letter.
            BasicConsumeOptions {
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
        .context("consuming dead letters")?;
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let Some(first) = first else {
            anyhow::bail!("the dead-letter consumer was cancelled by the broker");
        };
        let mut batch = vec![first.context("receiving a dead letter")?];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ARCHIVE_BATCH_WAIT_MS);
        while batch.len() < usize::from(ARCHIVE_BATCH_MAX) {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery.context("receiving a dead letter")?),
                Ok(None) | Err(_) => break,
            }
        }
        let (mut routing_keys, mut reasons, mut payloads, mut message_ids) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for delivery in &batch {
            let headers = delivery.properties.headers().as_ref();
            routing_keys.push(
                header_text(headers, DEAD_LETTER_SOURCE_HEADER)
                    .unwrap_or_else(|| delivery.routing_key.to_string()),
            );
            reasons.push(
                header_text(headers, DEAD_LETTER_REASON_HEADER)
                    .unwrap_or_else(|| "unknown".to_string()),
            );
            payloads.push(delivery.data.clone());
            message_ids.push(
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(ToString::to_string),
            );
        }
        sqlx::query(
            "INSERT INTO dead_letters (routing_key, reason, payload, message_id)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[])",
        )
        .bind(&routing_keys)
        .bind(&reasons)
        .bind(&payloads)
        .bind(&message_ids)
        .execute(pool)
        .await
        .context("archiving dead letters")?;
        metrics::counter!("wallet_dead_letters_archived_total").increment(batch.len() as u64);
        tracing::warn!(count = batch.len(), "archived dead letters");
        if let Some(last) = batch.last() {
            channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .context("acknowledging dead letters")?;
        }
    }
    shared::broker::close_connection(connection, "archiver stopping").await;
    Ok(())
}
