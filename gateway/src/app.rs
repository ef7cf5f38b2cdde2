//! The state every handler shares, and the one path by which a job enters the system: validate, write
//! the `queued` record, publish with confirm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use shared::reply::now_ms;
use shared::{JobId, JobRequest, Lane, PromptRules};

use crate::admission::{Admissions, Charge, IdempotencyKey, Submission, Verdict};
use crate::auth::Caller;
use crate::broker::{Broker, BrokerError};
use crate::config::{FailMode, Settings};
use crate::decision::Decision;
use crate::drain::DrainRate;
use crate::error::ApiError;
use crate::outbox::Outbox;
use crate::ratelimit::{Limiter, RouteClass};
use crate::store::{CancelOutcome, JobStore, NewJob, Status};
use crate::telemetry as m;
use crate::waiters::Waiters;

pub type AppState = Arc<App>;

pub struct App {
    pub settings: Settings,
    pub store: JobStore,
    pub broker: Arc<Broker>,
    pub waiters: Arc<Waiters>,
    /// Every bound on submissions, checked in [`App::enqueue`].
    pub admissions: Admissions,
    /// How fast the queue drains, for a full queue's `Retry-After`.
    pub drain: Arc<DrainRate>,
    /// Every job's body from its admission until the broker confirms it: publishes, and republishes what
    /// was left unconfirmed.
    pub outbox: Outbox,
    /// The read class's limiter, applied as a middleware.
    pub read_limiter: Limiter,
    pub metrics: Option<PrometheusHandle>,
    pub openapi: serde_json::Value,
    /// Refuses jobs that cannot fit the model's context.
    pub context: crate::context::ContextCheck,
    /// Refuses jobs whose grammar does not compile.
    pub grammars: crate::grammar_check::GrammarCheck,
    /// Token ids as OpenAI's log-probabilities name them.
    pub vocabulary: crate::logprobs::Vocabulary,
    /// The Batch API's files: bodies in the object store, descriptions in Redis.
    pub files: crate::files::FileStore,
    /// The Batch API's batches, their state in Redis.
    pub batches: crate::batches::BatchStore,
    /// When this replica started, in Unix seconds (the OpenAI model list's `created`).
    pub started_at_s: u64,
}

/// How long a cancel the broker refused at once is tried again.
const CANCEL_RETRY_FOR: Duration = Duration::from_secs(3);

/// How old the queue depth checked against `--max-queued-jobs` may be.
const BACKLOG_STALENESS: Duration = Duration::from_millis(250);

/// A job the gateway has taken: the broker confirmed it, or left it unconfirmed and the gateway is
/// republishing it (see [`Outbox::publish`]); or, for a replayed `Idempotency-Key`, the job it names.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: JobId,
    pub prompt: String,
    pub submitted_at_ms: u64,
    /// `queued` for a new job; a replay tells the named job's state now.
    pub status: Status,
    /// True when an `Idempotency-Key` named this earlier job.
    pub replayed: bool,
    /// The lane it was queued in.
    pub lane: Lane,
    /// When it stops being worth starting (ms since the epoch), if it has a deadline.
    pub deadline_ms: Option<u64>,
}

/// A job admitted and not yet published, with what its publish or its withdrawal needs.
struct Admitted {
    accepted: Accepted,
    decision: Option<Decision>,
    /// `None` for a replayed `Idempotency-Key`: nothing to publish or take back.
    pending: Option<Pending>,
}

struct Pending {
    body: String,
    /// What the admission charged; `None` when Redis could not be asked and the fail mode let it through.
    charge: Option<Charge>,
}

impl App {
    /// Validates `request`, its prompt under the route's `rules`, for `lane`'s queue; refuses it when the queue is full; checks the client's bounds and writes the
    /// job's `queued` record in one atomic Redis call ([`crate::admission`]), which also keeps the job's
    /// body in the [`Outbox`]; then publishes it under `id` through the outbox, which settles what the
    /// broker answered ([`Outbox::publish`]). A job the broker refused gets its charges back and a 503.
    /// The decision, when Redis gave one, is for the response's `RateLimit-*` headers.
    ///
    /// When Redis cannot be asked, the submit class's fail mode decides between 503 and publishing without
    /// a record (the replies create it once Redis is back).
    pub async fn enqueue(
        &self,
        id: JobId,
        request: JobRequest,
        rules: &PromptRules,
        caller: &Caller,
        idempotency_key: Option<&str>,
        lane: Lane,
    ) -> Result<(Accepted, Option<Decision>), ApiError> {
        let admitted = self
            .admit(id, request, rules, caller, idempotency_key, lane)
            .await?;
        self.publish(admitted, caller).await
    }

    /// Several jobs of one request (an OpenAI request's `n` choices), admitted whole or not at all: every
    /// job is admitted before any is published, so a refusal of the k-th (a rate limit, the active-jobs
    /// cap, the token budget) withdraws the ones admitted before it, records, outbox entries and charges,
    /// and none of them runs. A broker that refuses a publish part-way (not connected any more) is the
    /// one case where jobs already published are cancelled instead, as a single job would be refused.
    pub async fn enqueue_all(
        &self,
        jobs: Vec<(JobId, JobRequest)>,
        rules: &PromptRules,
        caller: &Caller,
        lane: Lane,
    ) -> Result<Vec<(Accepted, Option<Decision>)>, ApiError> {
        let mut admitted = Vec::with_capacity(jobs.len());
        for (id, request) in jobs {
            match self.admit(id, request, rules, caller, None, lane).await {
                Ok(job) => admitted.push(job),
                Err(e) => {
                    for job in admitted {
                        self.withdraw(job, caller).await;
                    }
                    return Err(e);
                }
            }
        }
        let mut published: Vec<(Accepted, Option<Decision>)> = Vec::with_capacity(admitted.len());
        let mut rest = admitted.into_iter();
        while let Some(job) = rest.next() {
            match self.publish(job, caller).await {
                Ok(done) => published.push(done),
                Err(e) => {
                    for job in rest {
                        self.withdraw(job, caller).await;
                    }
                    for (accepted, _) in &published {
                        if let Err(e) = self.cancel(accepted.id).await {
                            tracing::warn!(error = %e, id = %accepted.id, "could not cancel a job of a refused request");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(published)
    }

    /// Everything [`App::enqueue`] does before the publish: the job validated, bounded, recorded, charged
    /// and kept in the outbox (or, for a replayed `Idempotency-Key`, the earlier job found).
    async fn admit(
        &self,
        id: JobId,
        request: JobRequest,
        rules: &PromptRules,
        caller: &Caller,
        idempotency_key: Option<&str>,
        lane: Lane,
    ) -> Result<Admitted, ApiError> {
        let mut job = request.into_valid(rules)?;
        // Before the rate limiter: a job that cannot run must not spend the client's budget.
        self.context.check(&job).await?;
        self.grammars.check(&job).await?;
        let cost = job.plan.max_new_tokens as u64 * job.plan.decoding.beams() as u64;
        if cost > self.admissions.max_cost() {
            return Err(ApiError::CostOverBudget {
                cost,
                budget: self.admissions.max_cost(),
            });
        }
        // The body without its submission time nor its deadline (both from the clock), so that a
        // resubmission compares equal.
        let idempotency = match idempotency_key {
            Some(key) => {
                let mut timeless = job.to_request();
                timeless.deadline_ms = None;
                let body = serde_json::to_vec(&timeless).map_err(|e| ApiError::Internal(e.to_string()))?;
                Some(IdempotencyKey::new(key, &body))
            }
            None => None,
        };
        let submitted_at_ms = now_ms();
        job.submitted_at_ms = Some(submitted_at_ms);
        let body = serde_json::to_string(&job.to_request()).map_err(|e| ApiError::Internal(e.to_string()))?;
        let parameters =
            serde_json::to_string(&job.parameters).map_err(|e| ApiError::Internal(e.to_string()))?;
        let owner = caller.key.map(|k| k.hex());
        let record = self.store.record(&NewJob {
            prompt: &job.prompt,
            parameters_json: &parameters,
            owner: owner.as_deref(),
            client: &caller.id,
            submitted_at_ms,
            lane,
        });
        // Not connected, the job cannot be published: refuse before the limiter charges the client for it.
        if !self.broker.connected() {
            return Err(ApiError::unavailable("broker", "not connected"));
        }
        // Blocked by a resource alarm, the broker would hold the publish past its timeout, and the job
        // would be kept and run once the alarm clears, however long that takes, while its client, tired of
        // waiting, tries again: refuse now, before anything is written, and say when to retry.
        if self.broker.blocked() {
            metrics::counter!(m::BOUNDED, "bound" => "broker_blocked").increment(1);
            return Err(ApiError::unavailable(
                "broker",
                "publishing is blocked by a resource alarm",
            ));
        }
        self.check_backlog().await?;
        if let Some(deadline_ms) = job.deadline_ms {
            self.check_deadline(lane, submitted_at_ms, deadline_ms).await?;
        }
        let submission = Submission {
            id,
            record: &record,
            cost,
            idempotency,
            body: &body,
            outbox: self.outbox.entry(lane),
        };
        let (decision, charge) = match self.admissions.admit(caller, &submission).await {
            Ok(Verdict::Admitted(decision, charge)) => (Some(decision), Some(charge)),
            Ok(Verdict::Replay(prior)) => {
                let (accepted, decision) = self.replay(prior).await?;
                return Ok(Admitted {
                    accepted,
                    decision,
                    pending: None,
                });
            }
            Ok(refused) => return Err(refusal(refused)),
            Err(e) => {
                crate::ratelimit::failed_check(RouteClass::Submit, self.settings.submit_on_error, &e);
                match self.settings.submit_on_error {
                    // The script writes the record and the outbox entry with the charges: if it may have
                    // run, the outbox publishes the job, and a refusal would send the client to submit it
                    // again while the first one runs. Say what is known instead, and which job.
                    FailMode::Closed if e.may_have_applied() => {
                        tracing::warn!(error = %e, %id, "no answer while admitting a job: it may have been taken");
                        return Err(ApiError::OutcomeUnknown(id));
                    }
                    FailMode::Closed => return Err(ApiError::unavailable("rate limiter", e)),
                    FailMode::Open => (None, None),
                }
            }
        };
        let accepted = Accepted {
            id,
            prompt: job.prompt,
            submitted_at_ms,
            status: Status::Queued,
            replayed: false,
            lane,
            deadline_ms: job.deadline_ms,
        };
        Ok(Admitted {
            accepted,
            decision,
            pending: Some(Pending { body, charge }),
        })
    }

    /// Publishes an admitted job through the outbox ([`Outbox::publish`]); a job the broker refused gets
    /// its charges back and a 503.
    async fn publish(
        &self,
        job: Admitted,
        caller: &Caller,
    ) -> Result<(Accepted, Option<Decision>), ApiError> {
        let Admitted {
            accepted,
            decision,
            pending,
        } = job;
        let Some(Pending { body, charge }) = pending else {
            return Ok((accepted, decision));
        };
        let id = accepted.id;
        if let Err(e) = self
            .outbox
            .publish(
                &self.broker,
                id,
                accepted.lane,
                body.as_bytes(),
                caller.key.map(|k| k.hex()).as_deref(),
            )
            .await
        {
            if let Some(charge) = charge {
                self.refund_later(caller, charge, id);
            }
            return Err(ApiError::unavailable("broker", e));
        }
        Ok((accepted, decision))
    }

    /// Takes back an admitted job that was never published: its record and outbox entry go (so no sweep
    /// publishes it), its charges come back. Should Redis fail here, the job is cancelled instead, so
    /// that the sweep's copy never runs.
    async fn withdraw(&self, job: Admitted, caller: &Caller) {
        let Some(Pending { charge, .. }) = job.pending else {
            return; // a replay: the earlier job is not this request's to take back
        };
        let id = job.accepted.id;
        if let Err(e) = self.outbox.withdraw(id).await {
            tracing::warn!(error = %e, %id, "could not withdraw an unpublished job; cancelling it");
            if let Err(e) = self.cancel(id).await {
                tracing::warn!(error = %e, %id, "could not cancel an unpublished job");
            }
        }
        // Before the refusal is answered, so that the client's retry finds its budget back.
        if let Some(charge) = charge
            && let Err(e) = self.admissions.refund(caller, &charge).await
        {
            tracing::warn!(error = %e, %id, "could not give back the admission of a withdrawn job");
        }
    }

    /// Gives back an admission's charges, off the answer's path.
    fn refund_later(&self, caller: &Caller, charge: Charge, id: JobId) {
        let admissions = self.admissions.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            if let Err(e) = admissions.refund(&caller, &charge).await {
                tracing::warn!(error = %e, %id, "could not give back the admission of an unpublished job");
            }
        });
    }

    /// Refuses a submission while the queue holds `--max-queued-jobs`, advising a retry when the workers,
    /// at the rate they have been taking jobs, will have made room. A broker that cannot be asked bounds
    /// nothing here: the publish that follows will tell. The depth may be [`BACKLOG_STALENESS`] old, so
    /// that a submission does not pay a broker round trip each: a burst can pass the bound by what
    /// arrives in that time, which a bound of thousands of jobs does not notice.
    async fn check_backlog(&self) -> Result<(), ApiError> {
        let bound = self.settings.max_queued_jobs;
        if bound == 0 {
            return Ok(());
        }
        match self.broker.queue_stats_within(BACKLOG_STALENESS).await {
            Ok(stats) if stats.depth >= bound => {
                metrics::counter!(m::BOUNDED, "bound" => "queue_full").increment(1);
                let excess = u64::from(stats.depth - bound) + 1;
                Err(ApiError::QueueFull {
                    bound,
                    retry_after: self.drain.retry_after(excess),
                })
            }
            _ => Ok(()),
        }
    }

    /// Refuses a job whose estimated start in `lane` ([`crate::deadline::estimated_start`]: the jobs ahead of
    /// it at the rate the workers have been taking jobs) is past its deadline, advising a retry when the
    /// jobs ahead will have been taken. No estimate (no rate measured yet, or a broker that cannot be
    /// asked) refuses nothing: the worker still fails the job if its deadline passes in the queue.
    async fn check_deadline(&self, lane: Lane, now_ms: u64, deadline_ms: u64) -> Result<(), ApiError> {
        let Ok(stats) = self.broker.queue_stats_within(BACKLOG_STALENESS).await else {
            return Ok(());
        };
        let ahead = stats.ahead_of(lane);
        let Some(start) = crate::deadline::estimated_start(ahead, self.drain.per_second()) else {
            return Ok(());
        };
        let timeout = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
        if start <= timeout {
            return Ok(());
        }
        metrics::counter!(m::BOUNDED, "bound" => "deadline").increment(1);
        Err(ApiError::DeadlineUnmeetable {
            lane,
            ahead,
            estimated_start: (start != Duration::MAX).then_some(start),
            timeout,
            retry_after: self.drain.retry_after(ahead),
        })
    }

    /// The answer to a replayed `Idempotency-Key`: the job it named, as it is now.
    async fn replay(&self, id: JobId) -> Result<(Accepted, Option<Decision>), ApiError> {
        let (record, _) = self
            .store
            .get(id)
            .await
            .map_err(|e| ApiError::unavailable("redis", e))?
            .ok_or(ApiError::NotFound)?;
        Ok((
            Accepted {
                id,
                prompt: record.prompt,
                submitted_at_ms: record.submitted_at_ms.unwrap_or_default(),
                status: record.status,
                replayed: true,
                lane: record.lane,
                deadline_ms: None,
            },
            None,
        ))
    }

    /// Cancels a job wherever it is. The workers are told first (a broadcast every worker reads, see
    /// `shared::control`), so a refusal by the broker changes nothing and the client can retry; then the
    /// record becomes `cancelled`, a final state that a late reply of the worker cannot overwrite.
    ///
    /// A cancel is idempotent, so one the broker refused at once (returned: right after a broker restart
    /// the cancellations stream takes no messages for a moment; nacked; not connected, while the gateway
    /// reconnects) is tried again for up to [`CANCEL_RETRY_FOR`] before the client gets 503.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, ApiError> {
        let give_up_at = Instant::now() + CANCEL_RETRY_FOR;
        let mut delays = shared::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            match self.broker.publish_cancel(id).await {
                Ok(()) => break,
                Err(e @ (BrokerError::Returned(_) | BrokerError::Nacked | BrokerError::NotConnected))
                    if Instant::now() < give_up_at =>
                {
                    tracing::debug!(error = %e, %id, "cancel refused by the broker; trying again");
                    tokio::time::sleep(delays.next_delay()).await;
                }
                Err(e) => return Err(ApiError::unavailable("broker", e)),
            }
        }
        let outcome = self
            .store
            .cancel(id)
            .await
            .map_err(|e| ApiError::unavailable("redis", e))?;
        if let CancelOutcome::Cancelled { was } = outcome {
            metrics::counter!(m::JOBS, "outcome" => "cancelled").increment(1);
            tracing::info!(%id, ?was, "job cancelled");
        }
        Ok(outcome)
    }
}

/// The error for a submission the admission script refused.
fn refusal(verdict: Verdict) -> ApiError {
    match verdict {
        Verdict::RateLimited(decision) => {
            crate::ratelimit::refused(RouteClass::Submit);
            ApiError::RateLimited(decision)
        }
        Verdict::TooManyActive { limit } => {
            metrics::counter!(m::BOUNDED, "bound" => "active_jobs").increment(1);
            ApiError::TooManyActiveJobs(limit)
        }
        Verdict::TokensSpent { retry_after } => {
            metrics::counter!(m::BOUNDED, "bound" => "tokens").increment(1);
            ApiError::TokensSpent { retry_after }
        }
        Verdict::KeyReused(id) => ApiError::IdempotencyKeyReused(id),
        Verdict::Admitted(..) | Verdict::Replay(_) => {
            ApiError::Internal("an admitted job taken for refused".into())
        }
    }
}
