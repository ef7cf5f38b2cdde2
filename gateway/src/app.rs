//! The state every handler shares, and the one path by which a job enters the system: validate, write
//! the `queued` record, publish with confirm.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use shared::reply::now_ms;
use shared::{JobId, JobRequest};

use crate::auth::Caller;
use crate::broker::Broker;
use crate::config::{FailMode, Settings};
use crate::decision::Decision;
use crate::error::ApiError;
use crate::ratelimit::Limiter;
use crate::store::{CancelOutcome, JobStore, NewJob};
use crate::telemetry as m;
use crate::waiters::Waiters;

pub type AppState = Arc<App>;

pub struct App {
    pub settings: Settings,
    pub store: JobStore,
    pub broker: Arc<Broker>,
    pub waiters: Arc<Waiters>,
    /// The submit class's limiter; submissions are checked in [`App::enqueue`].
    pub submit_limiter: Limiter,
    /// The read class's limiter, applied as a middleware.
    pub read_limiter: Limiter,
    pub metrics: Option<PrometheusHandle>,
    pub openapi: serde_json::Value,
    /// Refuses jobs that cannot fit the model's context.
    pub context: crate::context::ContextCheck,
    /// When this replica started, in Unix seconds (the OpenAI model list's `created`).
    pub started_at_s: u64,
}

/// A job the broker has confirmed.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: JobId,
    pub prompt: String,
    pub submitted_at_ms: u64,
}

impl App {
    /// Validates `request`, checks the submit rate limit and records the job as queued (one atomic Redis
    /// call), then publishes it under `id`. `Ok` means the broker has confirmed the job; the decision, when
    /// Redis gave one, is for the response's `RateLimit-*` headers. On a publish failure the record is
    /// removed and the caller gets 503. When Redis cannot be asked, the submit class's fail mode decides
    /// between 503 and publishing without a record (the replies create it once Redis is back).
    pub async fn enqueue(
        &self,
        id: JobId,
        request: JobRequest,
        caller: &Caller,
    ) -> Result<(Accepted, Option<Decision>), ApiError> {
        let mut job = request.into_valid(&self.settings.prompt_rules)?;
        // Before the rate limiter: a job that cannot run must not spend the client's budget.
        self.context.check(&job)?;
        let submitted_at_ms = now_ms();
        job.submitted_at_ms = Some(submitted_at_ms);
        let body = serde_json::to_vec(&job.to_request()).map_err(|e| ApiError::Internal(e.to_string()))?;
        let parameters =
            serde_json::to_string(&job.parameters).map_err(|e| ApiError::Internal(e.to_string()))?;
        let owner = caller.key.map(|k| k.hex());
        let record = self.store.record(&NewJob {
            id,
            prompt: &job.prompt,
            parameters_json: &parameters,
            owner: owner.as_deref(),
            submitted_at_ms,
        });
        // Not connected, the job cannot be published: refuse before the limiter charges the client for it.
        if !self.broker.connected() {
            return Err(ApiError::unavailable("broker", "not connected"));
        }
        let (decision, admission) = match self.submit_limiter.admit_and_record(caller, &record).await {
            Ok((decision, admission)) if decision.admitted => (Some(decision), Some(admission)),
            Ok((decision, _)) => return Err(ApiError::RateLimited(decision)),
            Err(e) => match self.submit_limiter.on_error() {
                FailMode::Closed => return Err(ApiError::unavailable("rate limiter", e)),
                FailMode::Open => (None, None),
            },
        };
        if let Err(e) = self.broker.publish(id, &body).await {
            metrics::counter!(m::JOBS, "outcome" => "publish_failed").increment(1);
            let store = self.store.clone();
            let limiter = self.submit_limiter.clone();
            let caller = caller.clone();
            tokio::spawn(async move {
                if let Err(e) = store.delete(id).await {
                    tracing::warn!(error = %e, %id, "could not remove the record of an unpublished job");
                }
                if let Some(admission) = admission
                    && let Err(e) = limiter.refund(&caller, &admission).await
                {
                    tracing::warn!(error = %e, %id, "could not give back the admission of an unpublished job");
                }
            });
            return Err(ApiError::unavailable("broker", e));
        }
        metrics::counter!(m::JOBS, "outcome" => "submitted").increment(1);
        let accepted = Accepted {
            id,
            prompt: job.prompt,
            submitted_at_ms,
        };
        Ok((accepted, decision))
    }

    /// Cancels a job wherever it is. The workers are told first (a broadcast every worker reads, see
    /// `shared::control`), so a refusal by the broker changes nothing and the client can retry; then the
    /// record becomes `cancelled`, a final state that a late reply of the worker cannot overwrite.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, ApiError> {
        self.broker
            .publish_cancel(id)
            .await
            .map_err(|e| ApiError::unavailable("broker", e))?;
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
