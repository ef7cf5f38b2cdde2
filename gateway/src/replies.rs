//! The consumer of `{ns}.replies`: every replica consumes the one queue (competing consumers), writes each
//! reply into the job record, and only then acknowledges it, so a reply is never lost between the broker
//! and Redis: if this replica dies first, the broker hands the reply to another.
//!
//! The record write also announces finished jobs on Redis pub/sub (see [`crate::store`]), which is how a
//! `/run` waiting on replica A completes when replica B consumed the reply.

use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use shared::{JobReply, Topology};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::{Appended, JobStore};

/// How long to wait before retrying a record write that Redis refused.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// How long a token chunk that arrived ahead of an earlier one waits for it (they are consumed
/// concurrently, by several replicas); after that it is dropped: the final reply carries the whole text.
const GAP_WAIT: Duration = Duration::from_secs(3);
const GAP_POLL: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct ReplyConsumer {
    store: JobStore,
    topology: Topology,
}

impl ReplyConsumer {
    pub fn new(store: JobStore, topology: Topology) -> Self {
        Self { store, topology }
    }

    /// Consumes until the channel fails or `cancel`; returns so the supervisor can reconnect.
    pub async fn run(&self, channel: Channel, prefetch: u16, cancel: CancellationToken) {
        if let Err(e) = channel.basic_qos(prefetch, BasicQosOptions::default()).await {
            tracing::warn!(error = %e, "basic.qos on the replies channel failed");
            return;
        }
        let queue = self.topology.replies_queue();
        let consumer = match channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, %queue, "cannot consume replies");
                return;
            }
        };
        tracing::info!(%queue, "consuming replies");
        consumer
            .take_until(cancel.cancelled())
            .for_each_concurrent(usize::from(prefetch), |delivery| async {
                match delivery {
                    Ok(delivery) => self.handle(delivery, &cancel).await,
                    Err(e) => tracing::warn!(error = %e, "replies consumer error"),
                }
            })
            .await;
    }

    async fn handle(&self, delivery: Delivery, cancel: &CancellationToken) {
        let reply = match serde_json::from_slice::<JobReply>(&delivery.data) {
            Ok(r) => r,
            Err(e) => {
                // Nobody can use a reply we cannot read; keeping it would block the queue forever.
                tracing::warn!(error = %e, "dropping an unreadable reply");
                metrics::counter!(m::REPLIES_DROPPED).increment(1);
                ack(&delivery).await;
                return;
            }
        };
        if reply.job_id().is_none() {
            tracing::warn!(kind = reply.kind(), "dropping a reply without a job id");
            metrics::counter!(m::REPLIES_DROPPED).increment(1);
            ack(&delivery).await;
            return;
        }
        let gap_deadline = tokio::time::Instant::now() + GAP_WAIT;
        loop {
            let applied = match &reply {
                JobReply::Token(chunk) => self.store.append(chunk).await.map(|appended| match appended {
                    Appended::Gap if tokio::time::Instant::now() < gap_deadline => None,
                    Appended::Gap => {
                        tracing::debug!(job = %chunk.job_id, index = chunk.index, "dropping a token chunk past a gap");
                        Some(false)
                    }
                    other => Some(other == Appended::Added),
                }),
                _ => self.store.apply(&reply).await.map(Some),
            };
            match applied {
                Ok(None) => tokio::time::sleep(GAP_POLL).await,
                Ok(Some(changed)) => {
                    if changed {
                        let outcome = match &reply {
                            JobReply::Started(_) => "started",
                            JobReply::Succeeded(_) => "succeeded",
                            JobReply::Failed(_) => "failed",
                            JobReply::Cancelled(_) => "cancelled",
                            JobReply::Token(_) => "token",
                        };
                        if !matches!(reply, JobReply::Token(_)) {
                            metrics::counter!(m::JOBS, "outcome" => outcome).increment(1);
                        }
                    }
                    ack(&delivery).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, job = ?reply.job_id(), "cannot record a reply; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_DELAY) => {}
                        // Unacked, the reply goes back to the queue when the channel closes.
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "ack of a reply failed; the broker will redeliver it");
    }
}
