//! Waits on jobs: how a request learns that its job finished (`/run`, non-streamed OpenAI calls) or that its
//! event log grew (event streams), whichever replica consumed the reply.
//!
//! Every replica subscribes to `{ns}:done` and `{ns}:events` (Redis pub/sub), where the record writes
//! publish the job id (a final reply on both, a started or token write on `events`); a local map turns that
//! into wake-ups of the requests waiting on that job, however many. Pub/sub is fire-and-forget: a message
//! published while this replica was not subscribed is lost. So each new subscription wakes every wait to read
//! its job once, and while the subscription is down waits re-read their job every `run_poll_interval`.
//! While it is up, nothing is lost and a wait that hears nothing reads nothing (but a backstop a minute):
//! an idle stream costs Redis nothing while its job does not change. "Up" is checked, not assumed: a
//! subscription only receives, so a connection cut without a reset (a network partition, a Redis host gone)
//! would look up and silent for as long as TCP takes to give up. Every [`PING_EVERY`] the replica pings on
//! it; no answer within [`PING_TIMEOUT`] takes it down and the waits poll until it is back.
//!
//! Open waits are bounded per client and kind ([`Follow`]), so one client cannot hold every connection open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shared::JobId;
use shared::backoff::Backoff;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientId;
use crate::error::ApiError;
use crate::places::{PerKey, Place};

/// What a wait is woken by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// The job's final reply.
    Done,
    /// Any new entry in the job's event log.
    Events,
}

type Registry = Mutex<HashMap<JobId, Vec<(u64, Arc<Notify>)>>>;

/// Jobs being waited for on this replica.
#[derive(Default)]
pub struct Waiters {
    done: Registry,
    events: Registry,
    next: AtomicU64,
    per_client: Arc<PerKey<(Follow, ClientId)>>,
    /// Whether the pub/sub subscription is up: while it is, a notice never goes missing (a lost
    /// connection drops the subscription, and each new one wakes every wait), so waits need no poll.
    live: AtomicBool,
}

/// What a request holds its connection open for, each kind with its own bound per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Follow {
    /// `POST /run`, waiting for its job's end (`--max-run-waits-per-client`).
    Run,
    /// An event stream, or an OpenAI request streaming or waiting for its answer
    /// (`--max-streams-per-client`).
    Stream,
}

impl Follow {
    fn what(self) -> &'static str {
        match self {
            Self::Run => "/run requests",
            Self::Stream => "streams and waiting OpenAI requests",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Stream => "stream",
        }
    }
}

/// Removes the wait from the map when it ends, however it ends.
pub struct Registration {
    waiters: Arc<Waiters>,
    id: JobId,
    interest: Interest,
    key: u64,
    pub notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.waiters.registry(self.interest).lock()
            && let Some(list) = jobs.get_mut(&self.id)
        {
            list.retain(|(k, _)| *k != self.key);
            if list.is_empty() {
                jobs.remove(&self.id);
            }
        }
    }
}

/// One of a client's open-follow slots; released on drop.
pub type Slot = Place<(Follow, ClientId)>;

/// How long a wait sleeps between reads of its job while notices are live: a backstop against a notice
/// lost in a way nobody foresaw, long enough that an idle follower costs Redis next to nothing.
pub const LIVE_BACKSTOP: Duration = Duration::from_secs(60);

/// How often the subscription is pinged, and how long its answer may take before it counts as dead: a
/// silently dead subscription is noticed within their sum.
pub const PING_EVERY: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

impl Waiters {
    /// Takes one of `client`'s `max` slots of `kind`, or refuses with 429 `too_many_waits`.
    pub fn slot(&self, kind: Follow, client: &ClientId, max: usize) -> Result<Slot, ApiError> {
        self.per_client.take(&(kind, client.clone()), max).ok_or_else(|| {
            metrics::counter!(crate::telemetry::FOLLOWS_REFUSED, "kind" => kind.name()).increment(1);
            ApiError::TooManyWaits {
                limit: max,
                what: kind.what(),
            }
        })
    }

    /// How long a wait may sleep before it reads its job again: `poll` while notices may be lost (the
    /// subscription is down), [`LIVE_BACKSTOP`] while they cannot.
    pub fn poll_interval(&self, poll: Duration) -> Duration {
        if self.live.load(Ordering::Acquire) {
            LIVE_BACKSTOP.max(poll)
        } else {
            poll
        }
    }

    /// Wakes every wait on this replica, so each reads its job again: after the subscription came up (a
    /// notice may have been published while it was down) and after it went down (the waits must start
    /// polling).
    fn wake_all(&self) {
        for registry in [&self.done, &self.events] {
            if let Ok(jobs) = registry.lock() {
                for list in jobs.values() {
                    for (_, n) in list {
                        n.notify_one();
                    }
                }
            }
        }
    }

    fn registry(&self, interest: Interest) -> &Registry {
        match interest {
            Interest::Done => &self.done,
            Interest::Events => &self.events,
        }
    }

    /// Registers interest in `id` before the first read of its record, so no notice can slip between.
    pub fn register(self: &Arc<Self>, id: JobId, interest: Interest) -> Registration {
        let notify = Arc::new(Notify::new());
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut jobs) = self.registry(interest).lock() {
            jobs.entry(id).or_default().push((key, notify.clone()));
        }
        Registration {
            waiters: self.clone(),
            id,
            interest,
            key,
            notify,
        }
    }

    fn wake(&self, id: JobId, interest: Interest) {
        let notifies: Vec<Arc<Notify>> = self
            .registry(interest)
            .lock()
            .ok()
            .and_then(|jobs| jobs.get(&id).map(|l| l.iter().map(|(_, n)| n.clone()).collect()))
            .unwrap_or_default();
        for n in notifies {
            // notify_one keeps a permit when the waiter is between reads, so the notice is not lost.
            n.notify_one();
        }
    }

    /// Listens on the done and events channels until `cancel`, resubscribing with backoff after any
    /// failure.
    pub async fn listen(self: Arc<Self>, redis_url: String, channels: Channels, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !cancel.is_cancelled() {
            match self.subscribe_once(&redis_url, &channels, &cancel).await {
                Ok(()) => backoff.reset(),
                Err(e) => tracing::warn!(error = %e, "redis pub/sub for job notices failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = cancel.cancelled() => break,
            }
        }
    }

    async fn subscribe_once(
        &self,
        redis_url: &str,
        channels: &Channels,
        cancel: &CancellationToken,
    ) -> Result<(), redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let mut pubsub = tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out")))??;
        pubsub
            .subscribe(&[channels.done.as_str(), channels.events.as_str()])
            .await?;
        let (mut sink, mut messages) = pubsub.split();
        // From here no notice is missed; one published before is read by the wait that this wakes.
        self.live.store(true, Ordering::Release);
        metrics::gauge!(crate::telemetry::JOB_NOTICES_LIVE).set(1.0);
        self.wake_all();
        let _down = Down(self);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return Err(redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "pub/sub connection did not answer a ping",
                            )));
                        }
                    }
                }
                msg = messages.next() => match msg {
                    Some(msg) => {
                        let interest = if msg.get_channel_name() == channels.done {
                            Interest::Done
                        } else {
                            Interest::Events
                        };
                        if let Ok(id) = msg.get_payload::<String>().map(|p| p.parse::<JobId>())
                            && let Ok(id) = id
                        {
                            self.wake(id, interest);
                        }
                    }
                    None => return Ok(()),
                },
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
}

/// Marks the subscription down however `subscribe_once` leaves, and wakes the waits so they poll.
struct Down<'a>(&'a Waiters);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        self.0.live.store(false, Ordering::Release);
        metrics::gauge!(crate::telemetry::JOB_NOTICES_LIVE).set(0.0);
        self.0.wake_all();
    }
}

/// The pub/sub channels a replica listens on.
#[derive(Debug, Clone)]
pub struct Channels {
    pub done: String,
    pub events: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_its_slots_of_each_kind_and_gets_them_back() {
        let waiters = Arc::new(Waiters::default());
        let client = ClientId::Ip("127.0.0.1".parse().unwrap());
        let a = waiters.slot(Follow::Run, &client, 2).unwrap();
        let _b = waiters.slot(Follow::Run, &client, 2).unwrap();
        assert!(matches!(
            waiters.slot(Follow::Run, &client, 2),
            Err(ApiError::TooManyWaits { limit: 2, .. })
        ));
        assert!(
            waiters.slot(Follow::Stream, &client, 2).is_ok(),
            "streams have their own bound"
        );
        let other = ClientId::Ip("127.0.0.2".parse().unwrap());
        assert!(waiters.slot(Follow::Run, &other, 2).is_ok());
        drop(a);
        assert!(waiters.slot(Follow::Run, &client, 2).is_ok());
    }

    #[tokio::test]
    async fn waits_poll_only_while_the_subscription_is_down_and_are_woken_when_it_changes() {
        let waiters = Arc::new(Waiters::default());
        let poll = Duration::from_millis(100);
        assert_eq!(waiters.poll_interval(poll), poll);
        let wait = waiters.register(JobId::new_random(), Interest::Done);
        waiters.live.store(true, Ordering::Release);
        waiters.wake_all();
        assert_eq!(waiters.poll_interval(poll), LIVE_BACKSTOP);
        tokio::time::timeout(Duration::from_secs(1), wait.notify.notified())
            .await
            .unwrap();
        drop(Down(&waiters));
        assert_eq!(waiters.poll_interval(poll), poll);
        tokio::time::timeout(Duration::from_secs(1), wait.notify.notified())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn every_wait_on_a_job_is_woken_and_a_finished_wait_is_forgotten() {
        let waiters = Arc::new(Waiters::default());
        let id = JobId::new_random();
        let a = waiters.register(id, Interest::Events);
        let b = waiters.register(id, Interest::Events);
        let done = waiters.register(id, Interest::Done);
        waiters.wake(id, Interest::Events);
        // The permit is kept: both waits see the notice even though nobody was awaiting yet.
        tokio::time::timeout(Duration::from_secs(1), a.notify.notified())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), b.notify.notified())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), done.notify.notified())
                .await
                .is_err(),
            "an events notice does not wake a wait for the final reply"
        );
        drop((a, b, done));
        assert!(waiters.events.lock().unwrap().is_empty());
        assert!(waiters.done.lock().unwrap().is_empty());
    }
}
