//! `POST /v1/jobs` (submit, 202), `GET /v1/jobs/{id}` (poll) and `DELETE /v1/jobs/{id}` (cancel).

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use shared::job::OLDEST_JOB_SCHEMA_VERSION;
use shared::{GenerationParameters, JobId, JobRequest, Lane};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorResponse};
use crate::position::QueuePosition;
use crate::store::{CancelOutcome, Figures, JobRecord, Status};

fn default_version() -> u32 {
    OLDEST_JOB_SCHEMA_VERSION
}

/// A job as clients submit it over HTTP: the AMQP job body without `submitted_at_ms` (the gateway sets
/// it), and `version` optional.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Body version, 1 to 3 (the gateway publishes the version the job needs); 1 when absent.
    #[serde(default = "default_version")]
    #[schema(minimum = 1, maximum = 3)]
    pub version: u32,
    /// The prompt, taken as written: control characters other than tab, newline and carriage return are
    /// removed, and its tokens plus `max_new_tokens` must fit the model's context (a gateway run with
    /// `--prompt-policy clean` cleans it as `/run` does instead). Give `prompt` or `messages`.
    #[serde(default)]
    pub prompt: String,
    /// A conversation instead of a prompt (`[{"role": "system"|"user"|"assistant", "content": "..."}]`):
    /// each content goes through the prompt's rules (any length limits apply to the contents together),
    /// and the worker renders it with its model's chat template.
    #[serde(default)]
    #[schema(schema_with = crate::contract_schema::optional_chat_messages)]
    pub messages: Option<Vec<shared::chat::ChatMessage>>,
    /// Generation parameters (TGI names), all optional; see the `GenerationParameters` schema.
    #[serde(default)]
    #[schema(schema_with = crate::contract_schema::generation_parameters)]
    pub parameters: GenerationParameters,
    /// The lane to queue the job in: `interactive` (the default) or `batch` (bulk work, run in the room
    /// interactive jobs leave). An API key limited to the batch lane gets `batch` whatever it asks.
    #[serde(default)]
    #[schema(schema_with = crate::contract_schema::optional_lane)]
    pub lane: Option<Lane>,
    /// Seconds the job is worth waiting for: it is refused at once (503 `deadline_exceeded`) when the
    /// queue's estimated wait is longer, and fails with `deadline_exceeded` if no worker started it in time.
    /// The header `X-Request-Timeout` says the same; the shorter wins.
    #[schema(exclusive_minimum = 0, maximum = 604800)]
    pub timeout_s: Option<f64>,
}

impl From<SubmitRequest> for JobRequest {
    fn from(r: SubmitRequest) -> Self {
        JobRequest {
            version: r.version,
            prompt: r.prompt,
            messages: r.messages,
            parameters: r.parameters,
            submitted_at_ms: None,
            deadline_ms: None,
        }
    }
}

/// The answer to a submission.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub id: String,
    /// `queued` for a new job; for a replayed `Idempotency-Key`, the named job's state now.
    pub status: Status,
    /// The prompt after the route's rules: what the model will see.
    pub prompt: String,
    /// Where to poll.
    pub location: String,
    pub submitted_at_ms: u64,
    /// The lane the job went to: the one asked for, or the key's highest.
    #[schema(schema_with = crate::contract_schema::lane)]
    pub lane: Lane,
    /// When the job stops being worth starting (ms since the epoch), when it has a timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitRequest,
    responses(
        (status = 202, description = "The gateway has the job: the broker confirmed it, or left it unconfirmed \
            and the gateway republishes it until it does. With an `Idempotency-Key` seen before (same body), the \
            job it named, and `Idempotent-Replayed: true`", body = JobAccepted,
            headers(("Location" = String, description = "/v1/jobs/{id}"),
                ("Idempotent-Replayed" = String, description = "`true` when an earlier job is answered again"))),
        (status = 400, description = "Invalid JSON", body = ErrorResponse),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 422, description = "Unknown field, parameter out of range, prompt empty (or, cleaned, too long), a \
            prompt that with max_new_tokens overflows the context, a job costing more than the whole token budget, or an \
            Idempotency-Key reused with another body", body = ErrorResponse),
        (status = 429, description = "Rate limited, too many active jobs, or the token budget spent (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Queue full, the estimated wait past the job's timeout (`deadline_exceeded`), broker or \
            Redis unavailable (Retry-After): not taken", body = ErrorResponse),
        (status = 504, description = "`outcome_unknown`: Redis did not answer while the job was being recorded, so it may \
            have been taken; the body's `job_id` names it and `GET /v1/jobs/{id}` tells", body = ErrorResponse,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
    ),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = r"^[!-~][ -~]{0,254}$",
        description = "1 to 255 printable ASCII characters, the first not a space. A resubmission with the same key and body (within \
            `--idempotency-ttl-s`) gets the first job back instead of making a second one"),
        ("X-Request-Timeout" = Option<f64>, Header, nullable = false, exclusive_minimum = 0, maximum = 604800,
        description = "Seconds the job is worth waiting for, as the body's `timeout_s` (the shorter wins)")),
    security((), ("api_key" = []))
)]
pub async fn submit(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<SubmitRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let timeout_s = crate::deadline::timeout(body.timeout_s, &headers)?;
    let lane = caller.lane(body.lane);
    let mut request: JobRequest = body.into();
    request.deadline_ms = timeout_s.map(|t| crate::deadline::deadline_ms(shared::reply::now_ms(), t));
    let (accepted, decision) = app
        .enqueue(
            JobId::new_random(),
            request,
            &app.settings.prompts.jobs,
            &caller,
            key,
            lane,
        )
        .await?;
    let location = format!("/v1/jobs/{}", accepted.id);
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(JobAccepted {
            id: accepted.id.to_string(),
            status: accepted.status,
            prompt: accepted.prompt,
            location: location.clone(),
            submitted_at_ms: accepted.submitted_at_ms,
            lane: accepted.lane,
            deadline_ms: accepted.deadline_ms,
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(d) = decision {
        d.write_headers(response.headers_mut());
    }
    if accepted.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The `Idempotency-Key` header, if any: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let invalid = |message: &str| ApiError::InvalidField {
        field: "Idempotency-Key".into(),
        message: message.into(),
    };
    let key = value.to_str().map_err(|_| invalid("must be printable ASCII"))?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(invalid("must be 1 to 255 printable ASCII characters"));
    }
    Ok(Some(key))
}

/// A job as a poll reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: Status,
    /// The prompt as the job took it, after the route's rules.
    pub prompt: String,
    /// The parameters as submitted.
    #[schema(value_type = Object)]
    pub parameters: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::contract_schema::error_body)]
    pub error: Option<shared::ErrorBody>,
    pub timings: JobTimings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Deliveries to a worker so far (more than 1 after a worker died mid-job).
    pub attempts: u32,
    /// The lane the job was queued in.
    #[schema(schema_with = crate::contract_schema::lane)]
    pub lane: Lane,
    /// While queued: an estimate of the place in line and the wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueuePosition>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobResult {
    /// The generated continuation.
    pub text: String,
    /// Prompt followed by the continuation, as `/run` returns it.
    pub full_text: String,
    pub new_tokens: u32,
    #[schema(schema_with = crate::contract_schema::finish_reason)]
    pub finish_reason: shared::FinishReason,
    /// The most jobs the worker's running batch held while this one was in it.
    pub batch_size: Option<u32>,
    /// Each generated token's id, log-probability and likeliest alternatives, when `logprobs` asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub logprobs: Option<Vec<shared::TokenLogprob>>,
    /// The prompt's (the first token's logprob is `null`), when `prompt_logprobs` asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub prompt_logprobs: Option<Vec<shared::TokenLogprob>>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct JobTimings {
    pub submitted_at_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// From submission to a worker taking the job.
    pub queued_ms: Option<u64>,
    pub prefill_ms: Option<u64>,
    pub decode_ms: Option<u64>,
    pub inference_ms: Option<u64>,
    /// From the worker's engine receiving the job to its first token.
    pub time_to_first_token_ms: Option<u64>,
}

#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "Malformed id", body = ErrorResponse),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 404, description = "Unknown id, or another key's job", body = ErrorResponse),
        (status = 429, description = "Rate limited (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Redis unavailable (Retry-After)", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let (record, figures) = owned(&app, &caller, &id).await?;
    let queue = if record.status == Status::Queued {
        let stats = app.broker.queue_stats().await.ok();
        Some(QueuePosition::estimate(&record, &figures, stats.as_ref()))
    } else {
        None
    };
    Ok(axum::Json(view(record, queue)))
}

/// The caller's job: a malformed id is 400, an unknown one (or, with keys on, another key's) 404.
pub async fn owned(app: &AppState, caller: &Caller, id: &str) -> Result<(JobRecord, Figures), ApiError> {
    let id: JobId = id
        .parse()
        .map_err(|_| ApiError::InvalidJobId(id.chars().take(64).collect()))?;
    let (record, figures) = app
        .store
        .get(id)
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?
        .ok_or(ApiError::NotFound)?;
    // With keys on, another key's job is indistinguishable from no job.
    if app.settings.api_keys.enabled() && record.owner != caller.key.map(|k| k.hex()) {
        return Err(ApiError::NotFound);
    }
    Ok((record, figures))
}

/// The answer to a cancel.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResult {
    pub id: String,
    /// The job's status now: `cancelled`, or the final state it had already reached.
    pub status: Status,
    /// Whether this request cancelled it (false: it had already ended, and nothing changed).
    pub cancelled: bool,
    pub message: String,
}

#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "Cancelled, or already ended (`cancelled` says which)", body = CancelResult),
        (status = 400, description = "Malformed id", body = ErrorResponse),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 404, description = "Unknown id, or another key's job", body = ErrorResponse),
        (status = 429, description = "Rate limited (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Broker or Redis unavailable; nothing changed (Retry-After)", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
/// Cancels a job: a queued one never runs, a running one leaves its worker's batch at the next step.
pub async fn cancel(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::Json<CancelResult>, ApiError> {
    let (record, _) = owned(&app, &caller, &id).await?;
    let finished = |status: Status| CancelResult {
        id: record.id.to_string(),
        status,
        cancelled: false,
        message: format!("the job had already ended ({}); nothing changed", status.as_str()),
    };
    if record.status.is_final() {
        return Ok(axum::Json(finished(record.status)));
    }
    let result = match app.cancel(record.id).await? {
        CancelOutcome::Cancelled { was } => CancelResult {
            id: record.id.to_string(),
            status: Status::Cancelled,
            cancelled: true,
            message: match was {
                Status::Queued => "cancelled; no worker will run it".to_owned(),
                _ => "cancelled; its worker stops it at the next step".to_owned(),
            },
        },
        CancelOutcome::AlreadyFinal(status) => finished(status),
        CancelOutcome::Missing => return Err(ApiError::NotFound),
    };
    Ok(axum::Json(result))
}

pub fn view(record: JobRecord, queue: Option<QueuePosition>) -> JobView {
    let t = record.result.as_ref().map(|r| &r.timings);
    let queued_ms = t.and_then(|t| t.queued_ms).or_else(|| {
        record
            .started_at_ms
            .zip(record.submitted_at_ms)
            .map(|(s, q)| s.saturating_sub(q))
    });
    let timings = JobTimings {
        submitted_at_ms: record.submitted_at_ms,
        started_at_ms: record.started_at_ms,
        finished_at_ms: record.finished_at_ms,
        queued_ms,
        prefill_ms: t.map(|t| t.prefill_ms),
        decode_ms: t.map(|t| t.decode_ms),
        inference_ms: t.map(|t| t.inference_ms),
        time_to_first_token_ms: t.and_then(|t| t.time_to_first_token_ms),
    };
    let result = record.result.map(|r| JobResult {
        full_text: format!("{}{}", r.prompt, r.text),
        text: r.text,
        new_tokens: r.new_tokens,
        finish_reason: r.finish_reason,
        batch_size: r.batch_size,
        logprobs: r.logprobs,
        prompt_logprobs: r.prompt_logprobs,
    });
    JobView {
        id: record.id.to_string(),
        status: record.status,
        prompt: record.prompt,
        parameters: record.parameters,
        result,
        error: record.error,
        timings,
        worker_id: record.worker_id,
        attempts: record.attempts,
        lane: record.lane,
        queue,
    }
}
