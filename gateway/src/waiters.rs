//! Waits on jobs: how a request learns that its job finished (`/run`, non-streamed OpenAI calls) or that its
//! event log grew (event streams), whichever replica consumed the reply.
//!
//! Every replica subscribes to `{ns}:done` and `{ns}:events` (Redis pub/sub), where the record writes
//! publish the job id (a final reply on both, a started or token write on `events`); a local map turns that
//! into wake-ups of the requests waiting on that job, however many. Pub/sub is fire-and-forget (a message
//! published while this replica was reconnecting is lost), so a wait also re-reads the record every
//! `run_poll_interval`: the notice makes it fast, the poll makes it certain.
//!
//! Open waits are bounded per client, so one client cannot hold every connection open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shared::JobId;
use shared::backoff::Backoff;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientId;

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
    per_client: Mutex<HashMap<ClientId, usize>>,
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

/// One of a client's open-wait slots; released on drop.
pub struct Slot<'a> {
    waiters: &'a Waiters,
    client: ClientId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.waiters.per_client.lock()
            && let Some(n) = map.get_mut(&self.client)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

impl Waiters {
    /// Takes one of `client`'s `max` slots, or `None` when all are in use.
    pub fn slot(&self, client: &ClientId, max: usize) -> Option<Slot<'_>> {
        let mut map = self.per_client.lock().ok()?;
        let n = map.entry(client.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            waiters: self,
            client: client.clone(),
        })
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
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
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
    fn a_client_gets_at_most_its_slots_and_gets_them_back() {
        let waiters = Waiters::default();
        let client = ClientId::Ip("127.0.0.1".parse().unwrap());
        let a = waiters.slot(&client, 2).unwrap();
        let _b = waiters.slot(&client, 2).unwrap();
        assert!(waiters.slot(&client, 2).is_none());
        let other = ClientId::Ip("127.0.0.2".parse().unwrap());
        assert!(waiters.slot(&other, 2).is_some());
        drop(a);
        assert!(waiters.slot(&client, 2).is_some());
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
