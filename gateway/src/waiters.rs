//! `/run` waits: how a request learns that its job finished, whichever replica consumed the reply.
//!
//! Every replica subscribes to `{ns}:done` (Redis pub/sub), where the record write of a final reply
//! publishes the job id; a local map turns that into a wake-up of the waiting request. Pub/sub is
//! fire-and-forget (a message published while this replica was reconnecting is lost), so a wait also
//! re-reads the record every `run_poll_interval`: the notice makes it fast, the poll makes it certain.
//!
//! Open waits are bounded per client, so one client cannot hold every connection open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use shared::JobId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientId;

/// Jobs being waited for on this replica.
#[derive(Default)]
pub struct Waiters {
    jobs: Mutex<HashMap<JobId, Arc<Notify>>>,
    per_client: Mutex<HashMap<ClientId, usize>>,
}

/// Removes the job from the map when the wait ends, however it ends.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    id: JobId,
    pub notify: Arc<Notify>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.waiters.jobs.lock() {
            jobs.remove(&self.id);
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

    /// Registers interest in `id` before the first read of its record, so no notice can slip between.
    pub fn register(&self, id: JobId) -> Registration<'_> {
        let notify = Arc::new(Notify::new());
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(id, notify.clone());
        }
        Registration {
            waiters: self,
            id,
            notify,
        }
    }

    fn wake(&self, id: JobId) {
        let notify = self.jobs.lock().ok().and_then(|jobs| jobs.get(&id).cloned());
        if let Some(n) = notify {
            // notify_one keeps a permit when the waiter is between reads, so the notice is not lost.
            n.notify_one();
        }
    }

    /// Listens on the done channel until `cancel`, resubscribing with backoff after any failure.
    pub async fn listen(self: Arc<Self>, redis_url: String, channel: String, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match self.subscribe_once(&redis_url, &channel, &cancel).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, "redis pub/sub for /run completions failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe_once(
        &self,
        redis_url: &str,
        channel: &str,
        cancel: &CancellationToken,
    ) -> Result<(), redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let mut pubsub = tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub())
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connect timed out")))??;
        pubsub.subscribe(channel).await?;
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => {
                        if let Ok(id) = msg.get_payload::<String>().map(|p| p.parse::<JobId>())
                            && let Ok(id) = id
                        {
                            self.wake(id);
                        }
                    }
                    None => return Ok(()),
                },
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
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
}
