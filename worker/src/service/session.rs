//! One session with the broker: connect (a consuming and a publishing connection, see `connections`),
//! declare the topology, consume both lanes' queues (`{ns}.jobs` and `{ns}.jobs.batch`, one consumer each
//! on one channel), handle each delivery on its own, and stop cleanly; plus the loop that reconnects with
//! backoff when a connection is lost.
//!
//! Up to `--max-batch-size` jobs are in the engine at once (one place each in the batch, handed out lane by
//! lane: `places`); each is answered and acknowledged when it finishes, whatever the others do. Deliveries
//! beyond that (a prefetch larger than the batch) wait for a place. The batch lane's prefetch is its share
//! of the places, so the broker keeps the rest of a batch backlog for other workers. A job whose deadline
//! has passed when it arrives, or when it gets its place, is answered `deadline_exceeded` and never runs.
//! The loop keeps polling the consumers, so a dropped connection is noticed at once rather than when a job
//! ends, and the shutdown signal, so SIGTERM cancels the consumers at once: the jobs in the engine still
//! finish, those still waiting for a place go back to the queue.
//!
//! The engine's health (`health`) stops the loop the same way, except that the jobs in the engine do not
//! finish: the engine is hung or broken, so they are left unacknowledged, unanswered, to the broker, which
//! gives them to another worker once this one's channel closes; only the answers already decided before
//! the engine was given up on still go out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Consumer};
use shared::backoff::Backoff;
use shared::reply::{Cancelled, Failed, Started, Succeeded, Timings, now_ms};
use shared::{ErrorBody, ErrorCode, JobId, JobReply, Lane};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::args::ServiceConfig;
use super::cancels::Cancels;
use super::connections::{Connections, PublishSide};
use super::error::ServeError;
use super::generator::{EngineThread, EngineThreadError, NewTokens};
use super::health::Unhealthy;
use super::intake::{self, Accepted, Refused};
use super::job::{Input, Outcome};
use super::outcomes::{Outcomes, PendingOutcome};
use super::places::Places;
use super::replies::{PublishError, Publisher};
use super::settlement::{SettleError, Settlement};
use super::stream::TokenStream;

/// The shutdown signal, awaitable from many places.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Why a connection's session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Settle(#[from] SettleError),
    #[error("the broker cancelled the consumer (was the jobs queue deleted?)")]
    ConsumerCancelled,
    /// Not a connection problem: the worker cannot go on.
    #[error(transparent)]
    Engine(#[from] EngineThreadError),
    /// The engine is hung or broken (`health`); its unfinished jobs were left to the broker.
    #[error("the engine is unhealthy: {0}")]
    Unhealthy(Unhealthy),
    /// The queues exist with other arguments (another delivery limit, another queue type): a deployment
    /// mistake that retrying cannot fix.
    #[error(
        "the broker refused the topology ({0}); do every gateway and worker of this namespace use the same \
         --delivery-limit?"
    )]
    Topology(String),
}

impl SessionError {
    /// Errors the worker stops on instead of reconnecting.
    fn is_fatal(&self) -> bool {
        matches!(self, Self::Engine(_) | Self::Topology(_) | Self::Unhealthy(_))
    }
}

/// How `worker serve` reports a session's end: the engine's and the watchdog's reasons as they are, any
/// other (the broker's) as its message.
impl From<SessionError> for ServeError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Engine(e) => Self::Engine(e),
            SessionError::Unhealthy(e) => Self::Unhealthy(e),
            other => Self::Broker(other.to_string()),
        }
    }
}

/// AMQP reply code PRECONDITION_FAILED: a declaration with arguments that differ from the existing queue's.
const PRECONDITION_FAILED: u16 = 406;

/// Jobs remembered across reconnects (see `outcomes`): enough to span one.
const REMEMBERED_JOBS: usize = 256;

pub struct Service {
    config: ServiceConfig,
    engine: EngineThread,
    outcomes: Mutex<Outcomes>,
    /// The running batch's places, interactive jobs first.
    places: Arc<Places>,
    /// Deliveries the broker may hand over unacknowledged: `--prefetch`, else the batch size.
    prefetch: u16,
    cancels: Cancels,
}

impl Service {
    /// A service for `engine`, with one place per sequence its batch holds.
    pub fn new(config: ServiceConfig, engine: EngineThread) -> Self {
        let batch = engine.max_batch_size().max(1);
        let places = Places::new(batch, config.interactive_reserve);
        let remembered = REMEMBERED_JOBS.max(4 * batch);
        let prefetch = config
            .prefetch
            .unwrap_or_else(|| u16::try_from(batch).unwrap_or(u16::MAX));
        Self {
            config,
            engine,
            outcomes: Mutex::new(Outcomes::new(remembered)),
            places,
            prefetch,
            cancels: Cancels::new(Duration::from_secs(shared::topology::CANCEL_RETENTION_SECS)),
        }
    }

    /// Serves until `shutdown`, reconnecting whenever the broker goes away. Returns an error only when
    /// going on is pointless: the engine is gone or unhealthy, or the broker refuses the topology.
    pub async fn run(&self, shutdown: Shutdown) -> Result<(), SessionError> {
        // A tripped engine health stops the session as a shutdown does (see the module's doc for how the
        // two differ), and the worker then exits with the reason.
        let tripped = self.engine.health().tripped();
        let stop: Shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                () = tripped => {}
            }
        }
        .boxed()
        .shared();
        let ended = self.reconnecting(stop).await;
        match self.engine.health().unhealthy() {
            Some(why) => Err(SessionError::Unhealthy(why.clone())),
            None => ended,
        }
    }

    async fn reconnecting(&self, stop: Shutdown) -> Result<(), SessionError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let ended = self.session(stop.clone(), &mut backoff).await;
            let stopping = stop.clone().now_or_never().is_some();
            match ended {
                Ok(()) => return Ok(()),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) if stopping => {
                    warn!(error = %e, "broker connection ended while stopping; unacknowledged jobs return to the queue");
                    return Ok(());
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.clone() => return Ok(()),
                    }
                }
            }
        }
    }

    async fn session(&self, stop: Shutdown, backoff: &mut Backoff) -> Result<(), SessionError> {
        // A connection attempt can hang (an unreachable host) and must not delay a shutdown.
        let brokers = &self.config.brokers;
        let mut connections = tokio::select! {
            connections = Connections::open(brokers.current(), &self.config.worker_id, self.config.heartbeat_s) => match connections {
                Ok(c) => c,
                Err(e) => {
                    // That node may be down: the next attempt goes to the next one (of a cluster's).
                    brokers.advance();
                    return Err(e.into());
                }
            },
            () = stop.clone() => return Ok(()),
        };
        let result = self.consume_on(&mut connections, stop, backoff).await;
        connections.close().await;
        if result.is_err() {
            brokers.advance();
        }
        result
    }

    async fn consume_on(
        &self,
        connections: &mut Connections,
        stop: Shutdown,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let topology = &self.config.topology;
        // The consuming connection: jobs, their acknowledgements, the cancellations. It never publishes, so
        // a broker alarm never blocks it (`connections`).
        let channel = connections.consume.create_channel().await?;
        topology.declare(&channel).await.map_err(|e| match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == PRECONDITION_FAILED => {
                SessionError::Topology(amqp.get_message().to_string())
            }
            _ => SessionError::Amqp(e),
        })?;
        // Per-consumer prefetch: each `basic.qos` applies to the consumers started after it on the channel.
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let replies = connections.publish.create_channel().await?;
        replies.confirm_select(ConfirmSelectOptions::default()).await?;
        let publisher = Publisher {
            channel: &replies,
            timeout: self.config.publish_timeout,
        };
        let tag = format!("{}-{}", self.config.worker_id, channel.id());
        let mut control = self.control_consumer(&connections.consume).await?;
        // Cancels published before this moment must be known before the first job arrives.
        self.catch_up(publisher, &mut control).await?;
        let consumer = channel
            .basic_consume(
                topology.lane_queue(Lane::Interactive).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let batch_prefetch = u16::try_from(self.places.batch_share()).unwrap_or(u16::MAX);
        channel
            .basic_qos(batch_prefetch, BasicQosOptions::default())
            .await?;
        let batch_tag = format!("{tag}-batch");
        let batch_consumer = channel
            .basic_consume(
                topology.lane_queue(Lane::Batch).as_str().into(),
                batch_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        backoff.reset();
        info!(
            queue = %topology.lane_queue(Lane::Interactive),
            batch_queue = %topology.lane_queue(Lane::Batch),
            prefetch = self.prefetch,
            batch_prefetch,
            worker_id = %self.config.worker_id,
            "consuming jobs"
        );
        let feeds = Feeds {
            interactive: consumer,
            batch: batch_consumer,
            tags: [tag, batch_tag],
            control,
            connections,
        };
        self.consume(&channel, publisher, feeds, stop).await?;
        // Closing the channels before the connections lets the broker settle them in order (and keeps
        // lapin from logging the connections' close as an error).
        for ch in [&channel, &replies] {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), ch.close(200, "worker stopping".into())).await;
        }
        Ok(())
    }

    /// Reads the cancellations stream from its start (the retained cancels), then live, on a channel of
    /// its own so a burst of cancels never waits behind jobs.
    async fn control_consumer(&self, connection: &Connection) -> Result<Consumer, SessionError> {
        let channel = connection.create_channel().await?;
        // A stream queue is read with acknowledgements and a prefetch; they pace delivery, nothing more.
        channel.basic_qos(512, BasicQosOptions::default()).await?;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-stream-offset"),
            AMQPValue::LongString(LongString::from("first")),
        );
        let tag = format!("{}-control", self.config.worker_id);
        Ok(channel
            .basic_consume(
                self.config.topology.cancellations_queue().as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?)
    }

    /// Publishes a marker on the control exchange and reads the stream until it comes back: every cancel
    /// published before it has then been read. Bounded, so a slow stream delays jobs, never stops them.
    async fn catch_up(&self, publisher: Publisher<'_>, control: &mut Consumer) -> Result<(), SessionError> {
        let marker = JobId::new_random().to_string();
        let props = lapin::BasicProperties::default()
            .with_type(shared::control::SYNC_TYPE.into())
            .with_message_id(marker.as_str().into())
            .with_timestamp(now_ms() / 1000);
        let exchange = self.config.topology.control_exchange();
        match publisher.confirmed(exchange.as_str(), "", b"{}", props).await {
            Ok(()) => {}
            // Publishing is blocked or refused: there is no marker to wait for; cancels still arrive live.
            Err(e) if e.unconfirmed() => {
                warn!(error = %e, "the cancellations catch-up marker was not published; taking jobs anyway");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let read = async {
            while let Some(delivery) = control.next().await {
                let delivery = delivery?;
                let ours =
                    delivery.properties.message_id().as_ref().map(|m| m.as_str()) == Some(marker.as_str());
                self.on_control(delivery).await;
                if ours {
                    return Ok(());
                }
            }
            Err(SessionError::ConsumerCancelled)
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(result) => result,
            Err(_) => {
                warn!("the cancellations stream did not catch up in 10 s; taking jobs anyway");
                Ok(())
            }
        }
    }

    /// Records one cancel read from the stream (markers and unknown types are skipped).
    async fn on_control(&self, delivery: Delivery) {
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str().to_owned());
        if kind.as_deref() != Some(shared::control::CANCEL_TYPE) {
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                warn!(error = %e, "acknowledging a control message failed");
            }
            return;
        }
        match serde_json::from_slice::<shared::control::CancelJob>(&delivery.data) {
            Ok(cancel) => {
                let at = delivery
                    .properties
                    .timestamp()
                    .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs))
                    .unwrap_or_else(std::time::SystemTime::now);
                self.cancels.cancel(cancel.job_id, at);
            }
            Err(e) => warn!(error = %e, "ignoring an unreadable control message"),
        }
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            warn!(error = %e, "acknowledging a control message failed");
        }
    }

    async fn consume(
        &self,
        channel: &Channel,
        publisher: Publisher<'_>,
        feeds: Feeds<'_>,
        stop: Shutdown,
    ) -> Result<(), SessionError> {
        let Feeds {
            mut interactive,
            mut batch,
            tags,
            mut control,
            connections,
        } = feeds;
        let mut jobs: FuturesUnordered<BoxFuture<'_, Result<(), SessionError>>> = FuturesUnordered::new();
        let mut stopping = false;
        let mut interactive_done = false;
        let mut batch_done = false;
        let mut control_done = false;
        let mut publish_events = true;
        // Once the engine is given up on: until when the answers already decided may still go out (each
        // job publishes at most a `job.started` and its final reply, each bounded by the publish timeout).
        let mut give_up_at: Option<std::time::Instant> = None;
        loop {
            if stopping && jobs.is_empty() {
                return Ok(());
            }
            tokio::select! {
                biased;
                () = stop.clone(), if !stopping => {
                    stopping = true;
                    match self.engine.health().unhealthy() {
                        Some(why) => {
                            warn!(
                                reason = %why,
                                in_hand = jobs.len(),
                                "giving up on the engine: taking no more jobs; those unfinished go back to the queue"
                            );
                            give_up_at = Some(std::time::Instant::now() + 2 * self.config.publish_timeout);
                        }
                        None => info!(in_hand = jobs.len(), "stopping: taking no more jobs"),
                    }
                    for tag in &tags {
                        if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                            warn!(error = %e, "cancelling a consumer failed");
                        }
                    }
                }
                () = sleep_until(give_up_at), if give_up_at.is_some() => {
                    warn!(in_hand = jobs.len(), "answers still unsent are left to the broker");
                    return Ok(());
                }
                Some(done) = jobs.next(), if !jobs.is_empty() => done?,
                event = connections.next_publish_event(), if publish_events => match event {
                    Some(PublishSide::Fine) => {}
                    Some(PublishSide::Lost(e)) => return Err(e.into()),
                    None => publish_events = false,
                },
                next = control.next(), if !control_done => match next {
                    Some(Ok(delivery)) => self.on_control(delivery).await,
                    Some(Err(e)) => return Err(e.into()),
                    None if stopping => control_done = true,
                    None => return Err(SessionError::ConsumerCancelled),
                },
                next = interactive.next(), if !interactive_done => {
                    match self.take(Lane::Interactive, next, stopping, publisher, &stop).await? {
                        Taken::Job(job) => jobs.push(job),
                        Taken::Requeued => {}
                        Taken::Ended => interactive_done = true,
                    }
                }
                next = batch.next(), if !batch_done => {
                    match self.take(Lane::Batch, next, stopping, publisher, &stop).await? {
                        Taken::Job(job) => jobs.push(job),
                        Taken::Requeued => {}
                        Taken::Ended => batch_done = true,
                    }
                }
            }
        }
    }

    /// What one lane's consumer gave: a job to handle, or (while stopping) a delivery returned to the queue,
    /// or the end of the consumer (an error unless stopping).
    async fn take<'s>(
        &'s self,
        lane: Lane,
        next: Option<Result<Delivery, lapin::Error>>,
        stopping: bool,
        publisher: Publisher<'s>,
        stop: &Shutdown,
    ) -> Result<Taken<'s>, SessionError> {
        match next {
            Some(Ok(delivery)) if stopping => {
                let _ = Settlement::new(delivery.acker).requeue().await;
                Ok(Taken::Requeued)
            }
            Some(Ok(delivery)) => Ok(Taken::Job(
                self.handle(publisher, delivery, lane, stop.clone()).boxed(),
            )),
            Some(Err(e)) => Err(e.into()),
            None if stopping => Ok(Taken::Ended),
            None => Err(SessionError::ConsumerCancelled),
        }
    }

    /// One delivery, from inspection to its acknowledgement.
    async fn handle(
        &self,
        publisher: Publisher<'_>,
        delivery: Delivery,
        lane: Lane,
        stop: Shutdown,
    ) -> Result<(), SessionError> {
        let taken_at_ms = now_ms();
        let Delivery {
            properties,
            data,
            acker,
            redelivered,
            ..
        } = delivery;
        let settlement = Settlement::new(acker);
        match intake::inspect(&properties, &data, &self.config.rules) {
            Ok(job) => {
                let arrival = Arrival {
                    lane,
                    redelivered,
                    taken_at_ms,
                };
                self.run_job(publisher, job, arrival, settlement, stop).await
            }
            Err(refused) => {
                let owner = shared::owner::read(&properties);
                self.refuse(publisher, refused, owner.as_deref(), settlement)
                    .await
            }
        }
    }

    /// Answers an unprocessable message with `job.failed` (when it says where) and dead-letters it.
    async fn refuse(
        &self,
        publisher: Publisher<'_>,
        refused: Refused,
        owner: Option<&str>,
        settlement: Settlement,
    ) -> Result<(), SessionError> {
        warn!(
            correlation_id = refused.correlation_id.as_deref().unwrap_or("-"),
            code = ?refused.error.code,
            reason = %refused.error.message,
            "refusing a message; it goes to the dead-letter queue"
        );
        if let Some(reply_to) = &refused.reply_to {
            let reply = JobReply::Failed(Failed {
                job_id: refused.id,
                worker_id: self.config.worker_id.clone(),
                error: refused.error.clone(),
                finished_at_ms: now_ms(),
            });
            match publisher
                .publish(reply_to, refused.correlation_id.as_deref(), owner, &reply)
                .await
            {
                // The message is dead-lettered either way; the producer learns nothing more by a retry.
                Err(e) if e.unconfirmed() => {
                    warn!(error = %e, "the failure reply was not confirmed")
                }
                other => other?,
            }
        }
        settlement.dead_letter().await?;
        Ok(())
    }

    async fn run_job(
        &self,
        publisher: Publisher<'_>,
        accepted: Accepted,
        arrival: Arrival,
        settlement: Settlement,
        stop: Shutdown,
    ) -> Result<(), SessionError> {
        let Accepted {
            id,
            reply_to,
            owner,
            job,
        } = accepted;
        let Arrival {
            lane,
            redelivered,
            taken_at_ms,
        } = arrival;
        let to = Destination {
            publisher,
            reply_to: &reply_to,
            id,
            correlation_id: id.to_string(),
            owner: owner.as_deref(),
        };
        let watch = self.cancels.watch(id);
        let input = match &job.messages {
            Some(messages) => Input::Chat(messages.clone()),
            None => Input::Text(job.prompt.clone()),
        };
        let plan = self.engine.plan(&input, &job.plan);
        let seen = self.remembered().get(&id);
        let mut engine_job = None;
        let mut prompt_tokens = None;
        let (joined, remembered) = match seen {
            Some(remembered) => {
                info!(job = %id, "job seen before; answering from its earlier generation");
                (None, remembered)
            }
            None => {
                // A job past its deadline is not worth a place: answered at once, never run.
                if job.expired_at(now_ms()) {
                    return self.answer(&to, self.deadline_reply(id, &job), settlement).await;
                }
                // A place in the batch first; a stop before one frees up returns the job to the queue (a
                // shutdown requeues it; a given-up engine leaves it to the channel's close, after the consumer
                // is cancelled, so that it cannot come straight back here), and a cancel skips the job.
                let permit = tokio::select! {
                    biased;
                    () = watch.token.cancelled() => {
                        info!(job = %id, "job cancelled before it ran");
                        let reply = self.cancelled_reply(id, 0);
                        return self.answer(&to, reply, settlement).await;
                    }
                    permit = self.places.acquire(lane) => permit,
                    () = stop => {
                        if self.engine.health().unhealthy().is_none() {
                            settlement.requeue().await?;
                        }
                        return Ok(());
                    }
                };
                // Its deadline may have passed while it waited for the place.
                if job.expired_at(now_ms()) {
                    drop(permit);
                    return self.answer(&to, self.deadline_reply(id, &job), settlement).await;
                }
                let submitted = self.engine.submit(input.clone(), plan.clone(), lane).await?;
                let remembered = self.remembered().insert(id, submitted.outcome);
                // The place is freed when the engine is done with the job, whoever awaits it (or nobody:
                // the connection may be gone by then).
                let done = remembered.outcome.clone();
                tokio::spawn(async move {
                    let _ = done.await;
                    drop(permit);
                });
                prompt_tokens = submitted.prompt_tokens;
                engine_job = Some((submitted.key, submitted.tokens));
                (Some(submitted.joined), remembered)
            }
        };
        // From here on, a given-up engine ends the wait for the outcome (a hung one would never give it).
        let pending = unless_given_up(remembered.outcome, self.engine.health().tripped());
        // `job.started` goes out when the job joins the running batch (or at once when it is answered from
        // memory, or refused before joining).
        let batch_size = match joined {
            Some(joined) => joined_or_done(joined, pending.clone()).await,
            None => None,
        };
        if let Some(None) = pending.clone().now_or_never() {
            return self.left_to_the_broker(id, settlement);
        }
        let started = JobReply::Started(Started {
            job_id: id,
            worker_id: self.config.worker_id.clone(),
            // Answered from memory, the same start as the first time.
            started_at_ms: *remembered.started_at_ms.get_or_init(now_ms),
            redelivered,
            prompt_tokens: prompt_tokens.map(|n| n as u32),
        });
        match to.publish(&started).await {
            // Progress news only: the job goes on without it.
            Err(e) if e.unconfirmed() => {
                warn!(job = %id, error = %e, "the job.started reply was not confirmed")
            }
            other => other?,
        }
        info!(job = %id, redelivered, batch_size, "job started");

        let (outcome, generated) = match engine_job {
            Some((key, tokens)) => {
                let stream = TokenStream::new(self.engine.detokenizer(), &plan.stop, self.config.stream);
                self.follow(&to, key, tokens, stream, &watch, pending).await?
            }
            None => (pending.await, 0),
        };
        let Some(outcome) = outcome else {
            return self.left_to_the_broker(id, settlement);
        };
        let worker_id = self.config.worker_id.clone();
        let reply = match outcome {
            Err(error) if error.code == ErrorCode::Cancelled => self.cancelled_reply(id, generated),
            Ok(c) => JobReply::Succeeded(Succeeded {
                job_id: id,
                worker_id,
                prompt: c.prompt.unwrap_or(job.prompt),
                new_tokens: c.generation.token_ids.len() as u32,
                prompt_tokens: Some(c.generation.prompt_tokens as u32),
                text: c.generation.text,
                token_ids: c.generation.token_ids,
                finish_reason: c.generation.finish_reason,
                timings: Timings {
                    queued_ms: job.submitted_at_ms.map(|t| taken_at_ms.saturating_sub(t)),
                    prefill_ms: c.generation.prefill_ms,
                    decode_ms: c.generation.decode_ms,
                    inference_ms: c.inference_ms,
                    time_to_first_token_ms: Some(c.time_to_first_token_ms),
                },
                batch_size: Some(c.batch_size as u32),
                logprobs: c.generation.logprobs,
                prompt_logprobs: c.generation.prompt_logprobs,
                finished_at_ms: now_ms(),
            }),
            Err(error) => JobReply::Failed(Failed {
                job_id: Some(id),
                worker_id,
                error,
                finished_at_ms: now_ms(),
            }),
        };
        self.answer(&to, reply, settlement).await
    }

    /// Streams the job's tokens as `job.token` replies until the engine is done with it, and takes it out of
    /// the batch when its cancel arrives. Returns the outcome and the tokens generated.
    async fn follow(
        &self,
        to: &Destination<'_>,
        key: u64,
        mut tokens: mpsc::UnboundedReceiver<NewTokens>,
        mut stream: TokenStream,
        watch: &super::cancels::Watch,
        pending: PendingOutcome,
    ) -> Result<(Option<Outcome>, usize), SessionError> {
        let id = to.id;
        let mut pending = std::pin::pin!(pending);
        let mut cancel_sent = false;
        let mut tokens_open = true;
        loop {
            let deadline = stream.deadline();
            tokio::select! {
                biased;
                outcome = &mut pending => {
                    while let Ok(new) = tokens.try_recv() {
                        stream.push(&new.ids, new.logprobs.as_deref());
                    }
                    return Ok((outcome, stream.tokens()));
                }
                () = watch.token.cancelled(), if !cancel_sent => {
                    info!(job = %id, "cancel received; the job leaves the batch");
                    self.engine.cancel(key);
                    cancel_sent = true;
                }
                new = tokens.recv(), if tokens_open => match new {
                    Some(new) => stream.push(&new.ids, new.logprobs.as_deref()),
                    None => tokens_open = false,
                },
                () = sleep_until(deadline), if deadline.is_some() => {}
            }
            if cancel_sent || !stream.due(std::time::Instant::now()) {
                continue;
            }
            if let Some(chunk) = stream.take(id) {
                match to.publish(&JobReply::Token(chunk.clone())).await {
                    Ok(()) => {}
                    // Progress news only: the next chunk carries it again, the final reply has it all.
                    Err(e) if e.unconfirmed() => stream.unsend(&chunk),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// The answer to a job whose deadline passed before it could start.
    fn deadline_reply(&self, id: JobId, job: &shared::ValidJob) -> JobReply {
        let deadline_ms = job.deadline_ms.unwrap_or_default();
        let now = now_ms();
        info!(job = %id, late_ms = now.saturating_sub(deadline_ms), "deadline passed before the job started; not running it");
        super::metrics::deadline_exceeded();
        JobReply::Failed(Failed {
            job_id: Some(id),
            worker_id: self.config.worker_id.clone(),
            error: ErrorBody::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "the job's deadline ({deadline_ms} ms since the epoch) passed {} ms before a worker could \
                     start it; it did not run",
                    now.saturating_sub(deadline_ms)
                ),
            ),
            finished_at_ms: now,
        })
    }

    fn cancelled_reply(&self, id: JobId, generated: usize) -> JobReply {
        JobReply::Cancelled(Cancelled {
            job_id: id,
            worker_id: self.config.worker_id.clone(),
            new_tokens: generated as u32,
            finished_at_ms: now_ms(),
        })
    }

    /// Publishes the job's final reply, then acknowledges it.
    async fn answer(
        &self,
        to: &Destination<'_>,
        reply: JobReply,
        settlement: Settlement,
    ) -> Result<(), SessionError> {
        let id = to.id;
        // The reply must be safely with the broker before the job is let go: a crash between the two
        // leaves the job to be redelivered, never a job acknowledged and unanswered.
        match to.publish(&reply).await {
            Ok(()) => {}
            // The broker would not take the reply (say, the reply queue is full and refuses publishes).
            // Returned to the queue, the job comes back after a pause and is answered from memory; if
            // the refusal lasts, the delivery limit dead-letters it.
            Err(PublishError::Nacked) => {
                warn!(job = %id, "the broker refused the final reply; returning the job to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                settlement.requeue().await?;
                return Ok(());
            }
            // Not confirmed in time (a broker alarm blocks publishing): the reply may or may not have
            // reached its queue. Not acknowledged, the job comes back (answered from memory here, or
            // generated again elsewhere): answered twice at worst, never acknowledged unanswered. The
            // wait already paced this, so no pause is added.
            Err(e @ PublishError::Timeout(_)) => {
                warn!(job = %id, error = %e, "the final reply was not confirmed; returning the job to the queue");
                settlement.requeue().await?;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        settlement.ack().await?;
        info!(job = %id, event = reply.kind(), "job done");
        Ok(())
    }

    /// A job that ended without an outcome. With the engine given up on, it is left unacknowledged and
    /// unanswered: the broker gives it to another worker when this one's channel closes (after the consumer
    /// is cancelled, so it does not come back here). Otherwise the engine thread is gone.
    fn left_to_the_broker(&self, id: JobId, settlement: Settlement) -> Result<(), SessionError> {
        if self.engine.health().unhealthy().is_none() {
            return Err(EngineThreadError::Gone.into());
        }
        info!(job = %id, "the engine was given up on; the job goes back to the queue unanswered");
        drop(settlement);
        Ok(())
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        // Never held across an await, and nothing panics while holding it; a poisoned lock still holds
        // valid data.
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one session's consume loop reads: each lane's jobs, the cancellations, and the connections' news.
struct Feeds<'c> {
    interactive: Consumer,
    batch: Consumer,
    /// The two job consumers' tags, to cancel them.
    tags: [String; 2],
    control: Consumer,
    connections: &'c mut Connections,
}

/// What a lane's consumer gave the consume loop.
enum Taken<'s> {
    Job(BoxFuture<'s, Result<(), SessionError>>),
    /// Returned to the queue: the worker is stopping.
    Requeued,
    /// The consumer ended (cancelled while stopping).
    Ended,
}

/// How a job came: from which lane, whether the broker delivered it before, and when this worker took it.
struct Arrival {
    lane: Lane,
    redelivered: bool,
    taken_at_ms: u64,
}

/// Where a job's replies go: its `reply_to` queue, under its job id as the correlation id.
struct Destination<'a> {
    publisher: Publisher<'a>,
    reply_to: &'a str,
    id: JobId,
    correlation_id: String,
    /// The job's owner header, copied onto every reply ([`shared::owner`]).
    owner: Option<&'a str>,
}

impl Destination<'_> {
    async fn publish(&self, reply: &JobReply) -> Result<(), PublishError> {
        self.publisher
            .publish(self.reply_to, Some(&self.correlation_id), self.owner, reply)
            .await
    }
}

/// The job's outcome, or `None` as soon as the engine is given up on, whichever comes first; an outcome the
/// engine handed out before it was given up on wins (it is answered).
fn unless_given_up(
    pending: PendingOutcome,
    tripped: tokio_util::sync::WaitForCancellationFutureOwned,
) -> PendingOutcome {
    async move {
        tokio::select! {
            biased;
            outcome = pending => outcome,
            () = tripped => None,
        }
    }
    .boxed()
    .shared()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Waits until the job joins the batch (its batch size then) or finishes without joining (`None`).
async fn joined_or_done(joined: oneshot::Receiver<usize>, done: PendingOutcome) -> Option<usize> {
    tokio::select! {
        biased;
        size = joined => size.ok(),
        _ = done => None,
    }
}
