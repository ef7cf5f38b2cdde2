//! The consumer of `{ns}.replies`: every replica consumes the one queue (competing consumers), writes each
//! reply into the job record, and only then acknowledges it, so a reply is never lost between the broker
//! and Redis: if this replica dies first, the broker hands the reply to another.
//!
//! One job's replies are applied in the order they came (see [`ReplyConsumer::run`]); across replicas they
//! may still race, which the record's scripts absorb (a final state is never overwritten, a token chunk
//! ahead of an earlier one waits for it).
//!
//! A reply whose record Redis lost is recorded again from the reply (the job's record comes back), with one
//! exception: a `job.started` that waited, held by this replica while it could not reach Redis or by one
//! that went away before applying it (the broker redelivers it). Meanwhile another replica may have
//! recorded the job's end, and Redis may have lost that since; remade from the start, the record would say
//! `running` for good. Left gone, it answers 404 (what a lost record answers) until a later reply of the
//! job, if one comes, makes it again.
//!
//! The record write also announces finished jobs on Redis pub/sub (see [`crate::store`]), which is how a
//! `/run` waiting on replica A completes when replica B consumed the reply.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use shared::{JobReply, Topology};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dead_letters;
use crate::store::{Appended, JobStore};
use crate::telemetry as m;

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
        let dead_queue = self.topology.dead_letter_queue();
        let (Some(consumer), Some(dead)) = (
            consume(&channel, &queue).await,
            consume(&channel, &dead_queue).await,
        ) else {
            return;
        };
        tracing::info!(%queue, dead_letters = %dead_queue, "consuming replies and dead letters");
        let consumer = futures::stream::select(
            consumer.map(|d| (Source::Reply, d)),
            dead.map(|d| (Source::DeadLetter, d)),
        );
        // Replies are handled concurrently, but one job's in order (started, tokens, final): each job's go
        // to one lane, by its correlation id, and a lane takes one reply at a time.
        let lanes = usize::from(prefetch).clamp(1, MAX_LANES);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..lanes)
            .map(|_| mpsc::channel::<(Source, Delivery)>(usize::from(prefetch).max(1)))
            .unzip();
        let cancel = &cancel;
        let channel = &channel;
        let workers = receivers.into_iter().map(|mut rx| async move {
            while let Some((source, delivery)) = rx.recv().await {
                match source {
                    Source::Reply => self.handle(delivery, cancel).await,
                    Source::DeadLetter => self.dead_letter(channel, delivery, cancel).await,
                }
            }
        });
        let dispatch = async move {
            let mut consumer = std::pin::pin!(consumer.take_until(cancel.cancelled()));
            while let Some((source, delivery)) = consumer.next().await {
                match delivery {
                    Ok(delivery) => {
                        let lane = lane(&delivery, lanes);
                        if senders[lane].send((source, delivery)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "replies consumer error"),
                }
            }
        };
        futures::future::join(dispatch, futures::future::join_all(workers)).await;
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
        self.record(&reply, &delivery, cancel).await;
    }

    /// A job the broker gave up on: its record (or, for an AMQP producer's job, its producer) learns why.
    async fn dead_letter(&self, channel: &Channel, delivery: Delivery, cancel: &CancellationToken) {
        let Some((reply, reply_to)) = dead_letters::failure(&delivery) else {
            tracing::warn!("dropping a dead letter without a job id");
            metrics::counter!(m::REPLIES_DROPPED).increment(1);
            ack(&delivery).await;
            return;
        };
        tracing::info!(job = ?reply.job_id(), reply_to = ?reply_to, "a job was dead-lettered");
        // A worker answers the messages it refuses before it rejects them: those need no second answer.
        let answered = matches!(&reply, JobReply::Failed(f) if f.error.code == shared::ErrorCode::Rejected);
        match reply_to {
            Some(to) if to != self.topology.replies_queue() && answered => ack(&delivery).await,
            Some(to) if to != self.topology.replies_queue() => {
                let props = BasicProperties::default()
                    .with_type(reply.kind().into())
                    .with_correlation_id(delivery.properties.correlation_id().clone().unwrap_or_default())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2);
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(e) = channel
                    .basic_publish(
                        "".into(),
                        to.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                {
                    tracing::warn!(error = %e, "could not tell a producer its job was dead-lettered");
                }
                ack(&delivery).await;
            }
            _ => self.record(&reply, &delivery, cancel).await,
        }
    }

    /// Applies one reply to its job's record, retrying while Redis refuses, then acknowledges it.
    async fn record(&self, reply: &JobReply, delivery: &Delivery, cancel: &CancellationToken) {
        let gap_deadline = tokio::time::Instant::now() + GAP_WAIT;
        let owner = shared::owner::read(&delivery.properties);
        // Whether the reply waited: an attempt failed here, or another replica had it and gave it back (the
        // broker redelivers it). Meanwhile the job's later replies may have been recorded, and lost since.
        let mut held = delivery.redelivered;
        loop {
            let applied = match reply {
                JobReply::Token(chunk) => self.store.append(chunk).await.map(|appended| match appended {
                    Appended::Gap if tokio::time::Instant::now() < gap_deadline => None,
                    Appended::Gap => {
                        tracing::debug!(job = %chunk.job_id, index = chunk.index, "dropping a token chunk past a gap");
                        Some(false)
                    }
                    other => Some(other == Appended::Added),
                }),
                JobReply::Started(_) if held => self
                    .store
                    .apply_unless_gone(reply, owner.as_deref())
                    .await
                    .map(|applied| Some(applied.unwrap_or_else(|| left_gone(reply)))),
                _ => self.store.apply(reply, owner.as_deref()).await.map(Some),
            };
            match applied {
                Ok(None) => tokio::time::sleep(GAP_POLL).await,
                Ok(Some(changed)) => {
                    // Token chunks are progress, not outcomes: the jobs counter counts the rest.
                    if changed && !matches!(reply, JobReply::Token(_)) {
                        let outcome = reply.kind().trim_start_matches("job.");
                        metrics::counter!(m::JOBS, "outcome" => outcome).increment(1);
                    }
                    ack(delivery).await;
                    return;
                }
                Err(e) => {
                    held = true;
                    metrics::counter!(m::REPLY_RETRIES).increment(1);
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

/// A start that waited and found its record gone, left so (see the module's doc): changed nothing.
fn left_gone(reply: &JobReply) -> bool {
    tracing::warn!(job = ?reply.job_id(), "a start that waited found its record gone; left gone");
    metrics::counter!(m::REPLIES_STALE).increment(1);
    false
}

/// A consumer of `queue` on `channel`, or `None` (logged) when the broker refuses one.
async fn consume(channel: &Channel, queue: &str) -> Option<lapin::Consumer> {
    let options = BasicConsumeOptions::default();
    match channel
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, %queue, "cannot consume");
            None
        }
    }
}

/// Which queue a delivery came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Reply,
    DeadLetter,
}

/// Lanes at most: enough to keep Redis busy, few enough that a lane's queue stays short.
const MAX_LANES: usize = 32;

/// The lane of a reply: by the job id its correlation id carries (unlabelled ones share lane 0).
fn lane(delivery: &Delivery, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let Some(id) = delivery.properties.correlation_id() else {
        return 0;
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    id.as_str().hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "ack of a reply failed; the broker will redeliver it");
    }
}
