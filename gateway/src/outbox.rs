//! Jobs whose publish the broker left unconfirmed, kept in Redis until a copy is confirmed.
//!
//! A confirm that times out, or a connection lost after sending, leaves the job's fate unknown: the broker
//! may have it or not. The gateway keeps the job's record and answers 202 (see [`crate::app::App::enqueue`]),
//! so the job must reach the broker for sure. Its body goes into an outbox in Redis, `{ns}:outbox` (a sorted
//! set of job ids by deadline) and `{ns}:outbox:{id}` (the body), that every replica sweeps: a job is
//! republished under its own id until a copy is confirmed, or until its record shows that it left `queued`
//! (the first copy did land), or until its deadline (`--publish-retry-window-s`), when it is marked `failed`
//! with `publish_failed`, a final state the client can see. Kept in Redis and not in the process, a retry
//! survives the gateway that started it: another replica, or the same one restarted, finishes it.
//!
//! Delivery is then at least once: when the first copy did land, the job runs twice, and its record keeps
//! the first end. A short lock per job (`{ns}:outbox:lock:{id}`) keeps replicas from republishing the same
//! job at the same moment.

use std::sync::Arc;
use std::time::Duration;

use shared::reply::{Failed, now_ms};
use shared::{ErrorBody, ErrorCode, JobId, JobReply, Topology};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::kv::RedisError;
use crate::store::{JobStore, Status};
use crate::telemetry as m;

/// How often the outbox is swept.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Jobs republished per sweep at most.
const BATCH: isize = 32;

#[derive(Clone)]
pub struct Outbox {
    store: JobStore,
    topology: Topology,
    window: Duration,
}

impl Outbox {
    pub fn new(store: JobStore, topology: Topology, window: Duration) -> Self {
        Self {
            store,
            topology,
            window,
        }
    }

    fn set_key(&self) -> String {
        self.topology.redis_key("outbox")
    }

    fn body_key(&self, id: JobId) -> String {
        self.topology.redis_key(&format!("outbox:{id}"))
    }

    fn lock_key(&self, id: JobId) -> String {
        self.topology.redis_key(&format!("outbox:lock:{id}"))
    }

    /// Keeps `body` for republishing until the broker confirms it or the retry window ends.
    pub async fn add(&self, id: JobId, body: &[u8]) -> Result<(), RedisError> {
        let deadline = now_ms() + self.window.as_millis() as u64;
        // The body outlives the deadline a little, so the sweep that marks the job failed still finds it.
        let ttl_ms = self.window.as_millis() as u64 + 60_000;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.body_key(id))
            .arg(body)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .zadd(self.set_key(), id.to_string(), deadline)
            .ignore();
        self.store
            .redis()
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// The job ids waiting, with their deadlines (ms).
    pub async fn pending(&self) -> Result<Vec<(JobId, u64)>, RedisError> {
        let key = self.set_key();
        let entries: Vec<(String, u64)> = self
            .store
            .redis()
            .call(|mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(BATCH - 1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, deadline)| id.parse().ok().map(|id| (id, deadline)))
            .collect())
    }

    async fn remove(&self, id: JobId) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.zrem(self.set_key(), id.to_string())
            .ignore()
            .del(self.body_key(id))
            .ignore()
            .del(self.lock_key(id))
            .ignore();
        self.store
            .redis()
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// Takes the job for one attempt; false when another replica holds it.
    async fn claim(&self, id: JobId, hold: Duration) -> Result<bool, RedisError> {
        let key = self.lock_key(id);
        let taken: Option<String> = self
            .store
            .redis()
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(hold.as_millis() as u64)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken.is_some())
    }

    async fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, RedisError> {
        let key = self.body_key(id);
        self.store
            .redis()
            .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// Sweeps the outbox until `cancel`.
    pub async fn run(&self, broker: Arc<Broker>, publish_timeout: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            if !broker.connected() {
                continue;
            }
            let pending = match self.pending().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "outbox unreadable");
                    continue;
                }
            };
            for (id, deadline) in pending {
                if cancel.is_cancelled() {
                    return;
                }
                if let Err(e) = self.attempt(&broker, id, deadline, publish_timeout).await {
                    tracing::debug!(error = %e, %id, "outbox attempt failed");
                }
            }
        }
    }

    /// One republish of one job, unless it is done with or another replica is at it.
    async fn attempt(
        &self,
        broker: &Broker,
        id: JobId,
        deadline: u64,
        publish_timeout: Duration,
    ) -> Result<(), RedisError> {
        if !self.claim(id, publish_timeout + Duration::from_secs(1)).await? {
            return Ok(());
        }
        let status = self.store.get(id).await?.map(|(record, _)| record.status);
        if status.is_some_and(|s| s != Status::Queued) {
            // A copy landed and a worker took it (or the job was cancelled): nothing left to publish.
            return self.remove(id).await;
        }
        let body = self.body(id).await?;
        let published = match &body {
            Some(body) => broker.publish(id, body).await,
            None => Err(crate::broker::BrokerError::Encode("the kept body expired".into())),
        };
        match published {
            Ok(()) => {
                metrics::counter!(m::JOBS, "outcome" => "republished").increment(1);
                tracing::info!(%id, "unconfirmed job republished and confirmed");
                self.remove(id).await
            }
            Err(e) if now_ms() >= deadline => {
                tracing::error!(error = %e, %id, "the broker never confirmed the job; marking it failed");
                let reply = JobReply::Failed(Failed {
                    job_id: Some(id),
                    worker_id: "gateway".to_owned(),
                    error: ErrorBody::new(
                        ErrorCode::PublishFailed,
                        format!(
                            "the broker did not confirm the job within {} s; it may not have run, and a \
                             result from a copy that did reach it is not recorded",
                            self.window.as_secs()
                        ),
                    ),
                    finished_at_ms: now_ms(),
                });
                self.store.apply(&reply).await?;
                self.remove(id).await
            }
            Err(e) => {
                tracing::debug!(error = %e, %id, "republish unconfirmed; retrying");
                // Let the next sweep (of any replica) try again at once.
                let lock = self.lock_key(id);
                self.store
                    .redis()
                    .call(|mut c| async move { redis::cmd("DEL").arg(lock).query_async::<()>(&mut c).await })
                    .await
            }
        }
    }
}
