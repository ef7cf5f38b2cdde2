//! Every job's body, kept in Redis from its admission until the broker confirms a copy: a transactional
//! outbox. This module owns its protocol, every step of it.
//!
//! A gateway writes a job's `queued` record and then publishes the job. Between the two it may die (a
//! crash, a `SIGKILL`, a lost node), and a confirm may time out or its connection drop, leaving the job's
//! fate unknown: the broker may have it or not. Either way the client may hold the job id, so the job must
//! reach the broker for sure. The steps:
//! 1. keep: the body goes into the outbox in the same atomic script that writes the record
//!    ([`crate::admission`], with this module's [`Entry`]): `{ns}:outbox` or `{ns}:outbox:batch` (a sorted
//!    set per lane of job ids by the time a sweep may take them: the set remembers the lane a republish
//!    goes to) and `{ns}:outbox:{id}` (the body);
//! 2. publish ([`Outbox::publish`]): a confirmed publish takes the job out again; one whose fate is
//!    unknown leaves it kept and makes it due at once; one the broker refused for sure withdraws the job,
//!    record and body together, and only then is the client refused;
//! 3. sweep ([`Outbox::run`]), on every replica, and republish what is due.
//!
//! A job becomes due once its first publish has had its chance
//! (`--publish-timeout-ms` and a grace), or at once when that publish was left unconfirmed; a due job is
//! republished under its own id until a copy is confirmed, or until its record shows that it left `queued`
//! (the first copy did land), or until its deadline (`--publish-retry-window-s` after it became due), when
//! it is marked `failed` with `publish_failed`, a final state the client can see. Kept in Redis and not in
//! the process, a retry survives the gateway that started it: another replica, or the same one restarted,
//! finishes it.
//!
//! Delivery is then at least once: when the first copy did land, the job runs twice, and its record keeps
//! the first end. A short lock per job (`{ns}:outbox:lock:{id}`) keeps replicas from republishing the same
//! job at the same moment.

use std::sync::Arc;
use std::time::Duration;

use shared::reply::{Failed, now_ms};
use shared::{ErrorBody, ErrorCode, JobId, JobReply, Lane};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError};
use crate::keys::Keys;
use crate::kv::RedisError;
use crate::store::{JobStore, Status};
use crate::telemetry as m;

/// How often the outbox is swept.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Jobs republished per sweep at most.
const BATCH: isize = 32;
/// How long past its publish timeout a job's first publish has before the sweep may take the job: the
/// gateway that is publishing it either takes it out (confirmed) or makes it due at once (unconfirmed)
/// well within this, unless it died.
const FIRST_PUBLISH_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Outbox {
    store: JobStore,
    keys: Keys,
    window: Duration,
    publish_timeout: Duration,
}

/// Until when the admission script keeps a new job's body (see [`Outbox::entry`]; where: [`Keys::outbox`]
/// and [`Keys::outbox_body`]).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The lane whose queue the job is published to, and so the set that keeps it.
    pub lane: Lane,
    /// When a sweep may first take the job (ms since the epoch).
    pub due_ms: u64,
    /// How long the body is kept (ms).
    pub body_ttl_ms: u64,
}

impl Outbox {
    pub fn new(store: JobStore, keys: Keys, window: Duration, publish_timeout: Duration) -> Self {
        Self {
            store,
            keys,
            window,
            publish_timeout,
        }
    }

    /// The body outlives the deadline a little, so the sweep that marks the job failed still finds it.
    fn body_ttl_ms(&self) -> u64 {
        self.window.as_millis() as u64 + 60_000
    }

    /// The outbox entry of a job about to be admitted and published now, to `lane`.
    pub fn entry(&self, lane: Lane) -> Entry {
        Entry {
            lane,
            due_ms: now_ms() + (self.publish_timeout + FIRST_PUBLISH_GRACE).as_millis() as u64,
            body_ttl_ms: self.body_ttl_ms(),
        }
    }

    /// Publishes an admitted job (kept in the outbox by its admission) and settles its entry by the
    /// broker's answer. `Ok`: the job is taken, confirmed or kept for republishing. `Err`: the broker
    /// refused it for sure and the job is withdrawn, record and body: the client must be told it was not
    /// taken.
    ///
    /// A publish left unconfirmed (a timeout, a connection lost after sending) may have reached the broker:
    /// the record stays and the sweep republishes the job until the broker confirms it (at least once: if
    /// the first copy did land, the job runs twice and its first end is the one kept). So does a refused
    /// job that cannot be withdrawn (Redis failed): its record and body stay, so it will be published.
    pub async fn publish(
        &self,
        broker: &Broker,
        id: JobId,
        lane: Lane,
        body: &[u8],
        owner: Option<&str>,
    ) -> Result<(), BrokerError> {
        match broker.publish(id, lane, body, owner).await {
            Ok(()) => {
                metrics::counter!(m::JOBS, "outcome" => "submitted").increment(1);
                // Off the answer's path: until it lands, the sweep that would take the job finds it
                // started or, still waiting in the queue, publishes a second copy (at least once).
                let outbox = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = outbox.done(id).await {
                        tracing::warn!(error = %e, %id, "could not take a confirmed job out of the outbox");
                    }
                });
                Ok(())
            }
            Err(e) if e.is_ambiguous() => {
                self.keep_unconfirmed(id, lane, body, &e).await;
                Ok(())
            }
            Err(e) => match self.withdraw(id).await {
                Ok(()) => {
                    metrics::counter!(m::JOBS, "outcome" => "publish_failed").increment(1);
                    Err(e)
                }
                Err(redis) => {
                    tracing::warn!(error = %redis, %id, "could not withdraw a refused job; it stays in the outbox");
                    self.keep_unconfirmed(id, lane, body, &e).await;
                    Ok(())
                }
            },
        }
    }

    /// A publish whose fate is unknown: the job's body stays, due at once.
    async fn keep_unconfirmed(&self, id: JobId, lane: Lane, body: &[u8], error: &BrokerError) {
        metrics::counter!(m::JOBS, "outcome" => "unconfirmed").increment(1);
        tracing::warn!(%error, %id, "publish unconfirmed; the job is kept and republished");
        if let Err(e) = self.unconfirmed(id, lane, body).await {
            // The admission kept the body already, due a little later; without Redis then (fail open),
            // nothing will republish this job.
            tracing::error!(error = %e, %id, "could not make an unconfirmed job due for republishing");
        }
    }

    /// Takes the job out: a copy is confirmed, or the job needs none any more.
    async fn done(&self, id: JobId) -> Result<(), RedisError> {
        self.exec(self.forget(id)).await
    }

    /// The commands that take the job's entry out (of whichever lane's set holds it).
    fn forget(&self, id: JobId) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for lane in Lane::ALL {
            pipe.zrem(self.keys.outbox(lane), id.to_string()).ignore();
        }
        pipe.del(self.keys.outbox_body(id))
            .ignore()
            .del(self.keys.outbox_lock(id))
            .ignore();
        pipe
    }

    async fn exec(&self, pipe: redis::Pipeline) -> Result<(), RedisError> {
        self.store
            .redis()
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// The job's publish was left unconfirmed: keep `body` (again: the admission may not have written it,
    /// when Redis failed then) and make it due at once.
    async fn unconfirmed(&self, id: JobId, lane: Lane, body: &[u8]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.keys.outbox_body(id))
            .arg(body)
            .arg("PX")
            .arg(self.body_ttl_ms())
            .ignore()
            .zadd(self.keys.outbox(lane), id.to_string(), now_ms())
            .ignore();
        self.exec(pipe).await
    }

    /// The job will not be published (the broker refused it for sure, or the request it belongs to was
    /// refused before its publish): its record and its entry go together, so that no sweep publishes a job
    /// whose client was told it was not taken.
    pub async fn withdraw(&self, id: JobId) -> Result<(), RedisError> {
        let mut pipe = self.forget(id);
        pipe.del(self.keys.job(id)).ignore();
        self.exec(pipe).await
    }

    /// The job ids of `lane` due now, with their deadlines (ms).
    async fn due(&self, lane: Lane) -> Result<Vec<(JobId, u64)>, RedisError> {
        let key = self.keys.outbox(lane);
        let now = now_ms();
        let entries: Vec<(String, u64)> = self
            .store
            .redis()
            .call(|mut c| async move {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(key)
                    .arg("-inf")
                    .arg(now)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(BATCH)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let window = self.window.as_millis() as u64;
        Ok(entries
            .into_iter()
            .filter_map(|(id, due)| id.parse().ok().map(|id| (id, due + window)))
            .collect())
    }

    /// Takes the job for one attempt; false when another replica holds it.
    async fn claim(&self, id: JobId, hold: Duration) -> Result<bool, RedisError> {
        let key = self.keys.outbox_lock(id);
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
        let key = self.keys.outbox_body(id);
        self.store
            .redis()
            .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// Sweeps the outbox until `cancel`.
    pub async fn run(&self, broker: Arc<Broker>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            // Blocked by an alarm, the broker reads nothing from the publishing connection: the first
            // publish is still there, unread, and lands when the alarm clears; a republish now would only
            // queue a second copy behind it.
            if !broker.connected() || broker.blocked() {
                continue;
            }
            for lane in Lane::ALL {
                let due = match self.due(lane).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox unreadable");
                        continue;
                    }
                };
                for (id, deadline) in due {
                    if cancel.is_cancelled() {
                        return;
                    }
                    if let Err(e) = self.attempt(&broker, id, lane, deadline).await {
                        tracing::debug!(error = %e, %id, "outbox attempt failed");
                    }
                }
            }
        }
    }

    /// One republish of one job, unless it is done with or another replica is at it.
    async fn attempt(&self, broker: &Broker, id: JobId, lane: Lane, deadline: u64) -> Result<(), RedisError> {
        if !self
            .claim(id, self.publish_timeout + Duration::from_secs(1))
            .await?
        {
            return Ok(());
        }
        let record = self.store.get(id).await?.map(|(record, _)| record);
        if record.as_ref().is_some_and(|r| r.status != Status::Queued) {
            // A copy landed and a worker took it (or the job was cancelled): nothing left to publish.
            return self.done(id).await;
        }
        let owner = record.and_then(|r| r.owner);
        let body = self.body(id).await?;
        let published = match &body {
            Some(body) => broker.publish(id, lane, body, owner.as_deref()).await,
            None => Err(BrokerError::Encode("the kept body expired".into())),
        };
        match published {
            Ok(()) => {
                metrics::counter!(m::JOBS, "outcome" => "republished").increment(1);
                tracing::info!(%id, "unconfirmed job republished and confirmed");
                self.done(id).await
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
                self.store.apply(&reply, None).await?;
                self.done(id).await
            }
            Err(e) => {
                tracing::debug!(error = %e, %id, "republish unconfirmed; retrying");
                // Let the next sweep (of any replica) try again at once.
                let mut pipe = redis::pipe();
                pipe.del(self.keys.outbox_lock(id)).ignore();
                self.exec(pipe).await
            }
        }
    }
}
