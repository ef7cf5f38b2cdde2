//! The one error type of the HTTP boundary and its one mapping to status codes and `{code, message}`
//! bodies; plus [`ApiJson`], the body extractor whose rejections are these errors, so a malformed body gets
//! the same JSON shape as every other error instead of axum's plain-text rejections.
//!
//! Server-side failures (Redis, the broker) are logged with their details here and answered with a short
//! generic message: internals are not the client's business.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::job::InvalidJob;
use shared::{ErrorBody, ErrorCode, JobId};

use crate::decision::retry_after_secs;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("unknown field `{field}`")]
    UnknownField { field: String },
    #[error("invalid `{field}`: {message}")]
    InvalidField { field: String, message: String },
    #[error("{}", .0)]
    InvalidJob(#[from] InvalidJob),
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body was not received in time")]
    BodyTimeout,
    #[error("`{0}` is not a job id (expected a UUID)")]
    InvalidJobId(String),
    #[error(
        "the prompt has {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that exceeds the model's \
         context of {context_length} positions"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        max_new_tokens: usize,
        context_length: usize,
    },
    #[error("no such job")]
    NotFound,
    #[error("no such file: {0}")]
    NoSuchFile(String),
    #[error("no such batch: {0}")]
    NoSuchBatch(String),
    #[error("the file is larger than {limit} bytes, the most a file may hold")]
    FileTooLarge { limit: u64 },
    #[error(
        "file {file} is the input of batch {batch}, which has not ended; delete the file once the batch has \
         ended, or cancel the batch"
    )]
    FileInUse { file: String, batch: String },
    #[error("batch {id} is {status}; only a validating or in_progress batch can be cancelled")]
    BatchNotCancellable { id: String, status: &'static str },
    #[error("the model `{0}` does not exist; GET /v1/models lists the one served here")]
    ModelNotFound(String),
    #[error("this method is not allowed on this path")]
    MethodNotAllowed,
    #[error("no such path; the API is described at /openapi.json")]
    NoRoute,
    #[error("a valid API key is required (Authorization: Bearer KEY)")]
    Unauthorized,
    #[error("rate limit exceeded; retry in {} s", .0.reset.as_secs().max(1))]
    RateLimited(crate::decision::Decision),
    #[error("this client has {limit} {what} open, as many as it may; poll /v1/jobs instead")]
    TooManyWaits { limit: usize, what: &'static str },
    #[error(
        "{}",
        match .0 {
            crate::server::Overflow::Client { limit } =>
                format!("this client has {limit} connections open, as many as it may; reuse one or retry later"),
            crate::server::Overflow::Gateway { limit } =>
                format!("the gateway has {limit} connections open, as many as it serves; retry later"),
        }
    )]
    TooManyConnections(crate::server::Overflow),
    #[error("this client has {0} jobs queued or running, as many as it may; submit more when one ends")]
    TooManyActiveJobs(u32),
    #[error("this client's budget of generated tokens is spent; retry in {} s", retry_after_secs(.retry_after))]
    TokensSpent { retry_after: std::time::Duration },
    #[error(
        "the job would generate up to {cost} tokens (max_new_tokens × beams), more than the whole budget of \
         {budget} a client has; ask for fewer"
    )]
    CostOverBudget { cost: u64, budget: u64 },
    #[error("the queue holds {bound} jobs, as many as it takes; retry in {} s", retry_after_secs(.retry_after))]
    QueueFull {
        bound: u32,
        retry_after: std::time::Duration,
    },
    #[error(
        "{} jobs wait ahead of this one in the {lane} lane: its estimated start, {}, is past its timeout of \
         {:.1} s; retry in {} s or with a longer timeout",
        .ahead,
        .estimated_start.map_or("none (no job has left the queue lately)".to_owned(), |s| format!("in {:.1} s", s.as_secs_f64())),
        .timeout.as_secs_f64(),
        retry_after_secs(.retry_after)
    )]
    DeadlineUnmeetable {
        lane: shared::Lane,
        ahead: u64,
        /// `None`: nothing drains, no start in sight.
        estimated_start: Option<std::time::Duration>,
        timeout: std::time::Duration,
        retry_after: std::time::Duration,
    },
    #[error("this Idempotency-Key was used for job {0} with another body; use a new key for a new job")]
    IdempotencyKeyReused(JobId),
    #[error("job {0} did not finish in time; it continues, poll /v1/jobs/{0}")]
    RunTimeout(JobId),
    /// Redis did not answer while the job was being recorded: it may have been taken (and then runs).
    #[error(
        "Redis did not answer while job {0} was being recorded, so it may or may not have been taken: GET \
         /v1/jobs/{0} tells (404 while it was not); retry with the same Idempotency-Key to be safe"
    )]
    OutcomeUnknown(JobId),
    /// A job the worker could not run; its error came back in the reply.
    #[error("{}", .0.message)]
    JobFailed(ErrorBody),
    /// A dependency is down; `what` and the detail are logged, not returned.
    #[error("{what} is unavailable")]
    Unavailable { what: &'static str, detail: String },
    #[error("internal error")]
    Internal(String),
}

/// How long a client should wait after a 503.
const UNAVAILABLE_RETRY_AFTER: u64 = 1;
/// How long a client at its cap of active jobs should wait: long enough for a short job to end.
const ACTIVE_RETRY_AFTER: u64 = 1;

/// The body of every error response (the OpenAI routes rewrite it into OpenAI's shape).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    /// Stable machine-readable code, e.g. `invalid_json`, `prompt_too_long`, `rate_limited`.
    #[schema(schema_with = crate::contract_schema::error_code)]
    code: ErrorCode,
    /// Readable explanation.
    message: String,
    /// The job the answer is about: on a `/run` timeout the one to poll, on a reused `Idempotency-Key`
    /// the one the key named, on `outcome_unknown` the one that may have been taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    job_id: Option<JobId>,
}

impl ApiError {
    pub fn unavailable(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            what,
            detail: detail.to_string(),
        }
    }

    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use ApiError::*;
        match self {
            InvalidJson(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidJson),
            UnknownField { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::UnknownField),
            InvalidField { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidParameter),
            InvalidJob(e) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorBody::from(e).code),
            PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
            BodyTimeout => (StatusCode::REQUEST_TIMEOUT, ErrorCode::Timeout),
            InvalidJobId(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidJobId),
            NotFound | NoSuchFile(_) | NoSuchBatch(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            FileTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge),
            BatchNotCancellable { .. } | FileInUse { .. } => {
                (StatusCode::CONFLICT, ErrorCode::InvalidParameter)
            }
            ContextOverflow { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::ContextOverflow),
            ModelNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::ModelNotFound),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed),
            NoRoute => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
            TooManyWaits { .. } => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyWaits),
            TooManyConnections(crate::server::Overflow::Client { .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyConnections)
            }
            TooManyConnections(crate::server::Overflow::Gateway { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::TooManyConnections)
            }
            TooManyActiveJobs(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyActiveJobs),
            TokensSpent { .. } => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TokenRateLimited),
            CostOverBudget { .. } => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::TokenRateLimited),
            QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::QueueFull),
            DeadlineUnmeetable { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::DeadlineExceeded),
            IdempotencyKeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::IdempotencyKeyReused),
            RunTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Timeout),
            OutcomeUnknown(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::OutcomeUnknown),
            JobFailed(body) => (
                match body.code {
                    ErrorCode::GenerationFailed | ErrorCode::Internal | ErrorCode::Unavailable => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                    // Someone (or the client's own hang-up) cancelled it.
                    ErrorCode::Cancelled => StatusCode::CONFLICT,
                    // Nobody served it in time, or every worker that took it died.
                    ErrorCode::Expired | ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                    ErrorCode::DeliveryLimit | ErrorCode::PublishFailed => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                },
                body.code,
            ),
            Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        }
    }
}

impl ApiError {
    /// A file operation's failure, as the client sees it (the store's details are logged, not returned).
    pub fn file(e: crate::files::FileError, id: &str) -> Self {
        use crate::files::FileError;
        match e {
            FileError::NotFound => ApiError::NoSuchFile(id.to_owned()),
            FileError::TooLarge { limit } => ApiError::FileTooLarge { limit },
            FileError::Upload(message) => ApiError::InvalidField {
                field: "file".into(),
                message,
            },
            e => ApiError::unavailable("file store", e),
        }
    }
}

/// What an error response said, kept in its extensions so a route group that speaks another error shape
/// (the OpenAI routes) can say the same thing its way, without a second mapping to status codes.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field, when one is to blame.
    pub param: Option<String>,
}

impl ApiError {
    /// The field to blame, for error shapes that have a place for it.
    pub fn param(&self) -> Option<String> {
        match self {
            ApiError::UnknownField { field } | ApiError::InvalidField { field, .. } => Some(field.clone()),
            ApiError::InvalidJob(shared::job::InvalidJob::Parameter(p)) => {
                Some(format!("parameters.{}", p.field))
            }
            ApiError::InvalidJob(shared::job::InvalidJob::Prompt(_)) => Some("prompt".to_owned()),
            ApiError::InvalidJob(shared::job::InvalidJob::Version(_)) => Some("version".to_owned()),
            ApiError::InvalidJob(_) => Some("messages".to_owned()),
            ApiError::ModelNotFound(_) => Some("model".to_owned()),
            ApiError::ContextOverflow { .. } | ApiError::CostOverBudget { .. } => {
                Some("parameters.max_new_tokens".to_owned())
            }
            ApiError::IdempotencyKeyReused(_) => Some("Idempotency-Key".to_owned()),
            ApiError::DeadlineUnmeetable { .. } => Some("timeout_s".to_owned()),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let info = ErrorInfo {
            code,
            message: self.to_string(),
            param: self.param(),
        };
        match &self {
            ApiError::Unavailable { what, detail } => {
                tracing::warn!(%what, %detail, "dependency unavailable");
            }
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            _ => {}
        }
        let job_id = match &self {
            ApiError::RunTimeout(id) | ApiError::IdempotencyKeyReused(id) | ApiError::OutcomeUnknown(id) => {
                Some(*id)
            }
            _ => None,
        };
        let body = ErrorResponse {
            code,
            message: self.to_string(),
            job_id,
        };
        let mut response = (status, axum::Json(body)).into_response();
        response.extensions_mut().insert(info);
        let retry_after = match &self {
            ApiError::Unavailable { .. } | ApiError::TooManyConnections(_) => Some(UNAVAILABLE_RETRY_AFTER),
            ApiError::TooManyActiveJobs(_) => Some(ACTIVE_RETRY_AFTER),
            ApiError::TokensSpent { retry_after }
            | ApiError::QueueFull { retry_after, .. }
            | ApiError::DeadlineUnmeetable { retry_after, .. } => Some(retry_after_secs(retry_after)),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let ApiError::RateLimited(decision) = &self {
            decision.write_headers(response.headers_mut());
        }
        if let ApiError::Unauthorized = &self {
            // RFC 9110: a 401 names the scheme that would be accepted (RFC 6750's for bearer tokens).
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::PayloadTooLarge { .. }
        | ApiError::FileTooLarge { .. }
        | ApiError::TooManyConnections(_) = &self
        {
            // The body was refused before its end (or the connection was over a bound and gets this one
            // answer), so the connection cannot carry another request and the server closes it. Saying so (RFC 9112 §9.6) keeps a client from sending its next request on
            // a connection about to close, which it would see fail with no response.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::RunTimeout(id) | ApiError::OutcomeUnknown(id) = &self
            && let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{id}"))
        {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

/// A JSON body parsed with serde, whose every failure is an [`ApiError`] naming the offending field.
///
/// The content type is not checked: the original `/run` clients are not known to send one, and the body
/// is parsed as JSON either way.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| body_error(rejection, limit))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Query parameters parsed with serde, refused as an [`ApiError`] (JSON, naming the problem) instead of
/// axum's plain-text rejection.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::InvalidField {
                field: "query".into(),
                message: e.body_text(),
            })
    }
}

/// The configured body limit, put in request extensions so the extractor can name it in its message.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn body_error(rejection: axum::extract::rejection::BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge { limit };
    }
    // The body was already read whole, under its deadline, by `routes::body_deadline`, which answers the
    // timeouts and broken connections: what is left to fail here is its size.
    ApiError::InvalidJson(rejection.body_text())
}

/// Deserializes an already parsed JSON value, naming the offending field like [`parse_json`].
pub fn parse_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        data_error(&path, e.inner())
    })
}

/// Parses `bytes`, telling syntax errors (400) from well-formed JSON with wrong content (422, with the
/// path of the field, e.g. `parameters.max_new_tokens`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            use serde_json::error::Category;
            match inner.classify() {
                Category::Syntax | Category::Eof | Category::Io => {
                    Err(ApiError::InvalidJson(inner.to_string()))
                }
                Category::Data => Err(data_error(&path, &inner)),
            }
        }
    }
}

fn data_error(path: &str, e: &serde_json::Error) -> ApiError {
    let text = e.to_string();
    // serde words these errors "unknown field `x`, expected ..." and "missing field `x`".
    let quoted = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned)
    };
    // serde_path_to_error writes the root as "."; a missing field's path is its parent, an unknown
    // field's path already ends in that field.
    let base = if path == "." { "" } else { path };
    let join = |field: &str| match base {
        "" => field.to_owned(),
        b if b == field || b.ends_with(&format!(".{field}")) => b.to_owned(),
        b => format!("{b}.{field}"),
    };
    // Strip serde's " at line 1 column 23" suffix: the field path says where.
    let message = match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text.clone(),
    };
    if let Some(field) = quoted("unknown field `") {
        return ApiError::UnknownField { field: join(&field) };
    }
    if let Some(field) = quoted("missing field `") {
        return ApiError::InvalidField {
            field: join(&field),
            message,
        };
    }
    let field = if base.is_empty() {
        "body".to_owned()
    } else {
        base.to_owned()
    };
    ApiError::InvalidField { field, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{GenerationParameters, JobRequest};

    #[test]
    fn syntax_errors_are_400_and_content_errors_422_naming_the_field() {
        let e = parse_json::<JobRequest>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e.status_and_code().0, StatusCode::BAD_REQUEST);

        let e = parse_json::<JobRequest>(br#"{"version":1,"prompt":"x","parameters":{"max_tokens":3}}"#)
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::UnknownField { field } if field == "parameters.max_tokens"),
            "{e:?}"
        );

        let e =
            parse_json::<JobRequest>(br#"{"version":1,"prompt":"x","parameters":{"top_k":-1}}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidField { field, .. } if field == "parameters.top_k"),
            "{e:?}"
        );

        let e = parse_json::<JobRequest>(br#"{"prompt":"x"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::InvalidField { field, .. } if field == "version"),
            "{e:?}"
        );

        let e = parse_json::<GenerationParameters>(br#"{"bogus":1}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::UnknownField { field } if field == "bogus"),
            "{e:?}"
        );
    }
}
