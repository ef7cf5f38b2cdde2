//! The RabbitMQ side: two connections, one that publishes (jobs, cancels, queue figures) and one that
//! consumes the replies, kept alive by a supervisor that reconnects with backoff and re-declares the
//! topology; confirm-mode channels that publish jobs; and the queue figures.
//!
//! Two connections because the broker blocks *publishing* connections when it runs short of memory or
//! disk, and then reads nothing more from them: were the replies consumed on the same connection, their
//! acknowledgements would stall with it and the replies that would let the alarm clear would pile up; were
//! the queue figures read on it, `/v1/queue` and every submission's backlog check would hang. So the second
//! connection, which never publishes, consumes the replies and reads the figures. While the publishing
//! connection is blocked, `/readyz` says so and submissions are refused at once (503, `Retry-After`) rather
//! than left waiting for a confirm that cannot come. The broker tells a connection it is blocked only when
//! the connection publishes, so the publishing connection sends a probe every second, a message the broker
//! routes nowhere, and hears of an alarm within a second of it.
//!
//! A 202 must mean the broker has the job, so every publish is `mandatory` and awaits its confirm. A nack, a
//! returned (unroutable) message or a channel closed before sending is a refusal the caller answers with
//! 503; a timeout or a connection lost after sending is *ambiguous* (the broker may have the job), which
//! [`BrokerError::is_ambiguous`] tells, so that the caller keeps the job instead of calling it lost.
//! Confirms are asynchronous in lapin, so one channel carries many publishes in flight; a few channels
//! spread the framing work.
//!
//! `/v1/queue` reads depth and consumers by a passive declare of each lane's queue (`{ns}.jobs`,
//! `{ns}.jobs.batch`): constant time at the broker however many jobs have passed. Concurrent readers share one round trip, and its answer is reused for
//! `queue_stats_cache` at most (5 ms by default); a read that failed is not tried again for
//! [`FAILED_FIGURES_REUSE`], so a broker that does not answer costs the callers one timeout, not one each.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::backoff::Backoff;
use shared::reply::now_ms;
use shared::{JobId, Lane, Topology};
use tokio_util::sync::CancellationToken;

use crate::replies::ReplyConsumer;
use crate::telemetry as m;

/// Why a publish or a broker read failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("the broker refused the job (nack)")]
    Nacked,
    #[error("the broker could not route the job to {0} (returned)")]
    Returned(String),
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("the connection failed after the job was sent, before its confirm: {0}")]
    Unconfirmed(lapin::Error),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("encoding a message failed: {0}")]
    Encode(String),
    #[error("the queue figures could not be read a moment ago: {0}")]
    FiguresUnavailable(String),
}

impl BrokerError {
    /// True when the broker may have the message after all (sent, never confirmed nor refused).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Unconfirmed(_))
    }
}

/// Depth and consumers of the lanes' queues, from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages ready for delivery in every lane (not those a worker holds).
    pub depth: u32,
    /// Workers consuming: those of the interactive queue (every worker consumes every lane).
    pub consumers: u32,
    /// Ready messages of the interactive lane.
    pub interactive: u32,
    /// Ready messages of the batch lane.
    pub batch: u32,
}

impl QueueStats {
    /// Ready messages of `lane`.
    pub fn lane_depth(&self, lane: Lane) -> u32 {
        match lane {
            Lane::Interactive => self.interactive,
            Lane::Batch => self.batch,
        }
    }

    /// Jobs a new job of `lane` waits behind: its lane's, and every higher lane's.
    pub fn ahead_of(&self, lane: Lane) -> u64 {
        crate::deadline::ahead(lane, self.interactive, self.batch)
    }
}

struct Link {
    /// Publishes jobs and cancels.
    conn: Connection,
    publishers: Vec<Channel>,
    /// Never publishes, so an alarm never blocks it: consumes the replies (unless this replica leaves them
    /// to others) and reads the queue figures.
    quiet: Connection,
    stats: Channel,
}

impl Link {
    async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.close(200, "bye".into())).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.quiet.close(200, "bye".into())).await;
    }

    fn healthy(&self) -> bool {
        self.conn.status().connected()
            && self.quiet.status().connected()
            && self.stats.status().connected()
            && self.publishers.iter().all(|c| c.status().connected())
    }
}

/// Settings the broker side needs.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub urls: Arc<shared::brokers::BrokerUrls>,
    pub topology: Topology,
    pub publish_channels: usize,
    pub publish_timeout: Duration,
    pub job_expiration: Option<Duration>,
    pub stats_cache: Duration,
    pub replies_prefetch: u16,
}

/// The connection holder, shared by handlers and the supervisor.
pub struct Broker {
    settings: BrokerSettings,
    link: RwLock<Option<Arc<Link>>>,
    /// Set at the first connection: until then the gateway is still starting (see `/healthz`).
    started: AtomicBool,
    next: AtomicUsize,
    /// The last read of the figures, or its failure, and when.
    stats: tokio::sync::Mutex<Option<(Instant, Result<QueueStats, String>)>>,
}

/// How long a failed read of the queue figures answers for the next callers.
pub const FAILED_FIGURES_REUSE: Duration = Duration::from_secs(1);

/// How often the publishing connection sends its alarm probe.
const PROBE_EVERY: Duration = Duration::from_secs(1);

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Broker {
    pub fn new(settings: BrokerSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            link: RwLock::new(None),
            started: AtomicBool::new(false),
            next: AtomicUsize::new(0),
            stats: tokio::sync::Mutex::new(None),
        })
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.link.read().ok().and_then(|l| l.clone())
    }

    fn set(&self, link: Option<Arc<Link>>) {
        if let Ok(mut slot) = self.link.write() {
            *slot = link;
        }
    }

    /// True while healthy connections are held.
    pub fn connected(&self) -> bool {
        self.current().is_some_and(|l| l.healthy())
    }

    /// True once a connection has been made: the gateway has finished starting.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// True while the broker blocks the publishing connection (a memory or disk alarm): publishes wait
    /// until it lifts or their timeout.
    pub fn blocked(&self) -> bool {
        self.current().is_some_and(|l| l.conn.status().blocked())
    }

    async fn connect(&self) -> Result<Link, lapin::Error> {
        let name = |role: &str| {
            ConnectionProperties::default()
                .with_connection_name(format!("gateway {} {role}", self.settings.topology.namespace()).into())
        };
        let url = self.settings.urls.current();
        let conn = Connection::connect(url, name("publish")).await?;
        let setup = conn.create_channel().await?;
        self.settings.topology.declare(&setup).await?;
        let _ = setup.close(200, "declared".into()).await;
        let mut publishers = Vec::with_capacity(self.settings.publish_channels);
        for _ in 0..self.settings.publish_channels {
            let channel = conn.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            publishers.push(channel);
        }
        let quiet = Connection::connect(url, name("replies and figures")).await?;
        let stats = quiet.create_channel().await?;
        Ok(Link {
            conn,
            publishers,
            quiet,
            stats,
        })
    }

    /// Keeps a connection up until `cancel`: connects, declares, starts the reply consumer, watches the
    /// connection, and on any failure drops it and tries again with exponential backoff.
    /// `replies` is `None` on a replica that leaves the replies to the others (`--consume-replies false`).
    pub async fn supervise(self: Arc<Self>, replies: Option<ReplyConsumer>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let connected = tokio::select! {
                r = self.connect() => r,
                _ = cancel.cancelled() => break,
            };
            match connected {
                Ok(link) => {
                    metrics::counter!(m::BROKER_RECONNECTS).increment(1);
                    tracing::info!(url = %redact(self.settings.urls.current()), "connected to the broker");
                    let link = Arc::new(link);
                    let consumer_channel = match &replies {
                        Some(_) => Some(link.quiet.create_channel().await),
                        None => None,
                    };
                    let consume = async {
                        match (&replies, consumer_channel) {
                            (Some(replies), Some(Ok(channel))) => {
                                replies
                                    .run(channel, self.settings.replies_prefetch, cancel.clone())
                                    .await
                            }
                            (Some(_), Some(Err(e))) => {
                                tracing::warn!(error = %e, "could not open the replies channel")
                            }
                            _ => std::future::pending().await,
                        }
                    };
                    self.set(Some(link.clone()));
                    self.started.store(true, Ordering::Relaxed);
                    metrics::gauge!(m::BROKER_BLOCKED).set(0.0);
                    backoff.reset();
                    // The broker tells a connection of an alarm only once it publishes: a probe a second
                    // (to a queue that does not exist, so the broker drops it) makes the alarm known
                    // within a second, before a job's publish is caught in it.
                    let probe = async {
                        let Ok(channel) = link.conn.create_channel().await else {
                            return std::future::pending().await;
                        };
                        let key = self.settings.topology.alarm_probe_key();
                        let mut tick = tokio::time::interval(PROBE_EVERY);
                        loop {
                            tick.tick().await;
                            if link.conn.status().blocked() {
                                continue;
                            }
                            let publish = channel.basic_publish(
                                "".into(),
                                key.as_str().into(),
                                BasicPublishOptions::default(),
                                b"",
                                BasicProperties::default(),
                            );
                            let _ = tokio::time::timeout(PROBE_EVERY, publish).await;
                        }
                    };
                    let watch = async {
                        let mut events = link.conn.events_listener();
                        let mut tick = tokio::time::interval(Duration::from_millis(250));
                        loop {
                            tokio::select! {
                                event = events.next() => match event {
                                    Some(lapin::Event::Error(e)) => {
                                        tracing::warn!(error = %e, "broker connection error");
                                        return;
                                    }
                                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                                        metrics::gauge!(m::BROKER_BLOCKED).set(1.0);
                                        tracing::warn!(%reason, "the broker blocks publishing (resource alarm)");
                                    }
                                    Some(lapin::Event::ConnectionUnblocked) => {
                                        metrics::gauge!(m::BROKER_BLOCKED).set(0.0);
                                        tracing::info!("the broker accepts publishes again");
                                    }
                                    None => return,
                                    Some(_) => {}
                                },
                                _ = tick.tick() => if !link.healthy() { return },
                            }
                        }
                    };
                    tokio::select! {
                        _ = consume => if !cancel.is_cancelled() {
                            tracing::warn!("reply consumer stopped; reconnecting")
                        },
                        _ = watch => tracing::warn!("broker connection lost; reconnecting"),
                        () = probe => {}
                        _ = cancel.cancelled() => {}
                    }
                    self.set(None);
                    link.close().await;
                    if cancel.is_cancelled() {
                        break;
                    }
                    // The node may be gone: the next attempt goes to the next one (of a cluster's).
                    self.settings.urls.advance();
                }
                Err(e) => {
                    tracing::warn!(error = %e, url = %redact(self.settings.urls.current()), "cannot reach the broker");
                    self.settings.urls.advance();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = cancel.cancelled() => break,
            }
        }
        if let Some(link) = self.current() {
            link.close().await;
        }
        self.set(None);
    }

    /// Publishes a job body to its lane's queue, with its owner's header ([`shared::owner`]) when it has
    /// one, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        id: JobId,
        lane: Lane,
        body: &[u8],
        owner: Option<&str>,
    ) -> Result<(), BrokerError> {
        let link = self.current().ok_or(BrokerError::NotConnected)?;
        let n = self.next.fetch_add(1, Ordering::Relaxed) % link.publishers.len();
        let channel = &link.publishers[n];
        let topology = &self.settings.topology;
        let id_text: ShortString = id.to_string().into();
        let mut props = BasicProperties::default()
            .with_correlation_id(id_text.clone())
            .with_message_id(id_text)
            .with_reply_to(topology.replies_queue().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now_ms() / 1000);
        if let Some(ttl) = self.settings.job_expiration {
            props = props.with_expiration(ttl.as_millis().to_string().into());
        }
        let props = shared::owner::write(props, owner);
        let start = Instant::now();
        self.confirmed(channel, "", &topology.lane_queue(lane), body, props)
            .await?;
        metrics::histogram!(m::PUBLISH_DURATION).record(start.elapsed().as_secs_f64());
        Ok(())
    }

    /// Broadcasts a `job.cancel` on the control exchange (every worker reads it) and waits for the confirm.
    pub async fn publish_cancel(&self, id: JobId) -> Result<(), BrokerError> {
        let link = self.current().ok_or(BrokerError::NotConnected)?;
        let n = self.next.fetch_add(1, Ordering::Relaxed) % link.publishers.len();
        let body = serde_json::to_vec(&shared::control::CancelJob::new(id))
            .map_err(|e| BrokerError::Encode(e.to_string()))?;
        let props = BasicProperties::default()
            .with_type(shared::control::CANCEL_TYPE.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now_ms() / 1000);
        let exchange = self.settings.topology.control_exchange();
        self.confirmed(&link.publishers[n], &exchange, "", &body, props)
            .await
    }

    /// Publishes `mandatory` and waits (up to the publish timeout) for the broker's confirm.
    async fn confirmed(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirmed = tokio::time::timeout(self.settings.publish_timeout, async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?;
            // Sent: from here a failure leaves the broker's answer unknown.
            confirm.await.map_err(BrokerError::Unconfirmed)
        })
        .await
        .map_err(|_| BrokerError::Timeout(self.settings.publish_timeout))??;
        match confirmed {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Returned(format!("{exchange}/{routing_key}"))),
            Confirmation::Nack(_) => Err(BrokerError::Nacked),
            // Cannot happen on a confirm-mode channel; refuse rather than claim the broker has it.
            Confirmation::NotRequested => Err(BrokerError::Nacked),
        }
    }

    /// Depth and consumers of the lanes' queues (passive declares), shared by concurrent callers.
    pub async fn queue_stats(&self) -> Result<QueueStats, BrokerError> {
        self.queue_stats_within(self.settings.stats_cache).await
    }

    /// The same, reusing figures up to `max_age` old (never fresher than the configured cache asks).
    pub async fn queue_stats_within(&self, max_age: Duration) -> Result<QueueStats, BrokerError> {
        let max_age = max_age.max(self.settings.stats_cache);
        let mut cached = self.stats.lock().await;
        match &*cached {
            Some((at, Ok(stats))) if at.elapsed() <= max_age => return Ok(*stats),
            Some((at, Err(e))) if at.elapsed() <= FAILED_FIGURES_REUSE => {
                return Err(BrokerError::FiguresUnavailable(e.clone()));
            }
            _ => {}
        }
        let read = self.read_stats().await;
        *cached = Some((
            Instant::now(),
            read.as_ref().map(|s| *s).map_err(|e| e.to_string()),
        ));
        read
    }

    /// One read of the lanes' depths and consumers.
    async fn read_stats(&self) -> Result<QueueStats, BrokerError> {
        let link = self.current().ok_or(BrokerError::NotConnected)?;
        let declare = |lane: Lane| {
            let queue = self.settings.topology.lane_queue(lane);
            let stats = link.stats.clone();
            async move {
                stats
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
            }
        };
        let (interactive, batch) = tokio::time::timeout(self.settings.publish_timeout, async {
            futures::future::try_join(declare(Lane::Interactive), declare(Lane::Batch)).await
        })
        .await
        .map_err(|_| BrokerError::Timeout(self.settings.publish_timeout))??;
        let stats = QueueStats {
            depth: interactive.message_count().saturating_add(batch.message_count()),
            consumers: interactive.consumer_count(),
            interactive: interactive.message_count(),
            batch: batch.message_count(),
        };
        metrics::gauge!(m::QUEUE_DEPTH).set(f64::from(stats.depth));
        for lane in Lane::ALL {
            metrics::gauge!(m::LANE_DEPTH, "lane" => lane.name()).set(f64::from(stats.lane_depth(lane)));
        }
        metrics::gauge!(m::QUEUE_CONSUMERS).set(f64::from(stats.consumers));
        Ok(stats)
    }
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            super::redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(super::redact("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
